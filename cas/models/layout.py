"""The layout of a model file: where its tensors' bytes and its header bytes lie.

Every parser in `cas.models` returns a `ModelLayout`. Offsets are absolute byte offsets in
the file, sizes are in bytes, and every range lies inside the file: a parser checks that
before it returns, and raises `ModelFormatError` for a header that disagrees with the file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cas.errors import CasError

ReadAt = Callable[[int, int], bytes]
"""``read_at(offset, size)``: up to ``size`` bytes from ``offset``; fewer only at the end."""

MAX_TENSOR_COUNT = 1_000_000
"""Most tensors a header may declare; real checkpoints have tens of thousands at most."""

MAX_DIMS = 16
"""Most dimensions of one tensor; GGUF allows 4 and PyTorch 64, checkpoints use at most 5."""


class ModelFormatError(CasError):
    """A model file's header is truncated or disagrees with the file (offsets, sizes, dtypes)."""


@dataclass(frozen=True)
class TensorInfo:
    """One named tensor: its dtype, shape and the byte range of its data in the file.

    ``element_size`` is the width of one float element in bytes (2 for F16 and BF16, 4 for
    F32, 8 for F64), and 0 for integer, boolean, quantized or unknown dtypes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    size: int
    element_size: int = 0

    @property
    def end(self) -> int:
        """The offset one past the tensor's last byte."""
        return self.offset + self.size


@dataclass(frozen=True)
class Region:
    """A byte range of the file; ``element_size`` as in `TensorInfo`, 0 for headers."""

    offset: int
    size: int
    element_size: int = 0

    @property
    def end(self) -> int:
        """The offset one past the region's last byte."""
        return self.offset + self.size


@dataclass(frozen=True)
class ModelLayout:
    """A parsed model file.

    ``tensors`` are the named tensors in file order. ``data_regions`` are the byte ranges
    that hold tensor data, sorted and disjoint: one per tensor for safetensors, GGUF and
    npz, one per storage for PyTorch files, where several tensors may view one storage.
    ``header_regions`` are the byte ranges of headers, directories and pickles.
    """

    format: str
    file_size: int
    tensors: tuple[TensorInfo, ...]
    data_regions: tuple[Region, ...]
    header_regions: tuple[Region, ...]


def read_exact(read_at: ReadAt, offset: int, size: int, subject: str) -> bytes:
    """Read exactly ``size`` bytes at ``offset``; raise `ModelFormatError` on a short read."""
    data = read_at(offset, size)
    if len(data) != size:
        raise ModelFormatError(
            f"{subject} is truncated: {size} bytes expected at offset {offset}, {len(data)} read"
        )
    return data


def element_count(shape: Iterable[int], subject: str) -> int:
    """Return the product of a shape, checking that it has few dimensions, none negative."""
    dims = tuple(shape)
    if len(dims) > MAX_DIMS:
        raise ModelFormatError(f"{subject} has {len(dims)} dimensions, more than {MAX_DIMS}")
    for dim in dims:
        if type(dim) is not int or dim < 0:
            raise ModelFormatError(f"{subject} has an invalid dimension {dim!r}")
    return math.prod(dims)


def check_regions(regions: Iterable[Region], file_size: int, subject: str) -> tuple[Region, ...]:
    """Sort regions and check that they lie inside the file and do not overlap."""
    ordered = sorted(regions, key=lambda region: (region.offset, region.size))
    previous_end = 0
    for region in ordered:
        if region.offset < 0 or region.size < 0 or region.end > file_size:
            raise ModelFormatError(
                f"{subject}: range {region.offset}..{region.end} lies outside the file "
                f"of {file_size} bytes"
            )
        if region.offset < previous_end:
            raise ModelFormatError(
                f"{subject}: range {region.offset}..{region.end} overlaps the range "
                f"ending at {previous_end}"
            )
        previous_end = region.end
    return tuple(ordered)


def make_layout(
    format_name: str,
    file_size: int,
    tensors: list[TensorInfo],
    header_regions: list[Region],
    data_regions: list[Region] | None = None,
) -> ModelLayout:
    """Check the ranges of a parse and build its layout.

    Without ``data_regions``, each tensor is its own data region, so tensors must not
    overlap each other or a header region.
    """
    if data_regions is None:
        data_regions = [Region(t.offset, t.size, t.element_size) for t in tensors]
    for tensor in tensors:
        if tensor.offset < 0 or tensor.size < 0 or tensor.end > file_size:
            raise ModelFormatError(
                f"{format_name} tensor {tensor.name!r}: range {tensor.offset}..{tensor.end} "
                f"lies outside the file of {file_size} bytes"
            )
    data = check_regions(data_regions, file_size, f"{format_name} tensor data")
    headers = check_regions(header_regions, file_size, f"{format_name} header")
    check_regions([*data, *headers], file_size, f"{format_name} header and tensor data")
    ordered = sorted(tensors, key=lambda tensor: (tensor.offset, tensor.name))
    return ModelLayout(format_name, file_size, tuple(ordered), data, headers)


def fd_reader(fd: int) -> ReadAt:
    """Return a `ReadAt` over an open file descriptor, reading again after short reads."""

    def read_at(offset: int, size: int) -> bytes:
        parts: list[bytes] = []
        while size > 0:
            data = os.pread(fd, size, offset)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            size -= len(data)
        return b"".join(parts)

    return read_at
