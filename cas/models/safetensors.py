"""Parse the header of a safetensors file.

Layout: an 8-byte little-endian header size N, N bytes of UTF-8 JSON, then the tensor data.
The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with
offsets relative to the first byte after the header, and may hold a ``"__metadata__"`` map of
strings. safetensors 0.4 itself rejects headers over 100,000,000 bytes; so does this parser.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from cas.models.layout import (
    MAX_TENSOR_COUNT,
    ModelFormatError,
    ModelLayout,
    ReadAt,
    Region,
    TensorInfo,
    element_count,
    make_layout,
    read_exact,
)

MAX_HEADER_SIZE = 100_000_000

# Bytes per element of each dtype the safetensors format names.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def looks_like_safetensors(head: bytes) -> bool:
    """Return whether the first bytes of a file look like a safetensors header."""
    if len(head) < 9:
        return False
    (size,) = struct.unpack_from("<Q", head)
    return 2 <= size <= MAX_HEADER_SIZE and head[8:9] == b"{"


def parse_safetensors(read_at: ReadAt, file_size: int) -> ModelLayout:
    """Parse a safetensors header and check every tensor's range against the file."""
    (header_size,) = struct.unpack("<Q", read_exact(read_at, 0, 8, "safetensors header size"))
    if header_size > MAX_HEADER_SIZE or 8 + header_size > file_size:
        raise ModelFormatError(
            f"safetensors header size {header_size} exceeds the file of {file_size} bytes "
            f"or the limit of {MAX_HEADER_SIZE}"
        )
    raw = read_exact(read_at, 8, header_size, "safetensors header")
    # NOTE: json.loads builds every object before the tensor limit is checked. A 10 MB
    # header of empty JSON objects took 280 MB of RSS (CPython 3.11), so a hostile header
    # at the 100 MB limit may take about 3 GB; the header size limit is the only bound.
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers invalid UTF-8, invalid JSON and an integer of more digits than
        # sys.get_int_max_str_digits(). RecursionError covers arrays nested too deeply.
        raise ModelFormatError(f"safetensors header is not valid JSON: {exc!r:.200}") from exc
    if not isinstance(header, dict):
        raise ModelFormatError("safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    if len(header) > MAX_TENSOR_COUNT:
        raise ModelFormatError(f"safetensors header lists {len(header)} tensors")

    data_start = 8 + header_size
    tensors = [
        _tensor(name, entry, data_start, file_size - data_start) for name, entry in header.items()
    ]
    return make_layout("safetensors", file_size, tensors, [Region(0, data_start)])


def _tensor(name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    subject = f"safetensors tensor {name!r}"
    if not isinstance(entry, dict):
        raise ModelFormatError(f"{subject} is not a JSON object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise ModelFormatError(f"{subject} has an unknown dtype {dtype!r}")
    if not isinstance(shape, list):
        raise ModelFormatError(f"{subject} has no shape list")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(value) is int for value in offsets)
    ):
        raise ModelFormatError(f"{subject} has no [begin, end] data_offsets")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise ModelFormatError(
            f"{subject}: data_offsets {begin}..{end} lie outside the {data_size} data bytes"
        )
    expected = element_count(shape, subject) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise ModelFormatError(
            f"{subject}: data_offsets cover {end - begin} bytes, but dtype {dtype} and shape "
            f"{shape} need {expected}"
        )
    element_size = DTYPE_SIZES[dtype] if dtype in FLOAT_DTYPES else 0
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, end - begin, element_size)
