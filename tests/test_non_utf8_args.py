"""Command-line text that is not valid UTF-8, as a shell passes bytes such as 0xff.

Python turns such bytes into lone surrogates (PEP 383). A snapshot object is msgpack,
which cannot encode them, so each case must be rejected up front with exit code 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT_SECONDS, CasEnv, RunCas

BAD = b"x\xffy"

CASES = [
    ("--message", [b"--message", BAD]),
    ("--tag", [b"--tag", BAD]),
    ("--meta value", [b"--meta", b"key=" + BAD]),
    ("--meta key", [b"--meta", BAD + b"=value"]),
    ("--host", [b"--host", BAD]),
    ("--part", [b"--part", BAD]),
]


def run_bytes(
    env: CasEnv, args: list[bytes], stdin: bytes = b""
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI with raw byte arguments, as a shell passes them."""
    command = [os.fsencode(sys.executable), b"-m", b"cas_cli.main", *args]
    return subprocess.run(
        command,
        env=env.env,
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )


@pytest.mark.parametrize(("option", "extra"), CASES, ids=[case[0] for case in CASES])
def test_snapshot_rejects_non_utf8(cli_repo, tmp_path: Path, option: str, extra: list[bytes]):
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.txt").write_bytes(b"a")
    result = run_bytes(cli_repo, [b"snapshot", os.fsencode(source), *extra])
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert b"not valid UTF-8" in result.stderr
    # The check comes before any data is stored.
    assert not (cli_repo.repo / "snapshots").exists()
    assert not (cli_repo.repo / "data").exists()


def test_stdin_name_rejects_non_utf8(cli_repo):
    result = run_bytes(cli_repo, [b"snapshot", b"--stdin", b"--stdin-name", BAD], stdin=b"data")
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert b"not valid UTF-8" in result.stderr


def test_tag_rejects_non_utf8(cli_repo, run_cas: RunCas, tmp_path: Path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "a.txt").write_bytes(b"a")
    run_cas("snapshot", source)
    result = run_bytes(cli_repo, [b"tag", b"latest", b"--add", BAD])
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert b"not valid UTF-8" in result.stderr
