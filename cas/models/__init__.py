"""Model file formats: find where a file's tensors lie without loading them.

`parse_layout` recognises safetensors, GGUF (versions 2 and 3), zip-based PyTorch files
(``torch.save``) and NumPy .npz files by their first bytes and returns a `ModelLayout`,
or None for any other file. A file that starts like one of them but whose header
disagrees with the file raises `ModelFormatError`. Nothing here imports torch or numpy.
"""

from __future__ import annotations

import os

from cas.models.gguf import looks_like_gguf, parse_gguf
from cas.models.layout import ModelFormatError, ModelLayout, ReadAt, Region, TensorInfo
from cas.models.npz import is_npz_directory, parse_npz
from cas.models.safetensors import looks_like_safetensors, parse_safetensors
from cas.models.torchzip import find_pickle_member, parse_torch_zip
from cas.models.zipdir import looks_like_zip, read_zip_directory

__all__ = [
    "MODEL_SUFFIXES",
    "ModelFormatError",
    "ModelLayout",
    "ReadAt",
    "Region",
    "TensorInfo",
    "parse_file",
    "parse_layout",
]

HEAD_SIZE = 16
"""Bytes that `parse_layout` reads first to recognise a format."""

MODEL_SUFFIXES = {
    ".safetensors": "safetensors",
    ".gguf": "gguf",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
    ".npz": "npz",
}
"""File name endings that name a model format; ``.bin`` counts only when it is a zip."""


def parse_layout(read_at: ReadAt, file_size: int) -> ModelLayout | None:
    """Recognise a model file by its first bytes and parse its layout.

    Return None when the file is not a model format that this package recognises. Raise
    `ModelFormatError` when it starts like one but its header is invalid or disagrees
    with ``file_size``.
    """
    head = read_at(0, min(HEAD_SIZE, file_size))
    if looks_like_gguf(head):
        return parse_gguf(read_at, file_size)
    if looks_like_zip(head):
        directory = read_zip_directory(read_at, file_size)
        if find_pickle_member(directory) is not None:
            return parse_torch_zip(read_at, file_size)
        if is_npz_directory(directory.members):
            return parse_npz(read_at, file_size)
        return None
    if looks_like_safetensors(head):
        return parse_safetensors(read_at, file_size)
    return None


def parse_file(path: str | os.PathLike[str]) -> ModelLayout | None:
    """Open a file and return `parse_layout` of it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        return parse_layout(lambda offset, size: os.pread(fd, size, offset), file_size)
    finally:
        os.close(fd)
