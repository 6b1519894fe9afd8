"""`cas snapshot --stdin --stdin-name NAME`: a stream piped into the CLI is stored as one file
and checked out byte for byte.
"""

from __future__ import annotations

import json
import random
import stat
import subprocess
import sys

import pytest

CLI_TIMEOUT_SECONDS = 120

STREAM = random.Random(3).randbytes(3 << 20)


def pipe_into_cas(cas_env, data, *args, expect=0):
    """Run the CLI with ``data`` written into its stdin through a real pipe; return stdout."""
    command = [sys.executable, "-m", "cas_cli.main", "snapshot", "--stdin", *map(str, args)]
    process = subprocess.Popen(
        command,
        env=cas_env.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, stderr = process.communicate(data, timeout=CLI_TIMEOUT_SECONDS)
    assert process.returncode == expect, stderr.decode()
    assert b"Traceback" not in stderr
    return stdout.decode(), stderr.decode()


def test_stdin_round_trip(cli_repo, run_cas, tmp_path):
    stdout, _ = pipe_into_cas(cli_repo, STREAM, "--stdin-name", "model.pt", "--json")
    out = json.loads(stdout)
    assert out["files"] == 1
    assert out["bytes_read"] == len(STREAM)
    dest = tmp_path / "restore"
    run_cas("checkout", out["id"], dest)
    restored = dest / "model.pt"
    assert restored.read_bytes() == STREAM
    assert stat.S_IMODE(restored.stat().st_mode) == 0o644


def test_stdin_same_stream_adds_no_chunks(cli_repo):
    first, _ = pipe_into_cas(cli_repo, STREAM, "--stdin-name", "model.pt", "--json")
    second, _ = pipe_into_cas(cli_repo, STREAM, "--stdin-name", "model.pt", "--json")
    assert json.loads(first)["new_chunks"] > 0
    assert json.loads(second)["new_chunks"] == 0
    assert json.loads(second)["parent"] == json.loads(first)["id"]


def test_stdin_empty_stream(cli_repo, run_cas, tmp_path):
    stdout, _ = pipe_into_cas(cli_repo, b"", "--stdin-name", "empty.pt", "--json")
    dest = tmp_path / "restore"
    run_cas("checkout", json.loads(stdout)["id"], dest)
    assert (dest / "empty.pt").read_bytes() == b""


def test_stdin_nested_name(cli_repo, run_cas, tmp_path):
    stdout, _ = pipe_into_cas(cli_repo, b"abc", "--stdin-name", "ckpt/step-1/model.pt", "--json")
    dest = tmp_path / "restore"
    run_cas("checkout", json.loads(stdout)["id"], dest)
    assert (dest / "ckpt" / "step-1" / "model.pt").read_bytes() == b"abc"


def test_stdin_log_shows_name(cli_repo, run_cas):
    pipe_into_cas(cli_repo, b"abc", "--stdin-name", "model.pt", "--tag", "piped")
    logged = json.loads(run_cas("log", "--json").stdout)[0]
    assert logged["meta"]["cas.stdin"] == "model.pt"
    assert logged["paths"] == []
    assert logged["tags"] == ["piped"]
    assert "(stdin) model.pt" in run_cas("log").stdout


@pytest.mark.parametrize("name", ["", "/abs/model.pt", "../model.pt", "a/../b", "a//b", "a/", "."])
def test_stdin_invalid_name(cli_repo, name):
    _, stderr = pipe_into_cas(cli_repo, b"abc", "--stdin-name", name, expect=2)
    assert "invalid --stdin-name" in stderr


def test_stdin_without_name(cli_repo):
    _, stderr = pipe_into_cas(cli_repo, b"abc", expect=2)
    # The user gave no name at all, so the message names the missing option, not a value.
    assert "--stdin needs --stdin-name NAME" in stderr
    assert "''" not in stderr


def test_stdin_with_path_rejected(cli_repo, tmp_path):
    _, stderr = pipe_into_cas(cli_repo, b"abc", tmp_path, "--stdin-name", "m.pt", expect=2)
    assert "takes no PATH" in stderr


def test_stdin_name_without_stdin(cli_repo, run_cas, tmp_path):
    result = run_cas("snapshot", tmp_path, "--stdin-name", "m.pt", expect=2)
    assert "add --stdin" in result.stderr
