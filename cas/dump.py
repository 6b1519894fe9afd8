"""Writing part of a snapshot to a byte stream: one file as it is, or a tar stream.

Content is verified as it streams: every chunk is authenticated and matched
to its id by `Repository.read_blob`, and the file's BLAKE3 digest is checked
before its last chunk is written. A mismatch raises `IntegrityError`. By
then the earlier bytes are already in the output and cannot be recalled, but
the output always lacks at least the file's last chunk, so it is never a
complete-looking copy of damaged content.

A folder becomes a tar stream (`tarfile` in stream mode ``w|``, POSIX pax
format). It records modes, times to the nanosecond (in pax headers), owner
ids and names, symlinks, device nodes and fifos. Paths that shared an inode
at snapshot time become hard links. Extended attributes and sockets are left
out. Member names are the snapshot paths without the leading "/", so
``tar -x`` in an empty folder recreates that part of the snapshot's layout.
"""

from __future__ import annotations

import logging
import os
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import blake3

from cas.errors import IntegrityError, NotFoundError
from cas.locks import RepositoryLock
from cas.paths import Located, locate
from cas.repository import Repository
from cas.snapshot import Snapshot
from cas.tree import Node

log = logging.getLogger(__name__)

# Bytes tarfile copies per read from a member's content; its default is 16 KiB.
_COPY_SIZE = 1 << 20
_TAR_TYPES = {
    "fifo": tarfile.FIFOTYPE,
    "chardev": tarfile.CHRTYPE,
    "blockdev": tarfile.BLKTYPE,
}


@dataclass(frozen=True)
class DumpResult:
    """Summary of a dump: what was written, as which format, and how many bytes."""

    path: str
    format: str  # "file" or "tar"
    files: int
    bytes_written: int
    seconds: float


class _CountingWriter:
    """Passes writes on to ``out`` and counts the bytes."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.count = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.count += len(data)
        return len(data)


def iter_content(repo: Repository, node: Node, shown: str) -> Iterator[bytes]:
    """Yield a file's verified content chunk by chunk; the last only once the digest matches."""
    hasher = blake3.blake3()
    held: bytes | None = None
    for chunk_id, size in zip(node.chunk_ids, node.sizes, strict=True):
        try:
            data = repo.read_blob(chunk_id)
        except NotFoundError as exc:
            raise IntegrityError(f"cannot dump {shown}: {exc}") from None
        except IntegrityError as exc:
            raise IntegrityError(f"cannot dump {shown}: {exc}") from None
        if len(data) != size:
            raise IntegrityError(
                f"cannot dump {shown}: chunk {chunk_id.hex()} has {len(data)} bytes, "
                f"the tree records {size}"
            )
        hasher.update(data)
        if held is not None:
            yield held
        held = data
    if hasher.digest() != node.digest:
        raise IntegrityError(
            f"cannot dump {shown}: its content does not match the digest recorded in the snapshot"
        )
    if held is not None:
        yield held


class _ContentReader:
    """A file-like view of `iter_content` that returns exactly the bytes asked for until EOF.

    Each read copies only the bytes it returns, whatever the chunk size.
    """

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks
        self.chunk = b""
        self.offset = 0

    def read(self, size: int = -1, /) -> bytes:
        """Return the next ``size`` bytes (all the rest when negative), fewer only at the end."""
        if size < 0:
            size = sys.maxsize
        parts = []
        while size > 0:
            if self.offset == len(self.chunk):
                next_chunk = next(self.chunks, None)
                if next_chunk is None:
                    break
                self.chunk, self.offset = next_chunk, 0
            part = self.chunk[self.offset : self.offset + size]
            self.offset += len(part)
            size -= len(part)
            parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)


def dump(
    repo: Repository,
    snapshot: Snapshot,
    path: str,
    out: BinaryIO,
    archive: bool = False,
    wait: float = 0.0,
) -> DumpResult:
    """Write ``path`` of the snapshot to ``out``: a file's bytes, or a tar stream.

    A folder (or the root) is always written as tar; ``archive`` also writes a
    single file as a tar stream of one member. Holds a shared lock, waiting
    up to ``wait`` seconds for a conflicting one, so gc deletes no pack while
    it is read.
    """
    started = time.monotonic()
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="dump", wait=wait):
        repo.index.sync()
        located = locate(repo, snapshot.tree_id, path)
        writer = _CountingWriter(out)
        node = located.node
        if node is not None and node.type == "file" and not archive:
            for chunk in iter_content(repo, node, located.shown):
                writer.write(chunk)
            files, kind = 1, "file"
        elif node is not None and node.type not in ("file", "dir"):
            raise NotFoundError(
                f"path {located.shown} is a {node.type}; only files and folders can be dumped"
            )
        else:
            files, kind = _write_tar(repo, snapshot, located, writer), "tar"
    seconds = time.monotonic() - started
    log.info("dumped %s as %s: %d files, %d bytes", located.shown, kind, files, writer.count)
    return DumpResult(located.shown, kind, files, writer.count, seconds)


