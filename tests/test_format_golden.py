"""Repositories written by earlier releases of the format must keep opening.

``tests/data/repo-v1`` was written by cas 0.1.0 (repository format version 1)
from the tree that `_expected_tree` rebuilds, with password ``golden-v1`` and
chunk sizes min 4096, avg 16384, max 65536.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from cas.checker import check_repository
from cas.repository import Repository
from cas.restorer import Restorer

GOLDEN = Path(__file__).parent / "data" / "repo-v1"
PASSWORD = b"golden-v1"
MTIME_NS = 1767323045 * 10**9  # 2026-01-02 03:04:05 UTC, set with touch before the snapshot


def _expected_tree() -> dict[str, bytes]:
    rng = random.Random(7)
    return {
        "config.json": b'{"hidden_size": 384, "layers": 6}\n',
        "weights.bin": bytes(rng.getrandbits(8) for _ in range(200000)),
        "sub/zeros.bin": bytes(70000),
        "sub/text.txt": b"golden repository, format version 1\n" * 50,
        "empty.txt": b"",
    }


def _open_copy(tmp_path: Path) -> Repository:
    # Work on a copy so that nothing the test does can change the golden files.
    copy = tmp_path / "repo"
    shutil.copytree(GOLDEN, copy)
    return Repository.open(str(copy), PASSWORD, cache_dir=tmp_path / "cache")


def test_golden_v1_metadata(tmp_path: Path) -> None:
    with _open_copy(tmp_path) as repo:
        snapshots = repo.list_snapshots()
        assert len(snapshots) == 1
        snapshot = snapshots[0]
        assert snapshot.tags == ("golden",)
        assert snapshot.message == "golden repository"
        assert snapshot.host == "golden-host"
        assert repo.config.chunker.avg_size == 16384


def test_golden_v1_checkout(tmp_path: Path) -> None:
    with _open_copy(tmp_path) as repo:
        snapshot = repo.resolve_snapshot("latest")
        result = Restorer(repo, snapshot, str(tmp_path / "out")).run()
    assert result.failed == ()
    out = tmp_path / "out"
    for rel, content in _expected_tree().items():
        assert (out / rel).read_bytes() == content, rel
    assert (out / "empty-dir").is_dir()
    assert os.readlink(out / "link") == "sub/text.txt"
    assert (out / "config.json").stat().st_mtime_ns == MTIME_NS


def test_golden_v1_read_data(tmp_path: Path) -> None:
    with _open_copy(tmp_path) as repo:
        report = check_repository(repo, read_data=True)
    assert report.findings == []
    assert report.blobs_read > 0
