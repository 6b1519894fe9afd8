"""Tests of cas.chunker: public FastCDC vectors, streaming, keyed tables, edit locality."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import random
import threading
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pyfastcdc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyfastcdc.py.constants import MASKS as PYFASTCDC_MASKS

from cas.chunker import (
    DEBUG_PARAMS,
    DEFAULT_PARAMS,
    Chunker,
    ChunkerParams,
    MiB,
    cut_points,
    reference_cut_2016,
    reference_cut_2020,
)
from cas.errors import UsageError

VECTORS_DIR = Path(__file__).parents[1].parent / "shared" / "testdata" / "cdc"
VECTORS_MISSING = f"public FastCDC vectors not found in {VECTORS_DIR}"

# A seed with bit 63 set, which pyfastcdc 0.3.1 cannot take as it is.
HIGH_SEED = 0xDEADBEEFCAFEBABE
LOW_SEED = 0x0123456789ABCDEF


def _load_vectors() -> dict[str, Any] | None:
    path = VECTORS_DIR / "vectors.json"
    if not path.is_file():
        return None
    return cast(dict[str, Any], json.loads(path.read_text()))


VECTORS = _load_vectors()


def _vector_ids(variant: str, mask_rule: str | None = None) -> list[Any]:
    """Return the ids of one variant's vector sets, or one skipped case without the file."""
    if VECTORS is None:
        return [pytest.param(None, marks=pytest.mark.skip(reason=VECTORS_MISSING))]
    return [
        vector["id"]
        for vector in VECTORS["vectors"]
        if vector["variant"] == variant
        and (mask_rule is None or vector["mask_bits_rule"] == mask_rule)
    ]


def _vector(vector_id: str) -> dict[str, Any]:
    assert VECTORS is not None
    return next(vector for vector in VECTORS["vectors"] if vector["id"] == vector_id)


def _table(name: str) -> list[int]:
    if VECTORS is None:
        pytest.skip(VECTORS_MISSING)
    return [int(value, 16) for value in VECTORS["tables"][name]["values"]]


def _seeded_gear(seed: int) -> list[int]:
    return [entry ^ seed for entry in _table("gear64")]


def _params_of(vector: dict[str, Any]) -> ChunkerParams:
    return ChunkerParams(
        vector["min_size"], vector["avg_size"], vector["max_size"], vector["normalization_level"]
    )


@pytest.fixture(scope="module")
def image() -> bytes:
    path = VECTORS_DIR / "SekienAkashita.jpg"
    if not path.is_file():
        pytest.skip(VECTORS_MISSING)
    return path.read_bytes()


