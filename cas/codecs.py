"""Blob codecs and filters: byte grouping, lz4 and zstd, and the one decode path.

A blob's payload is its plaintext passed through a filter, then a codec:

    plaintext --filter--> filtered bytes (same length) --codec--> payload

The filter value of a byte-grouping filter is the element size k (2, 4 or 8).
It stores byte 0 of every k-byte element, then byte 1 of every element, and so
on, so that bytes of equal significance (the sign and exponent bytes of floats)
stand together, where a compressor finds their repetition. The last
``len % k`` bytes, which are no whole element, stay as they are at the end.

`decode_payload` is the only place where stored payloads are turned back into
plaintext: every reader reaches it through `cas.pack.BlobOpener.open`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import IntEnum

import lz4.block
import zstandard

from cas.errors import IntegrityError, UnsupportedFormatError, UsageError


class Codec(IntEnum):
    """Compression applied to a blob's filtered plaintext before encryption."""

    NONE = 0
    LZ4 = 1
    ZSTD = 2


FILTER_NONE = 0
# Byte-grouping filters, named by their element size in bytes: 2 for bf16 and
# fp16, 4 for fp32, 8 for fp64.
BYTE_GROUP_SIZES = (2, 4, 8)
KNOWN_FILTERS = (FILTER_NONE, *BYTE_GROUP_SIZES)

CODEC_NAMES = {Codec.NONE: "none", Codec.LZ4: "lz4", Codec.ZSTD: "zstd"}
# Level 1 saved more than level 3 on byte-grouped fp32 and bf16 weights (17.1 against
# 16.0 %, 31.5 against 29.2 %) at less CPU: see docs/benchmarks.md.
DEFAULT_ZSTD_LEVEL = 1
MIN_ZSTD_LEVEL = 1
MAX_ZSTD_LEVEL = 19
# A zstd frame may ask for a window of up to this many bytes. The writer's
# frames never exceed the blob size, and the largest blob is 64 MiB.
_MAX_ZSTD_WINDOW = 64 << 20

BYTE_GROUP_AUTO = "auto"
BYTE_GROUP_OFF = "off"


@dataclass(frozen=True)
class Compression:
    """The encoding of new blobs: codec, zstd level and byte-grouping rule.

    ``byte_group`` is ``"auto"`` (group chunks whose element size the chunker
    reports), ``"off"``, or ``"always:K"`` (group every chunk with element size K
    unless the chunker reports another one).
    """

    codec: Codec = Codec.LZ4
    level: int = 0
    byte_group: str = BYTE_GROUP_OFF

    def __str__(self) -> str:
        name = CODEC_NAMES[self.codec]
        return f"{name}:{self.level}" if self.codec == Codec.ZSTD else name

    @property
    def fallback_element_size(self) -> int:
        """Element size used for chunks of unknown element size (0: no grouping)."""
        if self.byte_group.startswith("always:"):
            return int(self.byte_group.partition(":")[2])
        return 0

    def element_size(self, known: int) -> int:
        """Return the byte-grouping element size for a chunk whose known size is ``known``."""
        if self.byte_group == BYTE_GROUP_OFF:
            return 0
        if known in BYTE_GROUP_SIZES:
            return known
        return self.fallback_element_size


# The compression of a repository whose config predates the choice.
LEGACY_COMPRESSION = Compression(Codec.LZ4, 0, BYTE_GROUP_OFF)
# The compression of a new repository. zstd with byte grouping saved 15 % of fp32
# and 31 % of bf16 weights but cost 80 % more snapshot CPU, so lz4 stays the
# default. docs/benchmarks.md has the measurements.
DEFAULT_COMPRESSION = Compression(Codec.LZ4, 0, BYTE_GROUP_OFF)


def default_byte_group(codec: Codec) -> str:
    """Return the byte-grouping rule that `cas init` pairs with ``codec`` without --byte-group.

    Grouping pays with zstd, whose entropy coder uses the repetitive exponent bytes.
    With lz4 it gained half as much for about the same CPU, so it stays off there.
    """
    return BYTE_GROUP_AUTO if codec == Codec.ZSTD else BYTE_GROUP_OFF


