"""Content-defined chunking: cut a byte stream into chunks with FastCDC 2020.

The cut loop is `pyfastcdc.FastCDC` (a compiled Cython loop that releases the
GIL while it hashes), so two threads chunk two files at the same time. A
repository keys its chunker with a 64-bit seed: pyfastcdc XORs the public gear
table with the seed, so cut points differ per repository while the public test
vectors still apply with seed 0. docs/chunking.md gives the parameters, the
streaming rule and what the seed does and does not hide.

Streaming rule: the chunk that starts at offset ``o`` depends only on the bytes
``o .. o + max_size``. Once that many bytes are known, its cut point is
settled, so `Chunker.iter_stream` cuts a stream block by block and returns the
same chunks as one call on the whole input.

The slow pure-Python ``reference_cut_*`` functions at the end exist for the
tests, which check gear hash values against the published vectors with them.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO, cast

import pyfastcdc

from cas.errors import UsageError

logger = logging.getLogger(__name__)

KiB = 1024
MiB = 1024 * KiB

# Parameter bounds of pyfastcdc 0.3.1; its constructor raises ValueError outside them.
MIN_SIZE_RANGE = (64, 1 * MiB)
AVG_SIZE_RANGE = (256, 4 * MiB)
MAX_SIZE_RANGE = (1 * KiB, 16 * MiB)
NORMALIZATION_RANGE = (0, 3)

SEED_LIMIT = 2**64
"""Exclusive upper bound of a chunker seed."""

DEFAULT_BLOCK_SIZE = 16 * MiB
"""Bytes that `Chunker.iter_stream` reads per refill, by default."""

_UINT64_MASK = 2**64 - 1

# NOTE: pyfastcdc 0.3.1 raises OverflowError for seeds of 2**63 and above, because it
# computes ``seed << 1`` before storing it in a uint64. Bit 63 of the seed never changes a
# cut point, because gear-hash bits only move upwards and no mask reaches bit 63. So
# `Chunker` clears it before handing the seed over, and only pyfastcdc's gear_hash differs.
_PYFASTCDC_SEED_MASK = 2**63 - 1

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ChunkerParams:
    """Chunk size bounds in bytes and the FastCDC normalization level.

    Mask bits are round(log2(avg_size)), as in pyfastcdc 0.3.1 and fastcdc-rs 4.0.1, so an
    avg_size that is not a power of two selects the nearest power's masks.
    """

    min_size: int
    avg_size: int
    max_size: int
    normalization: int = 1

    def validate(self) -> None:
        """Raise `UsageError` naming the first field outside pyfastcdc's bounds."""
        for name, (low, high) in (
            ("min_size", MIN_SIZE_RANGE),
            ("avg_size", AVG_SIZE_RANGE),
            ("max_size", MAX_SIZE_RANGE),
            ("normalization", NORMALIZATION_RANGE),
        ):
            value = getattr(self, name)
            if type(value) is not int:
                raise UsageError(f"chunker {name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise UsageError(
                    f"invalid chunker {name} {value}: it must be between {low} and {high}"
                )
        if not self.min_size <= self.avg_size <= self.max_size:
            raise UsageError(
                f"invalid chunker sizes min {self.min_size}, avg {self.avg_size}, "
                f"max {self.max_size}: they must satisfy min_size <= avg_size <= max_size"
            )


DEFAULT_PARAMS = ChunkerParams(min_size=256 * KiB, avg_size=1 * MiB, max_size=4 * MiB)
"""Parameters of new repositories."""

DEBUG_PARAMS = ChunkerParams(min_size=4 * KiB, avg_size=16 * KiB, max_size=64 * KiB)
"""Small chunks for ``cas debug chunks --unkeyed`` and for tests."""