@functools.cache
def random_bytes(size: int, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def offsets_of(lengths: list[int]) -> list[int]:
    offsets = []
    offset = 0
    for length in lengths:
        offsets.append(offset)
        offset += length
    return offsets


# Public vectors


def test_gear_table_matches_md5_recipe() -> None:
    gear = _table("gear64")
    expected = [
        int.from_bytes(hashlib.md5(bytes([i]) * 64).digest()[:8], "big") for i in range(256)
    ]
    assert gear == expected


def test_shifted_gear_table_is_gear_shifted_left() -> None:
    gear = _table("gear64")
    assert _table("gear64_ls") == [(entry << 1) % 2**64 for entry in gear]


def test_mask_table_matches_pyfastcdc() -> None:
    assert _table("masks64") == list(PYFASTCDC_MASKS)


@pytest.mark.parametrize("vector_id", _vector_ids("fastcdc2020"))
def test_fastcdc2020_vector(vector_id: str, image: bytes) -> None:
    vector = _vector(vector_id)
    params = _params_of(vector)
    seed = vector["seed"]
    # Vectors made with floor(log2(avg)) mask bits carry the round(log2) results too.
    if vector["mask_bits_rule"] == "floor(log2(avg))":
        lengths = vector["rounded_log2_lengths"]
        gear_hashes = vector["rounded_log2_gear_hashes"]
    else:
        lengths = vector["lengths"]
        gear_hashes = [chunk["gear_hash"] for chunk in vector["chunks"]]
        assert offsets_of(lengths) == vector["offsets"]

    chunked = Chunker(params, seed).cut(image, final=True)
    assert chunked == lengths

    reference = reference_cut_2020(image, params, _seeded_gear(seed), _table("masks64"))
    assert [length for _, length, _ in reference] == lengths
    assert [gear_hash for _, _, gear_hash in reference] == gear_hashes
    assert [offset for offset, _, _ in reference] == offsets_of(lengths)

    fastcdc = pyfastcdc.FastCDC(
        params.avg_size,
        min_size=params.min_size,
        max_size=params.max_size,
        normalized_chunking=cast(pyfastcdc.NormalizedChunking, params.normalization),
        seed=seed,
    )
    assert [chunk.gear_hash for chunk in fastcdc.cut_buf(image)] == gear_hashes


@pytest.mark.parametrize("vector_id", _vector_ids("fastcdc2020", "floor(log2(avg))"))
def test_fastcdc2020_floor_log2_vector(vector_id: str, image: bytes) -> None:
    vector = _vector(vector_id)
    reference = reference_cut_2020(
        image,
        _params_of(vector),
        _seeded_gear(vector["seed"]),
        _table("masks64"),
        mask_bits=vector["bits"],
    )
    assert [length for _, length, _ in reference] == vector["lengths"]
    assert [gear_hash for _, _, gear_hash in reference] == [
        chunk["gear_hash"] for chunk in vector["chunks"]
    ]


@pytest.mark.parametrize("vector_id", _vector_ids("fastcdc2016"))
def test_fastcdc2016_vector(vector_id: str, image: bytes) -> None:
    vector = _vector(vector_id)
    params = _params_of(vector)
    reference = reference_cut_2016(image, params, _seeded_gear(vector["seed"]), _table("masks64"))
    assert [length for _, length, _ in reference] == vector["lengths"]
    assert [gear_hash for _, _, gear_hash in reference] == [
        chunk["gear_hash"] for chunk in vector["chunks"]
    ]
    # The 2016 and 2020 loops cut at the same points.
    assert Chunker(params, vector["seed"]).cut(image, final=True) == vector["lengths"]


def test_all_zeros_vector() -> None:
    if VECTORS is None:
        pytest.skip(VECTORS_MISSING)
    vector = next(v for v in VECTORS["all_zeros_vectors"] if v["variant"] == "fastcdc2020")
    params = _params_of(vector)
    zeros = bytes(10240)
    assert Chunker(params).cut(zeros, final=True) == vector["lengths"]
    reference = reference_cut_2020(zeros, params, _table("gear64"), _table("masks64"))
    assert [length for _, length, _ in reference] == vector["lengths"]
    assert {gear_hash for _, _, gear_hash in reference} == {vector["gear_hash_each"]}


def test_seed_with_bit_63_matches_reference() -> None:
    data = random_bytes(1 * MiB)
    expected = reference_cut_2020(data, DEBUG_PARAMS, _seeded_gear(HIGH_SEED))
    assert Chunker(DEBUG_PARAMS, HIGH_SEED).cut(data, final=True) == [
        length for _, length, _ in expected
    ]


# Chunk contents and sizes


def test_chunks_concatenate_to_input() -> None:
    data = random_bytes(3 * MiB + 12345)
    chunks = [bytes(view) for view in Chunker(DEBUG_PARAMS, LOW_SEED).iter_stream(io.BytesIO(data))]
    assert b"".join(chunks) == data


@pytest.mark.parametrize("params", [DEBUG_PARAMS, DEFAULT_PARAMS], ids=["debug", "default"])
def test_chunk_sizes_within_bounds(params: ChunkerParams) -> None:
    lengths = Chunker(params, LOW_SEED).cut(random_bytes(32 * MiB + 7), final=True)
    assert len(lengths) > 3
    assert min(lengths[:-1]) >= params.min_size
    assert max(lengths) <= params.max_size
    assert lengths[-1] >= 1


def test_keyed_and_unkeyed_cut_points_differ() -> None:
    data = random_bytes(4 * MiB)
    unkeyed = Chunker(DEBUG_PARAMS).cut(data, final=True)
    keyed = Chunker(DEBUG_PARAMS, LOW_SEED).cut(data, final=True)
    other_key = Chunker(DEBUG_PARAMS, LOW_SEED + 1).cut(data, final=True)
    assert set(offsets_of(keyed)) != set(offsets_of(unkeyed))
    assert set(offsets_of(keyed)) != set(offsets_of(other_key))


@pytest.mark.parametrize(("bit", "changes"), [(0, True), (47, True), (48, False), (63, False)])
def test_seed_bit_effect_on_cut_points(bit: int, changes: bool) -> None:
    data = random_bytes(8 * MiB)
    base = Chunker(DEBUG_PARAMS, LOW_SEED).cut(data, final=True)
    flipped = Chunker(DEBUG_PARAMS, LOW_SEED ^ (1 << bit)).cut(data, final=True)
    assert (base != flipped) is changes


def test_empty_input_gives_no_chunks(tmp_path: Path) -> None:
    chunker = Chunker(DEBUG_PARAMS, LOW_SEED)
    empty_file = tmp_path / "empty"
    empty_file.write_bytes(b"")
    assert chunker.cut(b"", final=True) == []
    assert chunker.cut(b"", final=False) == []
    assert list(chunker.iter_stream(io.BytesIO(b""))) == []
    assert cut_points(empty_file, DEBUG_PARAMS, LOW_SEED) == []


# With the public table no position of all-zero input matches DEBUG_PARAMS' masks, so every
# chunk of zeros is max_size long.
_MIN = DEBUG_PARAMS.min_size
_MAX = DEBUG_PARAMS.max_size
EDGE_SIZES = [
    # size, lengths with final=True, lengths with final=False
    (0, [], []),
    (1, [1], []),
    (_MIN - 1, [_MIN - 1], []),
    (_MIN, [_MIN], []),
    (_MAX, [_MAX], [_MAX]),
    (_MAX + 1, [_MAX, 1], [_MAX]),
]


@pytest.mark.parametrize(("size", "final_lengths", "settled_lengths"), EDGE_SIZES)
def test_edge_sizes(size: int, final_lengths: list[int], settled_lengths: list[int]) -> None:
    chunker = Chunker(DEBUG_PARAMS)
    data = bytes(size)
    assert chunker.cut(data, final=True) == final_lengths
    assert chunker.cut(data, final=False) == settled_lengths
    assert [len(view) for view in chunker.iter_stream(io.BytesIO(data))] == final_lengths


def test_cut_accepts_float_array_view() -> None:
    weights = np.random.default_rng(3).standard_normal(1 << 20, dtype=np.float32) * 0.02
    chunker = Chunker(DEBUG_PARAMS, LOW_SEED)
    float_view = weights.data  # a memoryview with format "f"
    assert float_view.format == "f"
    assert chunker.cut(float_view, final=True) == chunker.cut(weights.tobytes(), final=True)


def test_cut_with_carried_tail_equals_one_shot() -> None:
    data = random_bytes(2 * MiB + 999)
    chunker = Chunker(DEBUG_PARAMS, LOW_SEED)
    lengths: list[int] = []
    pending = b""
    for start in range(0, len(data), 100_000):
        pending += data[start : start + 100_000]
        settled = chunker.cut(pending, final=False)
        lengths += settled
        pending = pending[sum(settled) :]
        assert len(pending) < DEBUG_PARAMS.max_size + 100_000
    lengths += chunker.cut(pending, final=True)
    assert lengths == chunker.cut(data, final=True)


def test_threads_share_one_chunker() -> None:
    chunker = Chunker(DEBUG_PARAMS, LOW_SEED)
    inputs = [random_bytes(8 * MiB, seed) for seed in (10, 11)]
    expected = [chunker.cut(data, final=True) for data in inputs]
    results: list[list[int]] = [[], []]

    def work(index: int) -> None:
        results[index] = chunker.cut(inputs[index], final=True)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


# Parameter checks

INVALID_PARAMS = [
    (ChunkerParams(63, 16384, 65536), "min_size 63", "between 64 and 1048576"),
    (ChunkerParams(4096, 255, 65536), "avg_size 255", "between 256 and 4194304"),
    (ChunkerParams(2 * MiB, 4 * MiB, 8 * MiB), "min_size 2097152", "between 64 and 1048576"),
    (ChunkerParams(4096, 8 * MiB, 16 * MiB), "avg_size 8388608", "between 256 and 4194304"),
    (ChunkerParams(64, 256, 1023), "max_size 1023", "between 1024 and 16777216"),
    (ChunkerParams(4096, 16384, 16 * MiB + 1), "max_size 16777217", "between 1024 and 16777216"),
    (ChunkerParams(4096, 16384, 65536, 4), "normalization 4", "between 0 and 3"),
    (ChunkerParams(4096, 16384, 65536, -1), "normalization -1", "between 0 and 3"),
    (ChunkerParams(8192, 4096, 65536), "min 8192, avg 4096", "min_size <= avg_size"),
    (ChunkerParams(4096, 65536, 16384), "avg 65536, max 16384", "avg_size <= max_size"),
    (ChunkerParams(cast(int, 4096.0), 16384, 65536), "min_size must be an integer", "4096.0"),
]


@pytest.mark.parametrize(("params", "value_text", "range_text"), INVALID_PARAMS)
def test_invalid_params_raise(params: ChunkerParams, value_text: str, range_text: str) -> None:
    with pytest.raises(UsageError) as raised:
        params.validate()
    assert value_text in str(raised.value)
    assert range_text in str(raised.value)
    with pytest.raises(UsageError):
        Chunker(params)


def test_shipped_params_are_valid() -> None:
    DEFAULT_PARAMS.validate()
    DEBUG_PARAMS.validate()
    assert (DEFAULT_PARAMS.min_size, DEFAULT_PARAMS.avg_size, DEFAULT_PARAMS.max_size) == (
        256 * 1024,
        1 * MiB,
        4 * MiB,
    )


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True])
def test_invalid_seed_raises(seed: Any) -> None:
    with pytest.raises(UsageError, match="seed"):
        Chunker(DEBUG_PARAMS, seed)


