"""Tensor-aligned chunk boundaries: cut a model file so that equal tensors give equal chunks.

`plan_segments` turns a `ModelLayout` into segments that cover the file in order. Each
tensor data region of at least the chunker's ``min_size`` is a segment of its own, cut into
fixed pieces of `piece_size` bytes counted from the region's first byte, with a shorter
last piece. Everything between those regions (headers, zip records, padding and the tensors
smaller than ``min_size``) forms CDC segments, and the FastCDC chunker restarts at the first
byte of each one. Since no chunk crosses a segment boundary, a tensor's pieces depend only
on its own bytes, wherever it sits in the file and whatever format wraps it.

Fixed pieces cost no rolling hash. Their size is the largest power of two not above the
chunker's ``avg_size``, raised to ``min_size`` if need be. That is 1 MiB with the default
chunker, close to FastCDC's mean chunk of 1.21 MiB on fp32 weights (docs/chunking.md).
The chunk count still grows by a CDC chunk per gap and a short last piece per tensor (146
chunks against 71 on all-MiniLM-L6-v2, by benchmarks/model_bench.py). A power of two is
also a multiple of every element size. Smaller pieces would
find no more duplicates in checkpoints, where a tensor changes as a whole or not at all,
and would grow the index.

Tensors under ``min_size`` (biases and norms, often 1-6 KiB) are not cut out one by one,
because a chunk per small tensor would add an index entry and a blob header per few KiB.
The cost: a change to one small tensor rewrites the CDC chunk around it, which contains its
neighbours between the two nearest large tensors (a few KiB to a few hundred KiB).

`PlannedCutter.cut` follows the streaming rule of `cas.chunker`: it returns only chunks
whose end is settled and leaves less than ``max_size`` bytes for the caller to pass again,
so any block size gives the same chunks.
"""

from __future__ import annotations

import bisect
import logging
import os
from dataclasses import dataclass

from cas.chunker import Buffer, Chunker, ChunkerParams
from cas.models import parse_layout
from cas.models.layout import ModelFormatError, ModelLayout, fd_reader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """A byte range cut as one unit: fixed pieces when ``piece_size`` > 0, else FastCDC."""

    offset: int
    size: int
    piece_size: int = 0
    element_size: int = 0

    @property
    def end(self) -> int:
        """The offset one past the segment's last byte."""
        return self.offset + self.size


def piece_size(params: ChunkerParams) -> int:
    """Return the fixed piece size for tensor data under these chunker parameters."""
    power = 1 << (params.avg_size.bit_length() - 1)
    return min(max(power, params.min_size), params.max_size)


def plan_segments(layout: ModelLayout, params: ChunkerParams) -> tuple[Segment, ...]:
    """Return segments covering the file; empty when no region is large enough to align."""
    piece = piece_size(params)
    segments: list[Segment] = []
    position = 0
    for region in layout.data_regions:
        if region.size < params.min_size:
            continue
        if region.offset > position:
            segments.append(Segment(position, region.offset - position))
        segments.append(Segment(region.offset, region.size, piece, region.element_size))
        position = region.end
    if not segments:
        return ()
    if position < layout.file_size:
        segments.append(Segment(position, layout.file_size - position))
    return tuple(segments)


class PlannedCutter:
    """Cuts a file by a segment plan; bytes past the plan's end get plain FastCDC."""

    def __init__(self, chunker: Chunker, segments: tuple[Segment, ...]) -> None:
        self.chunker = chunker
        self.segments = segments
        self._starts = [segment.offset for segment in segments]

    def _segment_at(self, offset: int) -> Segment:
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0 and offset < self.segments[index].end:
            return self.segments[index]
        # Past the plan (the file grew after its header was read): one open CDC segment.
        return Segment(offset, -1)

    def cut(self, data: Buffer, base: int, final: bool) -> tuple[list[int], list[int]]:
        """Return (chunk lengths, element sizes) cut from the start of ``data``.

        ``data`` starts at file offset ``base``. Arguments and the settled-chunk rule are
        those of `Chunker.cut`; no chunk crosses a segment boundary.
        """
        view = memoryview(data)
        total = len(view)
        lengths: list[int] = []
        element_sizes: list[int] = []
        position = 0
        while position < total:
            segment = self._segment_at(base + position)
            ends_here = segment.size >= 0 and segment.end - base <= total
            stop = segment.end - base if ends_here else total
            segment_final = final or ends_here
            if segment.piece_size:
                cut = _pieces(stop - position, segment.piece_size, segment_final)
                sizes = [segment.element_size] * len(cut)
            else:
                cut = self.chunker.cut(view[position:stop], final=segment_final)
                sizes = [0] * len(cut)
            lengths.extend(cut)
            element_sizes.extend(sizes)
            position += sum(cut)
            if position < stop:
                break
        return lengths, element_sizes


def _pieces(available: int, size: int, final: bool) -> list[int]:
    """Return full pieces of ``size`` from ``available`` bytes, and the rest when final."""
    pieces = [size] * (available // size)
    rest = available % size
    if final and rest:
        pieces.append(rest)
    return pieces


def tensor_cutter(chunker: Chunker, fd: int, path: str) -> PlannedCutter | None:
    """Return a tensor-aligned cutter for an open model file, or None to cut it plainly.

    A header that disagrees with the file is logged at DEBUG level and the file gets the
    plain chunker, so its bytes are stored all the same.
    """
    file_size = os.fstat(fd).st_size
    if file_size < chunker.params.min_size:
        return None
    try:
        layout = parse_layout(fd_reader(fd), file_size)
    except (ModelFormatError, OSError) as exc:
        # OSError: a descriptor without random access (a pipe); the reader then reports
        # any real read error itself.
        log.debug("%s: not cut at tensor boundaries: %s", path, exc)
        return None
    if layout is None:
        return None
    segments = plan_segments(layout, chunker.params)
    if not segments:
        return None
    log.debug(
        "%s: %s file cut at tensor boundaries, %d segments", path, layout.format, len(segments)
    )
    return PlannedCutter(chunker, segments)
