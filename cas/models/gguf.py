"""Parse the header of a GGUF file (versions 2 and 3), as llama.cpp and the gguf package write it.

Layout, all integers little-endian:

    "GGUF"  u32 version  u64 tensor_count  u64 kv_count
    kv_count x   (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml_type, u64 offset)
    padding to ``general.alignment`` (default 32), then the tensor data

A string is a u64 byte count and UTF-8 bytes. Tensor offsets are relative to the start of
the data and must be multiples of the alignment. A tensor's size follows from its ggml type:
``dim0 * ... / block_elements * block_bytes``. Version 1 used 32-bit counts and is rejected.
"""

from __future__ import annotations

import struct

from cas.models.layout import (
    MAX_DIMS,
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

MAGIC = b"GGUF"
MAX_KV_COUNT = 1_000_000
MAX_STRING_SIZE = 64 << 20
DEFAULT_ALIGNMENT = 32
_WINDOW_SIZE = 1 << 20

# ggml type number -> (name, elements per block, bytes per block), as GGML_QUANT_SIZES of the
# gguf package 0.19 lists them (a test compares). Q8_1 is left out, so a file with it falls
# back to the normal chunker: ggml uses it for intermediate results of matrix products, and
# we have not checked its block size against ggml's own source.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
}
FLOAT_ELEMENT_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}

# Metadata value types: fixed-size ones map to their struct format.
_FIXED_VALUE_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING = 8
_ARRAY = 9


class _Cursor:
    """Sequential reads through a window of the file, with every read bounded by its size."""

    def __init__(self, read_at: ReadAt, file_size: int, position: int) -> None:
        self.read_at = read_at
        self.file_size = file_size
        self.position = position
        self._window = b""
        self._window_start = 0

    def take(self, size: int, subject: str) -> bytes:
        if size < 0 or self.position + size > self.file_size:
            raise ModelFormatError(f"GGUF {subject} is truncated at offset {self.position}")
        start = self.position - self._window_start
        if start < 0 or start + size > len(self._window):
            self._window_start = self.position
            self._window = read_exact(
                self.read_at,
                self.position,
                min(max(size, _WINDOW_SIZE), self.file_size - self.position),
                f"GGUF {subject}",
            )
            start = 0
        self.position += size
        return self._window[start : start + size]

    def skip(self, size: int, subject: str) -> None:
        if size < 0 or self.position + size > self.file_size:
            raise ModelFormatError(f"GGUF {subject} is truncated at offset {self.position}")
        self.position += size

    def unpack(self, fmt: str, subject: str) -> int:
        value: int = struct.unpack(fmt, self.take(struct.calcsize(fmt), subject))[0]
        return value

    def string(self, subject: str) -> str:
        size = self.unpack("<Q", subject)
        if size > MAX_STRING_SIZE:
            raise ModelFormatError(f"GGUF {subject} claims {size} bytes")
        try:
            return self.take(size, subject).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelFormatError(f"GGUF {subject} is not UTF-8: {exc}") from exc


def looks_like_gguf(head: bytes) -> bool:
    """Return whether the first bytes of a file carry the GGUF magic."""
    return head[:4] == MAGIC


def parse_gguf(read_at: ReadAt, file_size: int) -> ModelLayout:
    """Parse a GGUF header and check every tensor's range against the file."""
    cursor = _Cursor(read_at, file_size, 0)
    if cursor.take(4, "magic") != MAGIC:
        raise ModelFormatError("not a GGUF file: the magic bytes differ")
    version = cursor.unpack("<I", "version")
    if version not in (2, 3):
        raise ModelFormatError(f"GGUF version {version} is not supported (only 2 and 3)")
    tensor_count = cursor.unpack("<Q", "tensor count")
    kv_count = cursor.unpack("<Q", "metadata count")
    if tensor_count > MAX_TENSOR_COUNT or kv_count > MAX_KV_COUNT:
        raise ModelFormatError(f"GGUF header claims {tensor_count} tensors, {kv_count} keys")

    alignment = DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = cursor.string("metadata key")
        value_type = cursor.unpack("<I", "metadata type")
        value = _read_value(cursor, value_type, key, depth=0)
        if key == "general.alignment":
            if value_type != 4 or not isinstance(value, int) or value <= 0 or value % 8:
                raise ModelFormatError(f"GGUF general.alignment {value!r} is invalid")
            alignment = value

    infos = [_read_tensor_info(cursor) for _ in range(tensor_count)]
    data_start = -(-cursor.position // alignment) * alignment
    tensors = [_tensor(info, data_start, alignment) for info in infos]
    return make_layout("gguf", file_size, tensors, [Region(0, min(data_start, file_size))])


def _read_value(cursor: _Cursor, value_type: int, key: str, depth: int) -> object:
    """Read one metadata value; return it for scalars and None for strings and arrays."""
    fmt = _FIXED_VALUE_FORMATS.get(value_type)
    if fmt is not None:
        return cursor.unpack(fmt, f"value of {key!r}")
    if value_type == _STRING:
        cursor.string(f"value of {key!r}")
        return None
    if value_type != _ARRAY or depth > 1:
        raise ModelFormatError(f"GGUF metadata {key!r} has an invalid type {value_type}")
    item_type = cursor.unpack("<I", f"array type of {key!r}")
    count = cursor.unpack("<Q", f"array length of {key!r}")
    if count > cursor.file_size:
        raise ModelFormatError(f"GGUF array {key!r} claims {count} items")
    item_fmt = _FIXED_VALUE_FORMATS.get(item_type)
    if item_fmt is not None:
        cursor.skip(count * struct.calcsize(item_fmt), f"array {key!r}")
        return None
    for _ in range(count):
        _read_value(cursor, item_type, key, depth + 1)
    return None


def _read_tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.string("tensor name")
    dim_count = cursor.unpack("<I", f"dimension count of {name!r}")
    if dim_count > MAX_DIMS:
        raise ModelFormatError(f"GGUF tensor {name!r} has {dim_count} dimensions")
    shape = tuple(cursor.unpack("<Q", f"dimensions of {name!r}") for _ in range(dim_count))
    ggml_type = cursor.unpack("<I", f"type of {name!r}")
    offset = cursor.unpack("<Q", f"offset of {name!r}")
    return name, shape, ggml_type, offset


def _tensor(
    info: tuple[str, tuple[int, ...], int, int], data_start: int, alignment: int
) -> TensorInfo:
    name, shape, ggml_type, offset = info
    subject = f"GGUF tensor {name!r}"
    if ggml_type not in GGML_TYPES:
        raise ModelFormatError(f"{subject} has an unknown ggml type {ggml_type}")
    type_name, block_elements, block_size = GGML_TYPES[ggml_type]
    count = element_count(shape, subject)
    if shape and shape[0] % block_elements:
        raise ModelFormatError(
            f"{subject}: first dimension {shape[0]} is not a multiple of the {type_name} "
            f"block of {block_elements}"
        )
    if offset % alignment:
        raise ModelFormatError(f"{subject}: offset {offset} is not a multiple of {alignment}")
    size = count // block_elements * block_size
    element_size = FLOAT_ELEMENT_SIZES.get(type_name, 0)
    return TensorInfo(name, type_name, shape, data_start + offset, size, element_size)
