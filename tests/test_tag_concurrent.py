"""Concurrent `cas tag` runs on one snapshot, as real CLI processes started at once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import CLI_TIMEOUT_SECONDS, CasEnv, RunCas

ROUNDS = 6
TAGGERS = 3
CAS = [sys.executable, "-m", "cas_cli.main"]


def test_concurrent_tags_all_kept(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"w" * 1000)
    run_cas("snapshot", source)

    added = []
    for round_number in range(ROUNDS):
        tags = [f"r{round_number}-t{tagger}" for tagger in range(TAGGERS)]
        added += tags
        processes = [
            subprocess.Popen(
                [*CAS, "tag", "latest", "--add", tag, "--wait", "60s"],
                env=cli_repo.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for tag in tags
        ]
        for tag, process in zip(tags, processes, strict=True):
            _stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_SECONDS)
            assert process.returncode == 0, f"tag {tag}: {stderr}"
            assert "Traceback" not in stderr, stderr

    snapshots = json.loads(run_cas("log", "--json").stdout)
    assert len(snapshots) == 1, [snapshot["tags"] for snapshot in snapshots]
    assert sorted(snapshots[0]["tags"]) == sorted(added)
