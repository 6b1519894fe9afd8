"""Errors a user meets at the command line: JSON on failure, bad options, many files.

Each case comes from trying `cas` as a new user would: the command must end
with the documented exit code and a message, never a traceback.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT_SECONDS


def test_json_error_document(cli_repo, run_cas):
    env = {**cli_repo.env, "CAS_PASSWORD": "not the password"}

    result = run_cas("log", "--json", expect=4, env=env)

    document = json.loads(result.stdout)
    assert document["exit_code"] == 4
    assert "wrong password" in document["error"]


def test_empty_password_variable(cli_repo, run_cas):
    result = run_cas("log", expect=2, env={**cli_repo.env, "CAS_PASSWORD": ""})

    assert "CAS_PASSWORD is set but empty" in result.stderr


def test_cache_dir_is_a_file(cli_repo, run_cas, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")

    result = run_cas("--cache-dir", blocker / "cas", "stats", expect=2)

    assert "cannot use cache folder" in result.stderr


def test_memory_below_floor(cli_repo, run_cas, tmp_path):
    (tmp_path / "src").mkdir()

    result = run_cas("snapshot", tmp_path / "src", "--memory", "0", expect=2)

    assert "invalid --memory 0" in result.stderr


def _limit_open_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_checkout_many_files_few_descriptors(cli_repo, run_cas, tmp_path):
    """One pack contains chunks of thousands of small files; checkout must not open them all."""
    source = tmp_path / "src"
    source.mkdir()
    for number in range(1500):
        (source / f"{number}.json").write_text(json.dumps({"step": number}))
    run_cas("snapshot", source)
    command = [sys.executable, "-m", "cas_cli.main", "checkout", "latest", str(tmp_path / "out")]

    result = subprocess.run(
        command,
        env=cli_repo.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        preexec_fn=_limit_open_files,
        check=False,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert len(os.listdir(tmp_path / "out")) == 1500
    assert (tmp_path / "out" / "1499.json").read_text() == '{"step": 1499}'


@pytest.mark.parametrize("threads", ["1", "2"])
def test_failed_file_not_dressed(cli_repo, run_cas, tmp_path, threads):
    """A file that fails verification is set aside, without the original mode and mtime."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.bin").write_bytes(os.urandom(300_000))
    os.utime(source / "model.bin", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    run_cas("snapshot", source)
    packs = [path for path in Path(cli_repo.repo, "data").rglob("*") if path.is_file()]
    biggest = max(packs, key=lambda path: path.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[100] ^= 0xFF
    biggest.write_bytes(bytes(data))

    run_cas("checkout", "latest", tmp_path / "out", "--threads", threads, expect=3)

    assert not (tmp_path / "out" / "model.bin").exists()
    restored = (tmp_path / "out" / "model.bin.cas-damaged").stat()
    assert restored.st_mtime_ns != 1_600_000_000 * 10**9
    assert restored.st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("args", "usage"),
    [
        (["snapshot", "src", "--bogus"], "usage: cas snapshot"),
        (["key", "add", "--label", "x"], "usage: cas key add"),
        (["log", "extra"], "usage: cas log"),
    ],
    ids=["snapshot", "key-add", "log"],
)
def test_unknown_option_shows_command_usage(cas_env, run_cas, args, usage):
    result = run_cas(*args, expect=2)

    assert result.stderr.startswith(usage)
    assert "unrecognized arguments" in result.stderr
