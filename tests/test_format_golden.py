"""Repositories written by earlier releases of the format must keep opening.

``tests/data/repo-v2`` (format version 2, with zstd, byte grouping, a retagged snapshot
and a write-only writer) was written by ``tests/data/make_golden_v2.py``; its tests are
at the end of this file.

``tests/data/repo-v1`` was written by cas 0.1.0 (repository format version 1)
from the tree that `_expected_tree` rebuilds, with password ``golden-v1`` and
chunk sizes min 4096, avg 16384, max 65536.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
from pathlib import Path
from types import ModuleType

from cas.archiver import Archiver, SnapshotOptions
from cas.checker import check_repository
from cas.codecs import Codec
from cas.objects import KeyKind
from cas.pack import KEY_MODE_DATA, KEY_MODE_X25519, PROLOGUE_SIZE, parse_prologue
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


# Format version 2: tests/data/make_golden_v2.py wrote tests/data/repo-v2.

GOLDEN_V2 = Path(__file__).parent / "data" / "repo-v2"
_GENERATOR = Path(__file__).parent / "data" / "make_golden_v2.py"


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_golden_v2", _GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _open_v2(tmp_path: Path, password: bytes, cache: str = "cache") -> Repository:
    copy = tmp_path / "repo"
    if not copy.exists():
        shutil.copytree(GOLDEN_V2, copy)
    return Repository.open(str(copy), password, cache_dir=tmp_path / cache)


def test_golden_v2_metadata(tmp_path: Path) -> None:
    generator = _generator()
    with _open_v2(tmp_path, generator.PASSWORD) as repo:
        snapshots = {snapshot.host: snapshot for snapshot in repo.list_snapshots()}
        assert repo.config.version == 2
        assert repo.config.compression.codec == Codec.ZSTD
        assert repo.config.compression.byte_group == "auto"
    assert set(snapshots) == {"golden-host", "gpu-1"}
    owner = snapshots["golden-host"]
    assert owner.tags == ("golden", "best")
    assert owner.meta == {"lr": "3e-4"}
    assert len(owner.replaces) == 1
    assert snapshots["gpu-1"].tags == ("cluster",)


def test_golden_v2_checkout(tmp_path: Path) -> None:
    generator = _generator()
    expected = generator.expected_files()
    with _open_v2(tmp_path, generator.PASSWORD) as repo:
        for snapshot in repo.list_snapshots():
            name = "owner" if snapshot.host == "golden-host" else "writer"
            out = tmp_path / name
            result = Restorer(repo, snapshot, str(out)).run()
            assert result.failed == ()
            for rel, content in expected[name].items():
                assert (out / rel).read_bytes() == content, rel
            assert (out / "model.safetensors").stat().st_mtime_ns == generator.MTIME_NS


def test_golden_v2_read_data(tmp_path: Path) -> None:
    generator = _generator()
    with _open_v2(tmp_path, generator.PASSWORD) as repo:
        report = check_repository(repo, read_data=True)
        repo.index.sync()
        locations = [location for _blob_id, location in repo.index.cache.items()]
    assert report.findings == []
    assert 4 in {location.filter for location in locations}
    assert Codec.ZSTD in {location.codec for location in locations}


def test_golden_v2_write_only_parts(tmp_path: Path) -> None:
    modes = set()
    for pack in (GOLDEN_V2 / "data").rglob("*"):
        if pack.is_file():
            modes.add(parse_prologue(pack.read_bytes()[:PROLOGUE_SIZE], pack.name)[0])
    key_bytes = {path.read_bytes()[6] for path in (GOLDEN_V2 / "snapshots").iterdir()}
    assert modes == {KEY_MODE_DATA, KEY_MODE_X25519}
    assert key_bytes == {KeyKind.DATA, KeyKind.X25519}


def test_golden_v2_writer_still_writes(tmp_path: Path) -> None:
    generator = _generator()
    source = tmp_path / "writer-src"
    for rel, content in generator.expected_files()["writer"].items():
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / rel).write_bytes(content)
    with _open_v2(tmp_path, generator.WRITER_PASSWORD, "writer-cache") as repo:
        assert repo.keys.write_only
        result = Archiver(repo, SnapshotOptions(host="gpu-2")).run([str(source)])
    assert result.new_chunks == 0
    with _open_v2(tmp_path, generator.PASSWORD) as repo:
        assert len(repo.list_snapshots()) == 3