def _write_tar(
    repo: Repository, snapshot: Snapshot, located: Located, writer: _CountingWriter
) -> int:
    """Write the located file or folder as a tar stream; return the number of file members."""
    links: dict[tuple[int, int], tuple[str, Node]] = {}
    files = 0
    # Stream mode only calls write(), though the stubs ask for a seekable file
    # object, and the stubs lack ``copybufsize``, which `tarfile.TarFile` takes.
    stream: Any = writer
    options: dict[str, Any] = {"copybufsize": _COPY_SIZE}
    with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT, **options) as tar:
        for name, node in _walk(repo, snapshot, located):
            info = _tar_info(name, node, links)
            if info is None:
                continue
            if info.type == tarfile.REGTYPE:
                reader = _ContentReader(iter_content(repo, node, "/" + name))
                tar.addfile(info, reader)
                files += 1
            else:
                tar.addfile(info)
    return files


def _walk(repo: Repository, snapshot: Snapshot, located: Located) -> Iterator[tuple[str, Node]]:
    """Yield (member name, node) for the located entry and everything below it, depth first.

    A folder's content follows the folder directly: GNU tar 1.34 sets a
    folder's times once the stream leaves it, so content that came later
    would change them again. A stack of iterators, not recursion, walks the
    trees, because a stored tree can nest deeper than Python's recursion
    limit allows.
    """
    prefix = "/".join(os.fsdecode(part) for part in located.parts)
    stack: list[tuple[str, Iterator[Node]]] = []
    if located.node is None:
        stack.append(("", iter(repo.load_tree(snapshot.tree_id))))
    else:
        yield prefix, located.node
        if located.node.type == "dir":
            stack.append((prefix, iter(repo.load_tree(located.node.subtree))))
    while stack:
        folder, nodes = stack[-1]
        node = next(nodes, None)
        if node is None:
            stack.pop()
            continue
        name = f"{folder}/{os.fsdecode(node.name)}" if folder else os.fsdecode(node.name)
        yield name, node
        if node.type == "dir":
            stack.append((name, iter(repo.load_tree(node.subtree))))


def _tar_info(
    name: str, node: Node, links: dict[tuple[int, int], tuple[str, Node]]
) -> tarfile.TarInfo | None:
    """Return the tar header of one node, or None for a socket, which tar cannot hold."""
    info = tarfile.TarInfo(name)
    info.mode = node.mode
    # The ustar field has whole seconds and the pax header every nanosecond.
    # tarfile gives a pax header set here priority over the field.
    info.mtime = node.mtime_ns // 1_000_000_000
    info.pax_headers = {"mtime": _pax_time(node.mtime_ns)}
    info.uid, info.gid = node.uid, node.gid
    info.uname, info.gname = node.user, node.group
    if node.type == "dir":
        info.type = tarfile.DIRTYPE
    elif node.type == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = os.fsdecode(node.target)
    elif node.type == "file":
        info.type = tarfile.REGTYPE
        info.size = node.size
        _mark_hard_link(info, node, links)
    elif node.type in _TAR_TYPES:
        info.type = _TAR_TYPES[node.type]
        info.devmajor, info.devminor = os.major(node.rdev), os.minor(node.rdev)
    else:
        log.warning("not dumping %s of type %s: tar has no such member type", name, node.type)
        return None
    return info


def _mark_hard_link(
    info: tarfile.TarInfo, node: Node, links: dict[tuple[int, int], tuple[str, Node]]
) -> None:
    """Turn a later path of a file that shared an inode at snapshot time into a hard link."""
    if node.nlink < 2 or not node.inode:
        return
    key = (node.device, node.inode)
    first = links.get(key)
    if first is None:
        links[key] = (info.name, node)
        return
    first_name, first_node = first
    if (first_node.size, first_node.digest) == (node.size, node.digest):
        info.type = tarfile.LNKTYPE
        info.linkname = first_name
        info.size = 0


def _pax_time(time_ns: int) -> str:
    """Return a time in nanoseconds as a pax decimal, such as "-1.500000000"."""
    sign = "-" if time_ns < 0 else ""
    seconds, fraction = divmod(abs(time_ns), 1_000_000_000)
    return f"{sign}{seconds}.{fraction:09d}"