def test_largest_seed_is_accepted() -> None:
    Chunker(DEBUG_PARAMS, 2**64 - 1)


@pytest.mark.parametrize("block_size", [0, -5])
def test_invalid_block_size_raises(block_size: int) -> None:
    with pytest.raises(UsageError, match="block_size"):
        list(Chunker(DEBUG_PARAMS).iter_stream(io.BytesIO(b"abc"), block_size))


# Streaming


class ShortReader(io.RawIOBase):
    """A reader whose readinto returns a few random bytes per call, as a pipe can."""

    def __init__(self, data: bytes, max_read: int) -> None:
        self._data = data
        self._offset = 0
        self._random = random.Random(5)
        self._max_read = max_read

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        count = min(len(buffer), self._random.randint(1, self._max_read))
        piece = self._data[self._offset : self._offset + count]
        buffer[: len(piece)] = piece
        self._offset += len(piece)
        return len(piece)


class ReadOnlyReader:
    """A reader with read() and no readinto()."""

    def __init__(self, data: bytes) -> None:
        self._stream = io.BytesIO(data)

    def read(self, size: int) -> bytes:
        return self._stream.read(min(size, 70_001))


class NonBlockingReader(io.RawIOBase):
    """A reader in non-blocking mode that has no data yet."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        return None


STREAM_DATA_SIZE = 3 * MiB + 4321
BLOCK_SIZES = [
    DEBUG_PARAMS.max_size,
    DEBUG_PARAMS.max_size + 1,
    2 * DEBUG_PARAMS.max_size - 1,
    3 * DEBUG_PARAMS.max_size + 17,
    1_000_003,
    STREAM_DATA_SIZE,
    4 * MiB,
    4097,
]


def stream_lengths(chunker: Chunker, reader: Any, block_size: int = 1_000_003) -> list[int]:
    return [len(view) for view in chunker.iter_stream(cast(BinaryIO, reader), block_size)]


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_stream_equals_one_shot(block_size: int) -> None:
    data = random_bytes(STREAM_DATA_SIZE)
    chunker = Chunker(DEBUG_PARAMS, LOW_SEED)
    expected = chunker.cut(data, final=True)
    assert stream_lengths(chunker, io.BytesIO(data), block_size) == expected


def test_stream_short_reads_equal_one_shot() -> None:
    data = random_bytes(STREAM_DATA_SIZE)
    chunker = Chunker(DEBUG_PARAMS, LOW_SEED)
    assert stream_lengths(chunker, ShortReader(data, 9000)) == chunker.cut(data, final=True)


def test_stream_reader_without_readinto() -> None:
    data = random_bytes(STREAM_DATA_SIZE)
    chunker = Chunker(DEBUG_PARAMS, LOW_SEED)
    assert stream_lengths(chunker, ReadOnlyReader(data)) == chunker.cut(data, final=True)


def test_stream_non_blocking_reader_raises() -> None:
    with pytest.raises(UsageError, match="non-blocking"):
        stream_lengths(Chunker(DEBUG_PARAMS), NonBlockingReader())


def test_stream_from_pipe_equals_one_shot() -> None:
    data = random_bytes(STREAM_DATA_SIZE)
    chunker = Chunker(DEBUG_PARAMS, LOW_SEED)
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb", buffering=0) as pipe:
            for start in range(0, len(data), 65_537):
                pipe.write(data[start : start + 65_537])

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            streamed = [bytes(view) for view in chunker.iter_stream(cast(BinaryIO, pipe))]
    finally:
        feeder.join()
    assert [len(chunk) for chunk in streamed] == chunker.cut(data, final=True)
    assert b"".join(streamed) == data


# Edit locality: an insertion or deletion changes only the chunks near it.

EDIT_FILE_SIZE = 64 * MiB


@functools.cache
def edit_baseline() -> tuple[bytes, Chunker, list[int]]:
    data = random_bytes(EDIT_FILE_SIZE, seed=21)
    chunker = Chunker(DEFAULT_PARAMS, LOW_SEED)
    return data, chunker, chunker.cut(data, final=True)


def check_edit_locality(
    position: int, delete_size: int, insert_seed: int, insert_size: int
) -> None:
    """Apply one edit at ``position`` and compare the chunks before and after it.

    Every chunk that ends before the edit is unchanged, because a cut depends only on
    the bytes from the chunk start to the cut. Chunks after the edit realign where both
    cuttings pick the same cut point. That is likely but not certain within one
    max_size: in 4000 random edits of up to 8 KiB on random data, 3 needed more than one
    max_size and none more than two, so the check allows two.
    """
    data, chunker, old_lengths = edit_baseline()
    inserted = random.Random(insert_seed).randbytes(insert_size)
    edited = data[:position] + inserted + data[position + delete_size :]
    new_lengths = chunker.cut(edited, final=True)
    new_offsets = offsets_of(new_lengths)
    new_chunks = set(zip(new_offsets, new_lengths, strict=True))
    old_offsets = offsets_of(old_lengths)

    shift = insert_size - delete_size
    edit_end = position + delete_size
    max_size = DEFAULT_PARAMS.max_size
    for offset, length in zip(old_offsets, old_lengths, strict=True):
        if offset + length < position:
            assert (offset, length) in new_chunks, f"chunk at {offset} before the edit changed"
        elif offset >= edit_end + 2 * max_size:
            assert (offset + shift, length) in new_chunks, f"chunk at {offset} after the edit"


edit_strategy = {
    "position": st.integers(0, EDIT_FILE_SIZE),
    "delete_size": st.integers(0, 65536),
    "insert_seed": st.integers(0, 2**32),
    "insert_size": st.integers(0, 65536),
}


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(**edit_strategy)
def test_edit_changes_only_nearby_chunks(
    position: int, delete_size: int, insert_seed: int, insert_size: int
) -> None:
    check_edit_locality(position, delete_size, insert_seed, insert_size)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, database=None)
@given(**edit_strategy)
def test_edit_changes_only_nearby_chunks_many(
    position: int, delete_size: int, insert_seed: int, insert_size: int
) -> None:
    check_edit_locality(position, delete_size, insert_seed, insert_size)


# Sparse files


def write_sparse(path: Path, size: int, data_regions: list[tuple[int, bytes]]) -> None:
    with open(path, "wb") as file:
        file.truncate(size)
        for offset, data in data_regions:
            file.seek(offset)
            file.write(data)


def test_sparse_file_with_data_at_end(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    size = 64 * MiB
    write_sparse(path, size, [(size - 1 * MiB - 333, random_bytes(1 * MiB + 333))])
    expected_lengths = Chunker(DEFAULT_PARAMS, LOW_SEED).cut(path.read_bytes(), final=True)
    expected = list(zip(offsets_of(expected_lengths), expected_lengths, strict=True))

    assert cut_points(path, DEFAULT_PARAMS, LOW_SEED) == expected
    with open(path, "rb") as reader:
        assert cut_points(reader, DEFAULT_PARAMS, LOW_SEED) == expected


def read_range(path: Path, start: int, end: int) -> bytes:
    with open(path, "rb") as file:
        file.seek(start)
        return file.read(end - start)


@pytest.mark.slow
def test_sparse_file_over_4_gib(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    size = 4 * 1024 * MiB + 3 * MiB
    middle = 2**32 - 512 * 1024  # data across the 32-bit offset boundary
    regions = [(middle, random_bytes(1 * MiB, 2)), (size - 1 * MiB, random_bytes(1 * MiB, 3))]
    write_sparse(path, size, regions)
    points = cut_points(path, DEFAULT_PARAMS, LOW_SEED)

    assert [offset for offset, _ in points] == offsets_of([length for _, length in points])
    assert sum(length for _, length in points) == size

    # Chunks of zeros all have one length, because each starts on identical bytes.
    max_size = DEFAULT_PARAMS.max_size
    zero_lengths = {length for offset, length in points if offset + max_size < middle}
    assert len(zero_lengths) == 1

    # Around each data region, recut from a chunk start in the zeros before it.
    chunker = Chunker(DEFAULT_PARAMS, LOW_SEED)
    for region_start, _ in regions:
        start = max(offset for offset, _ in points if offset + 2 * max_size < region_start)
        end = min(size, region_start + 4 * max_size)
        lengths = chunker.cut(read_range(path, start, end), final=end == size)
        offsets = offsets_of(lengths)
        expected = [
            (start + offset, length) for offset, length in zip(offsets, lengths, strict=True)
        ]
        first = points.index(expected[0])
        assert points[first : first + len(expected)] == expected