def parse_codec(text: str, option: str = "--compression") -> tuple[Codec, int]:
    """Parse ``lz4``, ``zstd``, ``zstd:LEVEL`` or ``none`` into a codec and a zstd level."""
    name, sep, level_text = text.partition(":")
    if name == "zstd":
        if not sep:
            return Codec.ZSTD, DEFAULT_ZSTD_LEVEL
        if level_text.isdigit() and MIN_ZSTD_LEVEL <= int(level_text) <= MAX_ZSTD_LEVEL:
            return Codec.ZSTD, int(level_text)
        raise UsageError(
            f"invalid {option} {text!r}: the zstd level must be an integer from "
            f"{MIN_ZSTD_LEVEL} to {MAX_ZSTD_LEVEL}, as in zstd:{DEFAULT_ZSTD_LEVEL}"
        )
    if not sep and name in ("lz4", "none"):
        return (Codec.LZ4 if name == "lz4" else Codec.NONE), 0
    raise UsageError(f"invalid {option} {text!r}: write lz4, zstd, zstd:LEVEL or none")


def parse_byte_group(text: str, option: str = "--byte-group", allow_always: bool = True) -> str:
    """Validate a byte-grouping rule: ``auto``, ``off`` or, where allowed, ``always:K``."""
    if text in (BYTE_GROUP_AUTO, BYTE_GROUP_OFF):
        return text
    name, sep, size_text = text.partition(":")
    if allow_always and name == "always" and sep:
        if size_text in ("2", "4", "8"):
            return text
        raise UsageError(f"invalid {option} {text!r}: the element size K must be 2, 4 or 8")
    choices = "auto, off or always:K (K = 2, 4 or 8)" if allow_always else "auto or off"
    raise UsageError(f"invalid {option} {text!r}: write {choices}")


def check_codec_and_filter(codec: int, filt: int, where: str) -> None:
    """Raise `UnsupportedFormatError` naming a codec or filter value this version cannot read."""
    if codec not in (Codec.NONE, Codec.LZ4, Codec.ZSTD):
        raise UnsupportedFormatError(f"{where} uses unknown codec {codec}")
    if filt not in KNOWN_FILTERS:
        raise UnsupportedFormatError(f"{where} uses unknown filter {filt}")


# Byte grouping


def group_bytes(
    data: bytes | bytearray | memoryview, element_size: int, out: bytearray
) -> memoryview:
    """Write the byte-grouped form of ``data`` into ``out``; return a view of its first bytes."""
    # Imported here: numpy takes 50 to 110 ms to import, which every cas command would
    # pay at start-up, and only byte grouping needs it.
    import numpy as np

    size = len(data)
    body = size - size % element_size
    count = body // element_size
    source = np.frombuffer(data, dtype=np.uint8, count=body).reshape(count, element_size)
    target = np.frombuffer(out, dtype=np.uint8, count=body).reshape(element_size, count)
    # One strided copy per byte position: about 3 GB/s in numpy, where a single
    # transposed copy runs at half that.
    for position in range(element_size):
        target[position] = source[:, position]
    view = memoryview(out)[:size]
    view[body:] = memoryview(data)[body:]
    return view


def ungroup_bytes(
    data: bytes | bytearray | memoryview, element_size: int, out: bytearray | memoryview
) -> memoryview:
    """Reverse `group_bytes`: write the plaintext of grouped ``data`` into ``out``."""
    import numpy as np

    size = len(data)
    body = size - size % element_size
    count = body // element_size
    source = np.frombuffer(data, dtype=np.uint8, count=body).reshape(element_size, count)
    target = np.frombuffer(out, dtype=np.uint8, count=body).reshape(count, element_size)
    # Stacking the planes as columns measured 3.4 GB/s; a transposed copy
    # measured 0.4 GB/s for k = 2.
    np.stack(list(source), axis=1, out=target)
    view = memoryview(out)[:size]
    view[body:] = memoryview(data)[body:]
    return view


# Compressors and decompressors are not thread-safe, and creating a zstd
# context per blob costs more than compressing a small tree: one per thread.
_local = threading.local()


