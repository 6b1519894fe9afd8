"""Compare two snapshots: files added, removed and changed, and tensors within model files.

`diff_snapshots` walks both root trees side by side and skips every subtree whose tree id
is equal. A file counts as changed when its type, permission bits or content (size,
digest, or symlink target) differ. A change of only mtime, ctime, owner or inode is not
reported, since a rewrite with the same bytes changes those.

For a changed file that `cas.models` recognises in both snapshots, the headers are parsed
from chunks read through the repository. Each tensor is compared by the chunk ids covering
its byte range. Equal ids at equal offsets mean equal bytes, and different ids over the
same cut mean different bytes. Only when the two cuts differ (a file stored with
``--no-tensor-align`` on one side, say) are the tensor's bytes read and hashed.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace

import blake3

from cas.errors import IntegrityError
from cas.models import ModelFormatError, ModelLayout, TensorInfo, parse_layout
from cas.repository import Repository
from cas.snapshot import Snapshot
from cas.tree import Node

log = logging.getLogger(__name__)

_CACHED_CHUNKS = 8


@dataclass(frozen=True)
class TensorChange:
    """A tensor added, removed or changed; ``old_*`` describe the old side of a change."""

    name: str
    change: str  # "added", "removed" or "changed"
    dtype: str
    shape: tuple[int, ...]
    size: int
    old_dtype: str = ""
    old_shape: tuple[int, ...] = ()
    old_size: int = 0


@dataclass(frozen=True)
class FileChange:
    """One path added, removed or changed between the two snapshots.

    For "added" the ``old_*`` fields are empty, for "removed" the new ones. ``format`` is
    the model format recognised on both sides of a changed file. ``tensors`` lists its
    tensor changes, and ``tensor_error`` gives the reason when tensors could not be compared.
    """

    path: str
    change: str  # "added", "removed" or "changed"
    type: str
    old_type: str
    size: int
    old_size: int
    mode: int
    old_mode: int
    content_changed: bool = False
    format: str = ""
    tensors: tuple[TensorChange, ...] = ()
    tensor_error: str = ""


@dataclass(frozen=True)
class SnapshotDiff:
    """The changes from ``old`` to ``new``, sorted by path."""

    old: Snapshot
    new: Snapshot
    files: tuple[FileChange, ...]
    bytes_read: int

    def count(self, change: str) -> int:
        """Return how many paths have this change ("added", "removed" or "changed")."""
        return sum(1 for item in self.files if item.change == change)


class NodeReader:
    """Random access to a stored file's bytes, chunk by chunk through the repository."""

    def __init__(self, repo: Repository, node: Node) -> None:
        self.repo = repo
        self.node = node
        self.chunk_ids = node.chunk_ids
        self.starts = list(itertools.accumulate(node.sizes, initial=0))
        self.bytes_read = 0
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        if self.starts[-1] != node.size or len(self.chunk_ids) != len(node.sizes):
            raise IntegrityError(f"file {node.name!r}: chunk sizes disagree with its size")

    def chunk(self, index: int) -> bytes:
        """Return the plaintext of the file's chunk at ``index``; the last 8 read are cached."""
        data = self._cache.get(index)
        if data is not None:
            self._cache.move_to_end(index)
            return data
        data = self.repo.read_blob(self.chunk_ids[index])
        if len(data) != self.node.sizes[index]:
            raise IntegrityError(f"chunk {self.chunk_ids[index].hex()} has the wrong length")
        self.bytes_read += len(data)
        self._cache[index] = data
        if len(self._cache) > _CACHED_CHUNKS:
            self._cache.popitem(last=False)
        return data

    def span(self, offset: int, size: int) -> tuple[int, int]:
        """Return the indexes [first, last) of the chunks that overlap a byte range."""
        first = max(bisect.bisect_right(self.starts, offset) - 1, 0)
        last = bisect.bisect_left(self.starts, offset + size, lo=first)
        return first, max(last, first + 1) if size else first

    def pieces(self, offset: int, size: int) -> Iterator[memoryview]:
        """Yield the bytes of a range, one chunk's part at a time."""
        first, last = self.span(offset, size)
        for index in range(first, last):
            data = memoryview(self.chunk(index))
            start = max(offset - self.starts[index], 0)
            stop = min(offset + size - self.starts[index], len(data))
            yield data[start:stop]

    def read_at(self, offset: int, size: int) -> bytes:
        """Return up to ``size`` bytes from ``offset``, fewer at the end of the file."""
        size = max(min(size, self.node.size - offset), 0)
        return b"".join(self.pieces(offset, size))


def diff_snapshots(repo: Repository, old: Snapshot, new: Snapshot) -> SnapshotDiff:
    """Return the files and tensors that differ from snapshot ``old`` to snapshot ``new``."""
    walker = _Walker(repo)
    walker.compare_trees(old.tree_id, new.tree_id, "")
    files = tuple(sorted(walker.changes, key=lambda item: item.path))
    log.info(
        "diff %s..%s: %d paths differ, %d bytes read",
        old.snapshot_hex[:16],
        new.snapshot_hex[:16],
        len(files),
        walker.bytes_read,
    )
    return SnapshotDiff(old, new, files, walker.bytes_read)


