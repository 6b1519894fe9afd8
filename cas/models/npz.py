"""Parse the members of a NumPy .npz file (a zip of .npy files).

Each member ``NAME.npy`` contains one array:

    b"\\x93NUMPY", u8 major, u8 minor, header length (u16 in version 1, u32 in 2 and 3),
    a Python dict literal {'descr': '<f4', 'fortran_order': False, 'shape': (3, 4)},
    then the array bytes

Only stored (uncompressed) members are tensors: the members of `numpy.savez_compressed` are
deflated, so their bytes are left to the normal chunker. The dict literal is read with
`ast.literal_eval`, which evaluates literals only, never code.
"""

from __future__ import annotations

import ast
import struct

from cas.models.layout import (
    ModelFormatError,
    ModelLayout,
    ReadAt,
    Region,
    TensorInfo,
    element_count,
    make_layout,
    read_exact,
)
from cas.models.zipdir import STORED, ZipMember, read_zip_directory

NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER_SIZE = 1 << 16
# (kind, item size) of the descr codes that a tensor can have; '<f4' is kind 'f', size 4.
_KINDS = {"f": "float", "i": "int", "u": "uint", "b": "bool", "c": "complex", "V": "void"}
_SHORT_NAMES = {
    ("float", 2): "F16",
    ("float", 4): "F32",
    ("float", 8): "F64",
    ("int", 1): "I8",
    ("int", 2): "I16",
    ("int", 4): "I32",
    ("int", 8): "I64",
    ("uint", 1): "U8",
    ("uint", 2): "U16",
    ("uint", 4): "U32",
    ("uint", 8): "U64",
    ("bool", 1): "BOOL",
}


def is_npz_directory(members: tuple[ZipMember, ...]) -> bool:
    """Return whether a zip's members all look like the .npy files of an npz."""
    return bool(members) and all(member.name.endswith(".npy") for member in members)


def parse_npz(read_at: ReadAt, file_size: int) -> ModelLayout:
    """Parse an npz's directory and the header of every stored .npy member."""
    directory = read_zip_directory(read_at, file_size)
    headers = list(directory.header_regions)
    tensors: list[TensorInfo] = []
    for member in directory.members:
        if member.method != STORED:
            continue
        tensor, header_size = _parse_npy(read_at, member)
        headers.append(Region(member.data_offset, header_size))
        tensors.append(tensor)
    return make_layout("npz", file_size, tensors, headers)


def _parse_npy(read_at: ReadAt, member: ZipMember) -> tuple[TensorInfo, int]:
    subject = f"npz member {member.name!r}"
    if member.size != member.compressed_size:
        raise ModelFormatError(f"{subject} is stored but its two sizes differ")
    prefix = read_exact(read_at, member.data_offset, min(12, member.size), subject)
    if prefix[:6] != NPY_MAGIC or len(prefix) < 10:
        raise ModelFormatError(f"{subject} is not a .npy array")
    major = prefix[6]
    if major == 1:
        (length,) = struct.unpack_from("<H", prefix, 8)
        start = 10
    elif major in (2, 3) and len(prefix) >= 12:
        (length,) = struct.unpack_from("<I", prefix, 8)
        start = 12
    else:
        raise ModelFormatError(f"{subject} has an unsupported .npy version {major}")
    if length > MAX_NPY_HEADER_SIZE or start + length > member.size:
        raise ModelFormatError(f"{subject} claims a .npy header of {length} bytes")
    text = read_exact(read_at, member.data_offset + start, length, subject)
    descr, shape = _parse_header_dict(text, subject)
    dtype, item_size, element_size = _parse_descr(descr, subject)
    header_size = start + length
    expected = element_count(shape, subject) * item_size
    if member.size - header_size != expected:
        raise ModelFormatError(
            f"{subject} has {member.size - header_size} data bytes, but dtype {descr} and "
            f"shape {shape} need {expected}"
        )
    name = member.name[: -len(".npy")]
    offset = member.data_offset + header_size
    return TensorInfo(name, dtype, shape, offset, expected, element_size), header_size


def _parse_header_dict(text: bytes, subject: str) -> tuple[str, tuple[int, ...]]:
    try:
        header = ast.literal_eval(text.decode("latin-1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise ModelFormatError(f"{subject} has an unreadable .npy header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelFormatError(f"{subject} .npy header is not a dict")
    descr = header.get("descr")
    shape = header.get("shape")
    if not isinstance(descr, str) or not isinstance(shape, tuple):
        raise ModelFormatError(f"{subject} .npy header lacks descr or shape")
    return descr, shape


def _parse_descr(descr: str, subject: str) -> tuple[str, int, int]:
    """Return (dtype name, item size, float element size) of a simple descr like '<f4'."""
    if len(descr) < 3 or descr[0] not in "<>|=" or descr[1] not in _KINDS:
        raise ModelFormatError(f"{subject} has an unsupported dtype {descr!r}")
    try:
        item_size = int(descr[2:])
    except ValueError as exc:
        raise ModelFormatError(f"{subject} has an unsupported dtype {descr!r}") from exc
    if not 1 <= item_size <= 64:
        raise ModelFormatError(f"{subject} has an unsupported dtype {descr!r}")
    kind = _KINDS[descr[1]]
    dtype = _SHORT_NAMES.get((kind, item_size), descr.lstrip("<>|="))
    element_size = item_size if kind == "float" and descr[0] != ">" else 0
    return dtype, item_size, element_size
