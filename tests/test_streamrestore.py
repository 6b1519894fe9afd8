"""Large files restored in order with direct I/O (`cas.streamrestore`).

Files of `STREAM_MIN_SIZE` or more take this path, so these tests use files
just above it, with the small test chunker so that each has many chunks.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cas.archiver import Archiver, SnapshotOptions
from cas.index import pack_name
from cas.repository import Repository
from cas.restorer import CheckoutOptions, Restorer
from cas.streamrestore import BLOCK, STREAM_MIN_SIZE

MIB = 1 << 20


def _holey_content() -> bytes:
    """Return random data broken by zero runs of awkward sizes and one long hole."""
    rng = __import__("random").Random(5)
    parts = [
        rng.randbytes(3 * MIB + 17),
        bytes(5 * MIB),  # whole blocks: must become a hole
        rng.randbytes(2 * MIB - 5),
        bytes(BLOCK - 1),  # shorter than a block: written as data
        rng.randbytes(STREAM_MIN_SIZE),
        bytes(70_001),
        rng.randbytes(123_457),
    ]
    return b"".join(parts)


def _snapshot(repo: Repository, source: Path) -> None:
    Archiver(repo, SnapshotOptions(threads=2)).run([str(source)])


def _checkout(repo: Repository, target: Path) -> tuple[tuple[str, str], ...]:
    snapshot = repo.resolve_snapshot("latest")
    return Restorer(repo, snapshot, str(target), CheckoutOptions(threads=2)).run().failed


def test_stream_roundtrip_bytes(repo: Repository, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    content = _holey_content()
    (source / "model.bin").write_bytes(content)
    (source / "small.json").write_bytes(b'{"lr": 0.0003}')
    _snapshot(repo, source)

    failed = _checkout(repo, tmp_path / "out")

    assert failed == ()
    assert (tmp_path / "out" / "model.bin").read_bytes() == content
    assert (tmp_path / "out" / "small.json").read_bytes() == b'{"lr": 0.0003}'


def test_stream_leaves_holes(repo: Repository, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    content = _holey_content()
    (source / "model.bin").write_bytes(content)
    _snapshot(repo, source)

    _checkout(repo, tmp_path / "out")

    allocated = (tmp_path / "out" / "model.bin").stat().st_blocks * 512
    # The 5 MiB zero run covers whole blocks, so at least 4 MiB of it stays unallocated.
    assert allocated <= len(content) - 4 * MIB


def test_stream_damaged_chunk_named(repo: Repository, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    rng = __import__("random").Random(9)
    (source / "model.bin").write_bytes(rng.randbytes(STREAM_MIN_SIZE + MIB))
    _snapshot(repo, source)
    snapshot = repo.resolve_snapshot("latest")
    node = next(n for n in repo.load_tree(snapshot.tree_id) if n.name == b"model.bin")
    location = repo.index.lookup(node.chunk_ids[len(node.chunk_ids) // 2])
    assert location is not None
    path = Path(repo.backend.url) / pack_name(location.pack_id)
    data = bytearray(path.read_bytes())
    data[location.offset + 10] ^= 0x01
    path.write_bytes(bytes(data))

    failed = _checkout(repo, tmp_path / "out")

    assert [Path(shown).name for shown, _ in failed] == ["model.bin"]
    assert "failed authentication" in failed[0][1]


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_stream_without_direct_io(repo: Repository, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    content = _holey_content()
    (source / "model.bin").write_bytes(content)
    _snapshot(repo, source)
    # tmpfs rejects O_DIRECT, so the writer must fall back to buffered writes.
    target = Path("/dev/shm") / f"cas-test-{os.getpid()}-{tmp_path.name}"
    try:
        failed = _checkout(repo, target)

        assert failed == ()
        assert (target / "model.bin").read_bytes() == content
    finally:
        shutil.rmtree(target, ignore_errors=True)
