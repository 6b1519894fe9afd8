"""pytest-benchmark loops for the inner steps of snapshot and checkout, on 64 MiB of weights.

Run: pytest benchmarks/bench_pipeline.py --benchmark-enable
Without --benchmark-enable (the project default) each loop runs once, as a smoke test that
takes a few seconds. ``python -m benchmarks.run`` times whole commands on GiB-sized folders.

Every loop works on 64 MiB of fp32 weights (normal, std 0.02) cut into 1 MiB chunks, the
average chunk size of cas's default chunker parameters. Each stores the byte count in
``extra_info["bytes"]``, so MB/s is that count divided by the reported time.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cas.crypto import MasterKeys
from cas.pack import (
    PROLOGUE_SIZE,
    BlobOpener,
    BlobType,
    Codec,
    PackEntry,
    PackWriter,
    compress,
    parse_prologue,
)

MiB = 1 << 20
INPUT_SIZE = 64 * MiB
CHUNK_SIZE = 1 * MiB
CHUNK_COUNT = INPUT_SIZE // CHUNK_SIZE


@pytest.fixture(scope="module")
def weights() -> bytes:
    """Return 64 MiB of little-endian fp32 values drawn from normal(0, 0.02)."""
    values = np.random.default_rng(0).standard_normal(INPUT_SIZE // 4, dtype=np.float32)
    values *= np.float32(0.02)
    return values.astype("<f4").tobytes()


@pytest.fixture(scope="module")
def chunks(weights: bytes) -> list[memoryview]:
    """Return the weights as 1 MiB memoryview chunks, as the archiver hands them on."""
    view = memoryview(weights)
    return [view[start : start + CHUNK_SIZE] for start in range(0, INPUT_SIZE, CHUNK_SIZE)]


@pytest.fixture(scope="module")
def keys() -> MasterKeys:
    """Return a fresh random key set."""
    return MasterKeys.generate()


@pytest.fixture(scope="module")
def chunk_ids(keys: MasterKeys, chunks: list[memoryview]) -> list[bytes]:
    """Return the keyed BLAKE3 id of every chunk."""
    return [keys.blob_id(chunk) for chunk in chunks]


def seal_pack(writer: PackWriter, chunk_ids: list[bytes], chunks: list[memoryview]) -> int:
    """Start a new pack, encrypt every chunk into it uncompressed and return its size."""
    writer.reset()
    for chunk_id, chunk in zip(chunk_ids, chunks, strict=True):
        writer.add(BlobType.CHUNK, chunk_id, chunk, Codec.NONE, len(chunk))
    return len(writer.finish())


def test_chunk_ids_keyed_blake3(benchmark: Any, keys: MasterKeys, chunks: list[memoryview]) -> None:
    benchmark.extra_info["bytes"] = INPUT_SIZE
    ids = benchmark(lambda: [keys.blob_id(chunk) for chunk in chunks])
    assert len(set(ids)) == CHUNK_COUNT


def test_pack_sealing(
    benchmark: Any, keys: MasterKeys, chunk_ids: list[bytes], chunks: list[memoryview]
) -> None:
    benchmark.extra_info["bytes"] = INPUT_SIZE
    writer = PackWriter(keys, target_size=INPUT_SIZE, max_blob_size=CHUNK_SIZE)
    pack_size = benchmark(seal_pack, writer, chunk_ids, chunks)
    assert writer.blob_count == CHUNK_COUNT
    assert pack_size > INPUT_SIZE


def test_lz4_compress_fp32(benchmark: Any, chunks: list[memoryview]) -> None:
    benchmark.extra_info["bytes"] = INPUT_SIZE
    packed = benchmark(lambda: [compress(chunk) for chunk in chunks])
    stored = sum(CHUNK_SIZE if block is None else len(block) for block in packed)
    benchmark.extra_info["saved_fraction"] = round(1 - stored / INPUT_SIZE, 4)
    # Random low mantissa bytes leave lz4 almost nothing to find in fp32 weights.
    assert stored > 0.9 * INPUT_SIZE


def test_blob_opening(
    benchmark: Any, keys: MasterKeys, chunk_ids: list[bytes], chunks: list[memoryview]
) -> None:
    benchmark.extra_info["bytes"] = INPUT_SIZE
    writer = PackWriter(keys, target_size=INPUT_SIZE, max_blob_size=CHUNK_SIZE)
    seal_pack(writer, chunk_ids, chunks)
    pack = bytes(writer.finish())
    entries: list[PackEntry] = list(writer.entries)
    key_mode, salt = parse_prologue(pack[:PROLOGUE_SIZE], writer.pack_id.hex())
    opener = BlobOpener(keys, writer.pack_id, key_mode, salt)
    view = memoryview(pack)

    def open_all() -> int:
        opened = 0
        for entry in entries:
            stored = view[entry.offset : entry.offset + entry.stored_size]
            plain = opener.open(
                entry.blob_id,
                entry.blob_type,
                entry.codec,
                entry.filter,
                entry.raw_size,
                entry.offset,
                stored,
            )
            opened += len(plain)
        return opened

    assert benchmark(open_all) == INPUT_SIZE
