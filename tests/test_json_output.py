"""Every command prints exactly one JSON document on stdout with --json, also on failure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CasEnv, RunCas


@pytest.fixture
def filled(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> Path:
    """Create one snapshot of a small folder; return the folder."""
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "model.bin").write_bytes(bytes(range(256)) * 64)
    (source / "sub" / "config.json").write_bytes(b"{}")
    run_cas("snapshot", source, "--tag", "t", "--quiet")
    return source


def commands(tmp_path: Path, source: Path) -> list[list[str]]:
    return [
        ["snapshot", str(source)],
        ["log"],
        ["log", "--graph"],
        ["ls", "latest"],
        ["tag", "latest", "--add", "more"],
        ["find", "*.json"],
        ["checkout", "latest", str(tmp_path / "out")],
        ["copy", "--to", str(tmp_path / "copy-target")],
        ["stats"],
        ["stats", "latest"],
        ["check", "--read-data"],
        ["repair", "index", "--dry-run"],
        ["repair", "snapshots", "--dry-run"],
        ["prune", "--keep-last", "1", "--dry-run"],
        ["gc", "--dry-run"],
        ["unlock"],
        ["debug", "chunks", str(source / "model.bin")],
    ]


def test_every_command_one_document(
    filled: Path, cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path
) -> None:
    run_cas("init", "-r", tmp_path / "copy-target", env={**cli_repo.env, "CAS_PASSWORD": "other"})
    env = {**cli_repo.env, "CAS_TO_PASSWORD": "other"}

    for command in commands(tmp_path, filled):
        result = run_cas(*command, "--json", env=env)
        # json.loads rejects a second document after the first.
        document = json.loads(result.stdout)
        assert isinstance(document, dict | list), command


def test_init_one_document(cas_env: CasEnv, run_cas: RunCas) -> None:
    document = json.loads(run_cas("init", "--json").stdout)

    assert set(document) == {"repository", "id", "compression", "byte_group"}


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["log", "--no-such-option"], 2),
        (["tag", "latest"], 2),
        (["ls", "deadbeefdeadbeef"], 2),
        (["stats", "not-hex!"], 2),
    ],
    ids=["argparse", "usage", "not-found", "bad-name"],
)
def test_failure_one_document(filled: Path, run_cas: RunCas, args: list[str], code: int) -> None:
    result = run_cas(*args, "--json", expect=code)
    document = json.loads(result.stdout)

    assert document["exit_code"] == code
    assert document["error"]