def _zstd_compressor(level: int) -> zstandard.ZstdCompressor:
    compressors: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "compressors", None)
    if compressors is None:
        compressors = _local.compressors = {}
    compressor = compressors.get(level)
    if compressor is None:
        compressor = compressors[level] = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=False
        )
    return compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor(
            max_window_size=_MAX_ZSTD_WINDOW
        )
    return decompressor


def compress_payload(data: bytes | bytearray | memoryview, codec: Codec, level: int) -> bytes:
    """Compress ``data`` with ``codec``: an lz4 block without size prefix, or one zstd frame."""
    if codec == Codec.LZ4:
        packed: bytes = lz4.block.compress(data, store_size=False)
        return packed
    if codec == Codec.ZSTD:
        return _zstd_compressor(level).compress(data)
    raise ValueError(f"codec {codec} does not compress")


class BlobEncoder:
    """Filters and compresses blob plaintexts for one writer; not thread-safe.

    The grouping buffer is allocated once with room for the largest blob.
    """

    def __init__(self, codec: Codec, level: int, max_size: int) -> None:
        self.codec = codec
        self.level = level
        self._buffer = bytearray(max_size) if codec != Codec.NONE else bytearray()

    def encode(
        self, data: bytes | bytearray | memoryview, element_size: int = 0
    ) -> tuple[bytes, Codec, int] | None:
        """Return (payload, codec, filter), or None when the blob is best stored raw.

        ``element_size`` 2, 4 or 8 groups the bytes first. The result is None
        for `Codec.NONE`, and when the payload would not be shorter than ``data``.
        """
        if self.codec == Codec.NONE:
            return None
        filt = FILTER_NONE
        source: bytes | bytearray | memoryview = data
        if element_size in BYTE_GROUP_SIZES and len(data) >= element_size:
            if len(self._buffer) < len(data):
                self._buffer = bytearray(len(data))
            source = group_bytes(data, element_size, self._buffer)
            filt = element_size
        packed = compress_payload(source, self.codec, self.level)
        if len(packed) >= len(data):
            return None
        return packed, self.codec, filt


# Decoding: the one path from a stored payload back to plaintext


def _zstd_decompress(payload: bytes | memoryview, raw_size: int, where: str) -> bytes:
    """Decompress one zstd frame of exactly ``raw_size`` bytes, allocating no more."""
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError:
        raise IntegrityError(f"{where} has no valid zstd frame header") from None
    # The frame header's content size sizes the output buffer, so it must be
    # stated and equal to the authenticated raw size before anything is allocated.
    if params.content_size != raw_size:
        raise IntegrityError(
            f"{where} has a zstd frame of {params.content_size} bytes, expected {raw_size}"
        )
    if params.dict_id != 0:
        raise IntegrityError(f"{where} needs zstd dictionary {params.dict_id}")
    try:
        plain = _zstd_decompressor().decompress(
            payload, max_output_size=raw_size, allow_extra_data=False
        )
    except zstandard.ZstdError:
        raise IntegrityError(f"{where} does not decompress") from None
    return plain


def decode_payload(
    payload: bytes | memoryview,
    codec: int,
    filt: int,
    raw_size: int,
    where: str,
    out: bytearray | memoryview | None = None,
) -> bytes | memoryview:
    """Decompress and unfilter an authenticated payload into exactly ``raw_size`` bytes.

    With ``out`` (at least ``raw_size`` bytes), a filtered blob is unfiltered into
    it and a view of it is returned. Raises `UnsupportedFormatError` for an
    unknown codec or filter, `IntegrityError` for a payload that does not decode
    to ``raw_size`` bytes.
    """
    check_codec_and_filter(codec, filt, where)
    data: bytes | memoryview
    if codec == Codec.LZ4:
        try:
            data = lz4.block.decompress(payload, uncompressed_size=raw_size)
        except lz4.block.LZ4BlockError:
            raise IntegrityError(f"{where} does not decompress") from None
    elif codec == Codec.ZSTD:
        data = _zstd_decompress(payload, raw_size, where)
    else:
        data = payload
    if len(data) != raw_size:
        raise IntegrityError(f"{where} has {len(data)} bytes, expected {raw_size}")
    if filt == FILTER_NONE:
        return data
    target = out if out is not None and len(out) >= raw_size else bytearray(raw_size)
    return ungroup_bytes(data, filt, target)
