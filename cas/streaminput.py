"""Taking a snapshot of a byte stream, such as standard input, as one file.

``python -c 'torch.save(...)' | cas snapshot --stdin --stdin-name model.pt`` stores
the stream as the file ``model.pt`` of a new snapshot, cut into chunks and
deduplicated like any file. A stream has no stat, so the file gets mode 0o644,
the caller's uid and gid, and the current time as mtime and ctime. A name with
folders, such as ``ckpt/model.pt``, gets those folders (mode 0o755).

The snapshot's ``paths`` is empty and its meta key ``cas.stdin`` contains
the name. Its parent is the newest snapshot of a stream of the same name from the
same host. Nothing is reused from it, because a stream is always read whole.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

import blake3

from cas.archiver import (
    BLOCK_SIZE,
    Archiver,
    SnapshotOptions,
    SnapshotProgress,
    SnapshotResult,
)
from cas.blobstore import BlobWriter
from cas.errors import UsageError
from cas.parts import part_name
from cas.repository import Repository
from cas.snapshot import Snapshot, check_utf8
from cas.tree import Node
from cas.writeonly import visible_snapshots

log = logging.getLogger(__name__)

# A meta key of the snapshot: the file name under which the stream is stored.
STDIN_META = "cas.stdin"
_FILE_MODE = 0o644
_DIR_MODE = 0o755

ProgressCallback = Callable[[SnapshotProgress], None]


class ReadableStream(Protocol):
    """A binary stream that `StreamArchiver` reads: it needs ``readinto`` or ``read``."""

    def read(self, size: int = -1, /) -> bytes:
        """Return up to ``size`` bytes; an empty result means the end of the stream."""
        ...


def check_stream_name(name: str) -> tuple[str, ...]:
    """Validate a --stdin-name value and return its path components.

    The name is one component or a relative path of components separated by
    ``/``: not absolute, and no component empty, ``.`` or ``..``, and no NUL.
    """
    check_utf8(name, "--stdin-name")
    parts = tuple(name.split("/"))
    bad = not name or name.startswith("/") or "\0" in name
    if bad or any(part in ("", ".", "..") for part in parts):
        raise UsageError(
            f"invalid --stdin-name {name!r}: give a file name such as model.pt, or a relative "
            f"path without '.', '..' or empty components, such as ckpt/model.pt"
        )
    return parts


class StreamArchiver(Archiver):
    """Takes one snapshot of a byte stream, stored as a single file."""

    def __init__(
        self,
        repo: Repository,
        options: SnapshotOptions,
        stream: BinaryIO | ReadableStream,
        name: str,
        progress: ProgressCallback | None = None,
    ) -> None:
        super().__init__(repo, options, progress)
        self.stream = stream
        self.name = name
        self.parts = check_stream_name(name)
        if options.part or options.exclude or options.dereference:
            raise UsageError(
                "a stream snapshot takes no --part, --exclude, --exclude-file or --dereference"
            )

    def run_stream(self) -> SnapshotResult:
        """Read the stream to its end and store it under a shared lock; return the summary."""
        return self.run([])

    def _check_sources(self, paths: list[str]) -> list[str]:
        if paths:
            raise UsageError("a stream snapshot takes no PATH: the stream is its only input")
        return []

    def _find_parent(self, sources: list[str], host: str) -> Snapshot | None:
        if self.options.parent:
            # The base class resolves it, and rejects it for a write-only key.
            return super()._find_parent(sources, host)
        candidates = [
            snap
            for snap in visible_snapshots(self.repo)
            if snap.host == host and snap.meta.get(STDIN_META) == self.name
            if part_name(snap) is None
        ]
        return candidates[-1] if candidates else None

    def _meta(self) -> dict[str, str]:
        meta = super()._meta()
        meta[STDIN_META] = self.name
        return meta

    def _store_roots(
        self, sources: list[str], parent: Snapshot | None, writer: BlobWriter
    ) -> bytes:
        now_ns = time.time_ns()
        node = self._store_stream(os.fsencode(self.parts[-1]), now_ns, writer)
        # Wrap the file in its folders, innermost first.
        for folder in reversed(self.parts[:-1]):
            subtree = self._store_tree([node], writer)
            node = _stream_node(os.fsencode(folder), "dir", _DIR_MODE, now_ns, subtree=subtree)
            self.dirs += 1
        self.dirs += 1
        return self._store_tree([node], writer)

    def _store_stream(self, name: bytes, now_ns: int, writer: BlobWriter) -> Node:
        keys = self.repo.keys
        file_hash = blake3.blake3(max_threads=1)
        chunks: list[bytes] = []
        sizes: list[int] = []
        writer.reset_sampling()
        for block, lengths in self._stream_blocks():
            offset = 0
            for length in lengths:
                piece = block[offset : offset + length]
                chunk_id = keys.blob_id(piece)
                file_hash.update(piece)
                writer.add_chunk(chunk_id, piece)
                chunks.append(chunk_id)
                sizes.append(length)
                offset += length
            self.progress.bytes_read += offset
            self.progress.bytes_total += offset
            self._report()
        self.files += 1
        self.progress.files += 1
        log.info("read %d bytes from the stream %s", self.progress.bytes_read, self.name)
        return _stream_node(
            name,
            "file",
            _FILE_MODE,
            now_ns,
            size=sum(sizes),
            chunks=b"".join(chunks),
            sizes=tuple(sizes),
            digest=file_hash.digest(),
        )

    def _stream_blocks(self) -> Iterator[tuple[memoryview, list[int]]]:
        """Yield blocks of the stream and the chunk lengths cut from each.

        One buffer of ``BLOCK_SIZE`` plus the largest chunk is reused: the bytes
        after the last cut of a block are moved to its start before the next read.
        A yielded view is valid only until the next block is requested.
        """
        carry_room = self.chunker.params.max_size
        buffer = bytearray(BLOCK_SIZE + carry_room)
        view = memoryview(buffer)
        read = _reader(self.stream)
        filled = 0
        try:
            while True:
                end = filled + BLOCK_SIZE
                while filled < end:
                    count = read(view[filled:end])
                    if not count:
                        break
                    filled += count
                at_eof = filled < end
                lengths = self.chunker.cut(view[:filled], final=at_eof)
                used = sum(lengths)
                yield view[:used], lengths
                if at_eof:
                    return
                view[: filled - used] = view[used:filled]
                filled -= used
        finally:
            view.release()


def _reader(stream: BinaryIO | ReadableStream) -> Callable[[memoryview], int]:
    """Return a function that fills a view from the stream and returns the byte count."""
    readinto = getattr(stream, "readinto", None)
    if readinto is not None:

        def fill(target: memoryview) -> int:
            count = readinto(target)
            return int(count or 0)

        return fill

    def copy(target: memoryview) -> int:
        data = stream.read(len(target))
        target[: len(data)] = data
        return len(data)

    return copy


def _stream_node(name: bytes, kind: str, mode: int, now_ns: int, **extra: object) -> Node:
    values: dict[str, object] = {
        "name": name,
        "type": kind,
        "mode": mode,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "mtime_ns": now_ns,
        "ctime_ns": now_ns,
    }
    values.update(extra)
    return Node(**values)  # type: ignore[arg-type]