class _Walker:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.changes: list[FileChange] = []
        self.bytes_read = 0

    def compare_trees(self, old_id: bytes, new_id: bytes, prefix: str) -> None:
        if old_id == new_id:
            return
        old_nodes = {node.name: node for node in self.repo.load_tree(old_id)} if old_id else {}
        new_nodes = {node.name: node for node in self.repo.load_tree(new_id)} if new_id else {}
        for name in sorted(old_nodes.keys() | new_nodes.keys()):
            path = prefix + os.fsdecode(name)
            old, new = old_nodes.get(name), new_nodes.get(name)
            if old is None and new is not None:
                self._add_all("added", new, path)
            elif new is None and old is not None:
                self._add_all("removed", old, path)
            elif old is not None and new is not None:
                self.compare_nodes(old, new, path)

    def _add_all(self, change: str, node: Node, path: str) -> None:
        """Record a node and, for a folder, everything below it as added or removed."""
        if change == "added":
            self.changes.append(FileChange(path, change, node.type, "", node.size, 0, node.mode, 0))
        else:
            self.changes.append(FileChange(path, change, "", node.type, 0, node.size, 0, node.mode))
        if node.type == "dir" and node.subtree:
            for child in self.repo.load_tree(node.subtree):
                self._add_all(change, child, f"{path}/{os.fsdecode(child.name)}")

    def compare_nodes(self, old: Node, new: Node, path: str) -> None:
        if old.type == "dir" and new.type == "dir":
            if old.mode != new.mode:
                self.changes.append(_changed(path, old, new, False))
            self.compare_trees(old.subtree, new.subtree, path + "/")
            return
        content_changed = (old.type, old.size, old.digest, old.target, old.rdev) != (
            new.type,
            new.size,
            new.digest,
            new.target,
            new.rdev,
        )
        if not content_changed and old.mode == new.mode:
            return
        change = _changed(path, old, new, content_changed)
        if content_changed and old.type == "file" and new.type == "file":
            change = self._with_tensors(change, old, new)
        self.changes.append(change)

    def _with_tensors(self, change: FileChange, old: Node, new: Node) -> FileChange:
        old_reader = NodeReader(self.repo, old)
        new_reader = NodeReader(self.repo, new)
        try:
            old_layout = _parse(old_reader)
            new_layout = _parse(new_reader)
            if old_layout is None or new_layout is None:
                return change
            tensors = _compare_layouts(old_reader, old_layout, new_reader, new_layout)
        except ModelFormatError as exc:
            return replace(change, tensor_error=str(exc))
        finally:
            self.bytes_read += old_reader.bytes_read + new_reader.bytes_read
        formats = {old_layout.format, new_layout.format}
        return replace(change, format="/".join(sorted(formats)), tensors=tensors)


def _changed(path: str, old: Node, new: Node, content_changed: bool) -> FileChange:
    return FileChange(
        path,
        "changed",
        new.type,
        old.type,
        new.size,
        old.size,
        new.mode,
        old.mode,
        content_changed=content_changed,
    )


def _parse(reader: NodeReader) -> ModelLayout | None:
    if reader.node.size == 0:
        return None
    return parse_layout(reader.read_at, reader.node.size)


def _compare_layouts(
    old_reader: NodeReader, old: ModelLayout, new_reader: NodeReader, new: ModelLayout
) -> tuple[TensorChange, ...]:
    old_tensors = {tensor.name: tensor for tensor in old.tensors}
    new_tensors = {tensor.name: tensor for tensor in new.tensors}
    changes: list[TensorChange] = []
    for name in sorted(old_tensors.keys() | new_tensors.keys()):
        before, after = old_tensors.get(name), new_tensors.get(name)
        if before is None and after is not None:
            changes.append(TensorChange(name, "added", after.dtype, after.shape, after.size))
        elif after is None and before is not None:
            changes.append(TensorChange(name, "removed", before.dtype, before.shape, before.size))
        elif before is not None and after is not None:
            same_form = (before.dtype, before.shape) == (after.dtype, after.shape)
            if same_form and _same_bytes(old_reader, before, new_reader, after):
                continue
            changes.append(
                TensorChange(
                    name,
                    "changed",
                    after.dtype,
                    after.shape,
                    after.size,
                    before.dtype,
                    before.shape,
                    before.size,
                )
            )
    return tuple(changes)


def _same_bytes(
    old_reader: NodeReader, old: TensorInfo, new_reader: NodeReader, new: TensorInfo
) -> bool:
    """Return whether two tensors' bytes are equal, reading them only when the cuts differ."""
    if old.size != new.size:
        return False
    old_cut = _cut_of(old_reader, old)
    new_cut = _cut_of(new_reader, new)
    if old_cut == new_cut:
        return True
    _, old_sizes, old_head, old_tail = old_cut
    _, new_sizes, new_head, new_tail = new_cut
    if old_sizes == new_sizes and (old_head, old_tail, new_head, new_tail) == (0, 0, 0, 0):
        # The same cut with a different chunk id: some chunk, so some tensor byte, differs.
        return False
    return _hash_range(old_reader, old) == _hash_range(new_reader, new)


def _cut_of(reader: NodeReader, tensor: TensorInfo) -> tuple[list[bytes], list[int], int, int]:
    """Return the chunk ids and sizes covering a tensor, and the bytes before and after it."""
    first, last = reader.span(tensor.offset, tensor.size)
    head = tensor.offset - reader.starts[first]
    tail = reader.starts[last] - tensor.end if last > first else 0
    return reader.chunk_ids[first:last], list(reader.node.sizes[first:last]), head, tail


def _hash_range(reader: NodeReader, tensor: TensorInfo) -> bytes:
    digest = blake3.blake3(max_threads=1)
    for piece in reader.pieces(tensor.offset, tensor.size):
        digest.update(piece)
    return digest.digest()
