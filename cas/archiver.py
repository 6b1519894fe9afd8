"""Taking a snapshot: walk the paths, store new chunks and trees, write the snapshot.

Pipeline for one file, with two or more threads:

    reader thread:  readinto a free block buffer -> cut chunks (GIL released)
    caller thread:  per chunk: keyed BLAKE3 id, whole-file BLAKE3, index
                    lookup, compress when the sample shows it pays, seal into the
                    pack buffer (see `cas.blobstore`)
    upload thread:  write and fsync finished packs

Block buffers come from a fixed pool, so memory in flight is bounded by
``block_count * (block_size + max chunk size)`` plus two pack buffers,
whatever the file size. With one thread, the caller does all three steps.

An unchanged file (same size, mtime_ns, ctime_ns, inode and device as in the
parent snapshot) reuses the parent's chunk list without being read.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import logging
import os
import socket
import stat
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime

import blake3

from cas import __version__
from cas.blobstore import BlobWriter
from cas.blockreader import BlockReader
from cas.chunker import Chunker
from cas.codecs import Compression
from cas.errors import CasError, NotFoundError, UsageError, WriteOnlyKeyError
from cas.excludes import EXCLUDE_META
from cas.filenodes import meta_node, regular_file_size, special_kind, unchanged
from cas.locks import RepositoryLock
from cas.models.chunkplan import tensor_cutter
from cas.parts import PART_META, PART_TAG_PREFIX, check_part_name, latest_part, part_name
from cas.repository import Repository
from cas.snapshot import Snapshot, validate_host, validate_labels
from cas.tree import Node, encode_tree
from cas.walk import WalkRules
from cas.writeonly import LocalTreeCache

log = logging.getLogger(__name__)

BLOCK_SIZE = 16 << 20
_RECURSION_LIMIT = 10_000
DEFAULT_MEMORY_LIMIT = 256 << 20
# A file whose size or mtime changes while it is read is read again this many times.
_REREADS = 2


@dataclass
class SnapshotOptions:
    """Options of a snapshot run: its metadata, parent, threads and memory bound."""

    tags: list[str] = field(default_factory=list)
    message: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    parent: str | None = None
    threads: int = 0
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    host: str = ""
    # Non-empty: store the paths as the part of this name of a sharded checkpoint.
    part: str = ""
    # The encoding of new blobs; None takes the repository config's.
    compression: Compression | None = None
    # Cut recognised model files at tensor boundaries (see cas.models.chunkplan).
    tensor_align: bool = True
    # Gitignore-style patterns of paths to leave out (see `cas.excludes`), in order.
    exclude: list[str] = field(default_factory=list)
    # Store what symlinks point to, as files and folders, instead of the links.
    dereference: bool = False


@dataclass
class SnapshotProgress:
    """Counters handed to the progress callback."""

    files: int = 0
    bytes_read: int = 0
    bytes_total: int = 0
    # Bytes of files reused from the parent without reading them.
    bytes_skipped: int = 0
    # Sizes of the regular files below the paths, summed before the run starts when a
    # progress callback is set, else 0. It is the total for an ETA, and is not exact
    # when files change meanwhile.
    bytes_expected: int = 0

    @property
    def bytes_done(self) -> int:
        """Bytes read plus bytes reused from the parent."""
        return self.bytes_read + self.bytes_skipped


@dataclass(frozen=True)
class SnapshotResult:
    """Summary of one snapshot run."""

    snapshot: Snapshot
    files: int
    dirs: int
    bytes_read: int
    bytes_added: int
    bytes_total: int
    new_chunks: int
    unchanged_files: int
    warnings: tuple[str, ...]
    seconds: float
    # Paths left out by the exclude patterns; the folders among them were not walked.
    excluded: int = 0


class FileChangedError(CasError):
    """A file changed while it was read."""


@contextlib.contextmanager
def deep_recursion() -> Iterator[None]:
    """Allow Python recursion as deep as the deepest folder a path can name.

    Folders are walked recursively, three frames per level. PATH_MAX (4096
    bytes on Linux) allows at most 2048 levels, so 8192 frames plus the
    caller's suffice. Since Python 3.11, calls between Python functions do not
    grow the C stack, so the higher limit is safe.
    """
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, _RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def effective_threads(threads: int) -> int:
    """Return the thread count to use: ``threads``, or every core when 0."""
    if threads < 0:
        raise UsageError(f"invalid thread count {threads}: use 1 or more, or 0 for all cores")
    return threads or os.cpu_count() or 1


class Archiver:
    """Takes one snapshot of a set of paths into a repository."""

    def __init__(
        self,
        repo: Repository,
        options: SnapshotOptions,
        progress: Callable[[SnapshotProgress], None] | None = None,
    ) -> None:
        self.repo = repo
        self.options = options
        self.progress_callback = progress
        self.progress = SnapshotProgress()
        self.threads = effective_threads(options.threads)
        self.chunker = Chunker(repo.config.chunker, repo.keys.chunker_seed())
        block_size = BLOCK_SIZE if options.memory_limit >= 128 << 20 else 4 << 20
        pack_memory = 2 * repo.config.pack_size
        block_count = max(2, min(4, (options.memory_limit - pack_memory) // block_size))
        self.reader = BlockReader(self.chunker, block_size, block_count, self.threads > 1)
        self.warnings: list[str] = []
        self.files = 0
        self.dirs = 0
        self.unchanged_files = 0
        self._last_progress = 0.0
        # (device, inode) -> node of a file with several hard links, read once. With
        # --dereference it keeps every file, so two links to one file read it once.
        # NOTE: memory then grows by one node per file (with its chunk ids).
        self._hardlinks: dict[tuple[int, int], Node] = {}
        # A write-only key cannot read trees back, so its parent comes from local disk.
        self.local_trees = LocalTreeCache(repo) if repo.keys.write_only else None
        self.walk = WalkRules(options.exclude, options.dereference, self._warn)

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        self.warnings.append(message)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress_callback and (force or now - self._last_progress > 0.2):
            self._last_progress = now
            self.progress_callback(self.progress)

    # The run

    def run(self, paths: list[str]) -> SnapshotResult:
        """Snapshot ``paths`` under a shared lock; return what was stored."""
        with deep_recursion():
            return self._run(paths)

    def _run(self, paths: list[str]) -> SnapshotResult:
        started = time.monotonic()
        sources = self._check_sources(paths)
        host = self.options.host or socket.gethostname()
        parent = self._find_parent(sources, host)
        if self.progress_callback:
            self.progress.bytes_expected = sum(map(regular_file_size, sources))
        with RepositoryLock(
            self.repo.backend, self.repo.keys, exclusive=False, operation="snapshot"
        ) as lock:
            # A gc that finished before this lock may have removed packs the
            # cache still lists: sync now, so no chunk is deduplicated against them.
            self.repo.index.sync()
            # If the lock is lost (a paused process taken for stale, or cas unlock),
            # a gc may have deleted packs this run wrote or reused: publish nothing.
            writer = BlobWriter(
                self.repo, self.threads > 1, lock.check_held, self.options.compression
            )
            try:
                root_id = self._store_roots(sources, parent, writer)
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            lock.check_held()
            snapshot, snapshot_size = self._write_snapshot(sources, host, parent, root_id)
        if self.local_trees is not None:
            self.local_trees.save(sources, host, self.options.part, snapshot)
        bytes_added = writer.bytes_uploaded + self.repo.index.bytes_written + snapshot_size
        self._report(force=True)
        return SnapshotResult(
            snapshot=snapshot,
            files=self.files,
            dirs=self.dirs,
            bytes_read=self.progress.bytes_read,
            bytes_added=bytes_added,
            bytes_total=self.progress.bytes_total,
            new_chunks=writer.stats.new_chunks,
            unchanged_files=self.unchanged_files,
            warnings=tuple(self.warnings),
            seconds=time.monotonic() - started,
            excluded=self.walk.excluded_count,
        )

    def _check_sources(self, paths: list[str]) -> list[str]:
        """Validate the paths and options; return the absolute source paths."""
        if not paths:
            raise UsageError("no path given: name at least one file or folder to snapshot")
        validate_labels(self.options.tags, self.options.message, self.options.meta)
        if self.options.host:
            validate_host(self.options.host)
        if self.options.part:
            check_part_name(self.options.part)
        sources = [os.path.abspath(path) for path in paths]
        for source in sources:
            if not os.path.lexists(source):
                raise NotFoundError(
                    f"path {source} does not exist; check the paths to snapshot for a typo"
                )
        return sources

    def _find_parent(self, sources: list[str], host: str) -> Snapshot | None:
        if self.local_trees is not None and self.options.parent:
            raise WriteOnlyKeyError.for_action(
                "read the --parent snapshot; leave --parent out, and the local record of the "
                "last snapshot of these paths serves as the parent"
            )
        if self.local_trees is not None:
            return self.local_trees.find_parent(sources, host, self.options.part)
        if self.options.parent:
            return self.repo.resolve_snapshot(self.options.parent)
        snapshots = self.repo.list_snapshots()
        if self.options.part:
            # A part's paths change from step to step, so its name and host find its parent.
            return latest_part(snapshots, self.options.part, host=host)
        wanted = sorted(os.fsencode(source) for source in sources)
        candidates = [
            snap
            for snap in snapshots
            if snap.host == host and sorted(snap.paths) == wanted and part_name(snap) is None
        ]
        return candidates[-1] if candidates else None

    def _write_snapshot(
        self, sources: list[str], host: str, parent: Snapshot | None, root_id: bytes
    ) -> tuple[Snapshot, int]:
        snapshot = Snapshot(
            snapshot_id=b"",
            time=datetime.now().astimezone().isoformat(),
            host=host,
            user=_user_name(),
            paths=tuple(os.fsencode(source) for source in sources),
            tree_id=root_id,
            tags=tuple(self._tags()),
            message=self.options.message,
            meta=self._meta(),
            parent_id=parent.snapshot_id if parent else None,
            cas_version=__version__,
            summary={
                "files": self.files,
                "dirs": self.dirs,
                "bytes_read": self.progress.bytes_read,
                "bytes_total": self.progress.bytes_total,
                **({"excluded": self.walk.excluded_count} if self.options.exclude else {}),
            },
        )
        return self.repo.write_snapshot(snapshot)

    def _tags(self) -> list[str]:
        tags = list(self.options.tags)
        part_tag = PART_TAG_PREFIX + self.options.part
        if self.options.part and part_tag not in tags:
            tags.append(part_tag)
        return tags

    def _meta(self) -> dict[str, str]:
        meta = dict(self.options.meta)
        if self.options.part:
            meta[PART_META] = self.options.part
        if self.options.exclude:
            meta[EXCLUDE_META] = json.dumps(self.options.exclude)
        return meta

    # Walking

    def _store_roots(
        self, sources: list[str], parent: Snapshot | None, writer: BlobWriter
    ) -> bytes:
        parent_root = parent.tree_id if parent else None
        if len(sources) == 1 and os.path.isdir(sources[0]):
            node = self._store_dir(sources[0], b"", parent_root, writer)
            return node.subtree
        names: dict[bytes, str] = {}
        for source in sources:
            name = os.fsencode(os.path.basename(source.rstrip("/")) or "root")
            if name in names:
                raise UsageError(
                    f"paths {names[name]} and {source} have the same base name "
                    f"{os.fsdecode(name)!r}; snapshot them separately or rename one"
                )
            names[name] = source
        parent_nodes = self._parent_nodes(parent_root)
        nodes: list[Node] = []
        for name, source in names.items():
            stored = self._store_path(source, name, parent_nodes.get(name), writer, follow=True)
            if stored is not None:
                nodes.append(stored)
        return self._store_tree(nodes, writer)

    def _parent_nodes(self, tree_id: bytes | None) -> dict[bytes, Node]:
        if not tree_id:
            return {}
        try:
            if self.local_trees is not None:
                return {node.name: node for node in self.local_trees.load_tree(tree_id)}
            return {node.name: node for node in self.repo.load_tree(tree_id)}
        except CasError as exc:
            self._warn(f"cannot read the parent snapshot's tree, reading all files: {exc}")
            return {}

    def _store_tree(self, nodes: list[Node], writer: BlobWriter) -> bytes:
        payload = encode_tree(nodes)
        tree_id = self.repo.keys.blob_id(payload)
        writer.add_tree(tree_id, payload)
        if self.local_trees is not None:
            self.local_trees.record_tree(tree_id, payload)
        return tree_id

    def _store_path(
        self, path: str, name: bytes, parent: Node | None, writer: BlobWriter, follow: bool = False
    ) -> Node | None:
        try:
            st, followed = self.walk.stat(path, follow)
        except OSError as exc:
            self._warn(f"cannot stat {path}: {exc.strerror}; skipped")
            return None
        if self.walk.excluded(name, st):
            return None
        node = self._store_stat(path, name, st, parent, writer)
        if node is None or node.type == "symlink":
            return node
        xattrs = self._read_xattrs(path, follow=followed)
        return replace(node, xattrs=xattrs) if xattrs else node

    def _store_stat(
        self, path: str, name: bytes, st: os.stat_result, parent: Node | None, writer: BlobWriter
    ) -> Node | None:
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            return self._store_dir(
                path, name, parent.subtree if parent and parent.type == "dir" else None, writer, st
            )
        if stat.S_ISREG(mode):
            return self._store_file(path, name, st, parent, writer)
        if stat.S_ISLNK(mode):
            return meta_node(name, "symlink", st, target=os.readlink(os.fsencode(path)))
        kind = special_kind(mode)
        if kind is None:
            self._warn(f"{path} has an unknown file type; skipped")
            return None
        return meta_node(name, kind, st, rdev=st.st_rdev if kind.endswith("dev") else 0)

    def _read_xattrs(self, path: str, follow: bool = False) -> dict[bytes, bytes]:
        """Return a path's extended attributes; none where the file system has no support."""
        try:
            names = os.listxattr(path, follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENOENT):
                self._warn(f"cannot list extended attributes of {path}: {exc.strerror}")
            return {}
        xattrs: dict[bytes, bytes] = {}
        for key in names:
            try:
                xattrs[os.fsencode(key)] = os.getxattr(path, key, follow_symlinks=follow)
            except OSError as exc:
                self._warn(f"cannot read extended attribute {key} of {path}: {exc.strerror}")
        return xattrs

    def _store_dir(
        self,
        path: str,
        name: bytes,
        parent_tree: bytes | None,
        writer: BlobWriter,
        st: os.stat_result | None = None,
    ) -> Node:
        st = st or os.stat(path)
        parent_nodes = self._parent_nodes(parent_tree)
        nodes: list[Node] = []
        try:
            entries = sorted(os.listdir(os.fsencode(path)))
        except OSError as exc:
            self._warn(f"cannot list {path}: {exc.strerror}; stored as an empty folder")
            entries = []
        with self.walk.enter(name, st):
            for entry in entries:
                child = os.path.join(path, os.fsdecode(entry))
                node = self._store_path(child, entry, parent_nodes.get(entry), writer)
                if node is not None:
                    nodes.append(node)
        self.dirs += 1
        subtree = self._store_tree(nodes, writer)
        return meta_node(name, "dir", st, subtree=subtree)

    # Files

    def _store_file(
        self, path: str, name: bytes, st: os.stat_result, parent: Node | None, writer: BlobWriter
    ) -> Node | None:
        self.files += 1
        self.progress.files += 1
        self.progress.bytes_total += st.st_size
        if parent is not None and unchanged(parent, st) and all(map(writer.has, parent.chunk_ids)):
            self.unchanged_files += 1
            self.progress.bytes_skipped += st.st_size
            return meta_node(
                name, "file", st, chunks=parent.chunks, sizes=parent.sizes, digest=parent.digest
            )
        # A second path of a hard-linked file, or of a file that symlinks point to
        # under --dereference, reuses the first path's chunks.
        shared = st.st_nlink > 1 or self.options.dereference
        linked = self._hardlinks.get((st.st_dev, st.st_ino)) if shared else None
        if linked is not None and unchanged(linked, st):
            self.progress.bytes_skipped += st.st_size
            return meta_node(
                name, "file", st, chunks=linked.chunks, sizes=linked.sizes, digest=linked.digest
            )
        node = self._read_with_retries(path, name, writer)
        if node is not None and shared:
            self._hardlinks[(st.st_dev, st.st_ino)] = node
        return node

    def _read_with_retries(self, path: str, name: bytes, writer: BlobWriter) -> Node | None:
        """Read a file, again up to `_REREADS` times while it changes under the reader."""
        for attempt in range(_REREADS + 1):
            try:
                return self._read_file(path, name, writer)
            except FileChangedError as exc:
                if attempt == _REREADS:
                    self._warn(f"{exc}; stored the last version read")
                    return exc.args[1] if len(exc.args) > 1 else None
            except OSError as exc:
                self._warn(f"cannot read {path}: {exc.strerror}; skipped")
                return None
        return None

    def _read_file(self, path: str, name: bytes, writer: BlobWriter) -> Node:
        # O_NONBLOCK: a file replaced by a FIFO after the lstat must not block
        # the open; the type check below then skips it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise OSError(errno.EINVAL, "no longer a regular file")
            chunks, sizes, digest, size = self._chunk_file(fd, writer, path)
            after = os.fstat(fd)
        finally:
            os.close(fd)
        node = meta_node(
            name, "file", after, chunks=b"".join(chunks), sizes=tuple(sizes), digest=digest
        )
        node = Node(**{**node.__dict__, "size": size})
        if (before.st_size, before.st_mtime_ns) != (
            after.st_size,
            after.st_mtime_ns,
        ) or size != after.st_size:
            raise FileChangedError(f"{path} changed while it was read", node)
        return node

    def _chunk_file(
        self, fd: int, writer: BlobWriter, path: str = ""
    ) -> tuple[list[bytes], list[int], bytes, int]:
        keys = self.repo.keys
        cutter = tensor_cutter(self.chunker, fd, path) if self.options.tensor_align else None
        file_hash = blake3.blake3(max_threads=1)
        chunks: list[bytes] = []
        sizes: list[int] = []
        size = 0
        writer.reset_sampling()
        cut = cutter.cut if cutter else None
        for buffer, lengths, element_sizes in self.reader.blocks(fd, cut):
            try:
                view = memoryview(buffer)
                offset = 0
                for length, element_size in zip(lengths, element_sizes, strict=True):
                    piece = view[offset : offset + length]
                    chunk_id = keys.blob_id(piece)
                    file_hash.update(piece)
                    writer.add_chunk(chunk_id, piece, element_size=element_size)
                    chunks.append(chunk_id)
                    sizes.append(length)
                    offset += length
                view.release()
                size += offset
                self.progress.bytes_read += offset
                self._report()
            finally:
                self.reader.release(buffer)
        return chunks, sizes, file_hash.digest(), size


def _user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