class Chunker:
    """A FastCDC 2020 chunker with fixed parameters and gear table.

    ``seed`` 0 selects the public gear table; any other seed below 2**64 XORs every
    table entry with it. Only the low 48 bits of the seed change cut points: the
    masks test gear-hash bits 0 to 48, and those depend only on bits 0 to 47 of the
    table entries, because shifts and carries move bits upwards only.

    Several threads may call one instance: pyfastcdc 0.3.1 keeps each call's state in
    the iterator that ``cut_buf`` returns, and releases the GIL while it searches for a
    cut point.
    """

    params: ChunkerParams

    def __init__(self, params: ChunkerParams, seed: int = 0) -> None:
        params.validate()
        if type(seed) is not int or not 0 <= seed < SEED_LIMIT:
            # The seed is secret, so the message names the range and not the value.
            raise UsageError("invalid chunker seed: it must be an integer in 0 .. 2**64 - 1")
        self.params = params
        self._fastcdc = pyfastcdc.FastCDC(
            params.avg_size,
            min_size=params.min_size,
            max_size=params.max_size,
            normalized_chunking=cast(pyfastcdc.NormalizedChunking, params.normalization),
            seed=seed & _PYFASTCDC_SEED_MASK,
        )

    def cut(self, data: Buffer, final: bool) -> list[int]:
        """Return the lengths of the chunks cut from the start of ``data``.

        With ``final`` false, only settled chunks are returned: a chunk starting at
        offset ``o`` is settled when ``len(data) - o >= max_size``, because more bytes
        cannot move its cut point then. The caller keeps the remaining bytes and passes
        them again, followed by the next block. With ``final`` true the whole input is
        cut. Empty input returns an empty list.
        """
        view = _byte_view(data)
        total_size = len(view)
        if total_size == 0:
            return []

        # The next chunk starts at ``offset``. A chunk is computed only once it is settled,
        # so the bytes that the caller passes again are not hashed twice.
        last_settled_start = total_size - 1 if final else total_size - self.params.max_size
        lengths: list[int] = []
        offset = 0
        chunks = self._fastcdc.cut_buf(view)
        while offset <= last_settled_start:
            length = next(chunks).length
            lengths.append(length)
            offset += length
        return lengths

    def iter_stream(
        self, reader: BinaryIO, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> Iterator[memoryview]:
        """Read ``reader`` to its end and yield each chunk as a view into a reused buffer.

        A yielded view is valid only until the next iteration. The buffer is
        ``block_size + max_size`` bytes long, whatever the input size. Short reads (pipes,
        sockets) are read again until the buffer is full or the reader returns no bytes.
        ``reader`` needs ``readinto`` or ``read``; a non-blocking reader that has no data
        raises `UsageError`.
        """
        if type(block_size) is not int or block_size < 1:
            raise UsageError(f"invalid block_size {block_size!r}: it must be a positive integer")
        read_into = _read_into_function(reader)
        buffer = memoryview(bytearray(block_size + self.params.max_size))

        carried_size = 0
        end_of_input = False
        total_size = 0
        chunk_count = 0
        while not end_of_input:
            filled_size, end_of_input = _fill(read_into, buffer, carried_size)
            total_size += filled_size - carried_size

            offset = 0
            for length in self.cut(buffer[:filled_size], final=end_of_input):
                yield buffer[offset : offset + length]
                offset += length
                chunk_count += 1

            # Move the unsettled tail (less than max_size bytes) to the front.
            carried_size = filled_size - offset
            buffer[:carried_size] = buffer[offset:filled_size]
        logger.debug("chunked %d bytes into %d chunks", total_size, chunk_count)


def cut_points(
    path_or_reader: str | os.PathLike[str] | BinaryIO, params: ChunkerParams, seed: int = 0
) -> list[tuple[int, int]]:
    """Stream a file or reader through a `Chunker` and return (offset, length) per chunk."""
    chunker = Chunker(params, seed)
    if isinstance(path_or_reader, str | os.PathLike):
        with open(path_or_reader, "rb", buffering=0) as reader:
            return _cut_points_of_reader(chunker, cast(BinaryIO, reader))
    return _cut_points_of_reader(chunker, path_or_reader)


def _cut_points_of_reader(chunker: Chunker, reader: BinaryIO) -> list[tuple[int, int]]:
    points: list[tuple[int, int]] = []
    offset = 0
    for chunk in chunker.iter_stream(reader):
        points.append((offset, len(chunk)))
        offset += len(chunk)
    return points


def _byte_view(data: Buffer) -> memoryview:
    """Return a one-dimensional unsigned-byte view of ``data`` without copying it."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


ReadInto = Callable[[memoryview], int | None]


def _read_into_function(reader: BinaryIO) -> ReadInto:
    """Return ``reader.readinto``, or an equivalent built on ``reader.read``."""
    readinto = getattr(reader, "readinto", None)
    if callable(readinto):
        return cast(ReadInto, readinto)

    def read_into(target: memoryview) -> int | None:
        data = reader.read(len(target))
        if data is None:
            return None
        target[: len(data)] = data
        return len(data)

    return read_into


def _fill(read_into: ReadInto, buffer: memoryview, start: int) -> tuple[int, bool]:
    """Read into ``buffer[start:]`` until it is full or the input ends.

    Return the number of valid bytes in ``buffer`` and whether the input ended.
    """
    filled_size = start
    while filled_size < len(buffer):
        count = read_into(buffer[filled_size:])
        if count is None:
            raise UsageError(
                "the reader returned no data without reaching its end (non-blocking mode); "
                "pass a blocking file or pipe"
            )
        if count == 0:
            return filled_size, True
        filled_size += count
    return filled_size, False


# Pure-Python references, used by the tests to check gear hashes. They follow the
# published algorithm descriptions step by step and run at about 10 MB/s.


def reference_cut_2020(
    data: Buffer,
    params: ChunkerParams,
    gear_table: Sequence[int],
    masks: Sequence[int] | None = None,
    mask_bits: int | None = None,
) -> list[tuple[int, int, int]]:
    """Cut ``data`` with FastCDC 2020 in pure Python; return (offset, length, gear_hash).

    ``gear_table`` contains 256 unsigned 64-bit entries, already XORed with a seed if
    any; the shifted table is ``entry << 1`` modulo 2**64. ``masks`` is the 26-entry
    FastCDC mask table indexed by bit count (pyfastcdc's table by default), and
    ``mask_bits`` overrides round(log2(avg_size)). The gear hash is 0 for a final chunk
    no longer than ``min_size``, which is never hashed.
    """
    mask_s, mask_l = _select_masks(params, masks, mask_bits)
    gear = [entry & _UINT64_MASK for entry in gear_table]
    gear_shifted = [(entry << 1) & _UINT64_MASK for entry in gear]
    return _reference_cut(
        bytes(data),
        lambda chunk: _reference_chunk_2020(chunk, params, gear, gear_shifted, mask_s, mask_l),
    )


def reference_cut_2016(
    data: Buffer,
    params: ChunkerParams,
    gear_table: Sequence[int],
    masks: Sequence[int] | None = None,
    mask_bits: int | None = None,
) -> list[tuple[int, int, int]]:
    """Cut ``data`` with FastCDC 2016 (one byte per hash step) in pure Python.

    Arguments and result are those of `reference_cut_2020`. The cut points equal the
    2020 variant's; the gear hash reported at a cut can differ.
    """
    mask_s, mask_l = _select_masks(params, masks, mask_bits)
    gear = [entry & _UINT64_MASK for entry in gear_table]
    return _reference_cut(
        bytes(data), lambda chunk: _reference_chunk_2016(chunk, params, gear, mask_s, mask_l)
    )


def _select_masks(
    params: ChunkerParams, masks: Sequence[int] | None, mask_bits: int | None
) -> tuple[int, int]:
    """Return (mask_s, mask_l): the harder mask before avg_size and the easier one after."""
    params.validate()
    if masks is None:
        from pyfastcdc.py.constants import MASKS

        masks = MASKS
    if mask_bits is None:
        # floor(x + 0.5) rather than round(), which rounds halves to even.
        mask_bits = math.floor(math.log2(params.avg_size) + 0.5)
    return masks[mask_bits + params.normalization], masks[mask_bits - params.normalization]


def _reference_cut(
    data: bytes, cut_one: Callable[[memoryview], tuple[int, int]]
) -> list[tuple[int, int, int]]:
    view = memoryview(data)
    chunks: list[tuple[int, int, int]] = []
    offset = 0
    while offset < len(data):
        length, gear_hash = cut_one(view[offset:])
        chunks.append((offset, length, gear_hash))
        offset += length
    return chunks


def _search_bounds(remaining: int, params: ChunkerParams) -> tuple[int, int]:
    """Return (center, limit): mask_s applies below center, mask_l below limit."""
    limit = min(remaining, params.max_size)
    center = min(params.avg_size, limit)
    return center, limit


def _reference_chunk_2020(
    data: memoryview,
    params: ChunkerParams,
    gear: list[int],
    gear_shifted: list[int],
    mask_s: int,
    mask_l: int,
) -> tuple[int, int]:
    """Return (length, gear_hash) of the first chunk of ``data``."""
    if len(data) <= params.min_size:
        return len(data), 0
    center, limit = _search_bounds(len(data), params)

    # Two bytes per step: the even byte enters through the shifted table and is tested
    # against the shifted mask, which is the same test as one 2016 step.
    gear_hash = 0
    position = (params.min_size // 2) * 2
    for end, mask in (((center // 2) * 2, mask_s), ((limit // 2) * 2, mask_l)):
        mask_shifted = mask << 1
        while position < end:
            gear_hash = ((gear_hash << 2) + gear_shifted[data[position]]) & _UINT64_MASK
            if gear_hash & mask_shifted == 0:
                return position, gear_hash
            gear_hash = (gear_hash + gear[data[position + 1]]) & _UINT64_MASK
            if gear_hash & mask == 0:
                return position + 1, gear_hash
            position += 2
    return limit, gear_hash


def _reference_chunk_2016(
    data: memoryview, params: ChunkerParams, gear: list[int], mask_s: int, mask_l: int
) -> tuple[int, int]:
    """Return (length, gear_hash) of the first chunk of ``data``."""
    if len(data) <= params.min_size:
        return len(data), 0
    center, limit = _search_bounds(len(data), params)

    gear_hash = 0
    position = params.min_size
    for end, mask in ((center, mask_s), (limit, mask_l)):
        while position < end:
            gear_hash = ((gear_hash << 1) + gear[data[position]]) & _UINT64_MASK
            if gear_hash & mask == 0:
                return position, gear_hash
            position += 1
    return limit, gear_hash
