"""Checking out a snapshot: recreate its tree in a folder, byte for byte, verified.

Phases:

1. Plan: walk the snapshot's trees, create folders, symlinks and empty
   files, and list every (chunk id, file, offset) that must be written.
2. Content: group the needed chunks by pack, read each pack's needed range
   once, decrypt and verify each blob on a pool of threads, and write it
   with ``os.pwrite`` at every offset that needs it. All-zero chunks are
   recognised by id and never read nor written, so they stay holes.
3. Finish: truncate each file to its size, verify its whole-content BLAKE3
   digest, then restore modes and times (folders last, deepest first).

Safety: every name comes from a validated tree (no "", ".", "..", "/" or
NUL), and every file or folder is opened relative to its parent folder's
descriptor with ``O_NOFOLLOW``, so neither a crafted tree nor a symlink that
already exists in the target can make the restorer write outside the target.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import stat
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import blake3

from cas.crypto import TAG_SIZE
from cas.errors import CasError, IntegrityError, UsageError
from cas.index import BlobLocation, pack_name
from cas.locks import RepositoryLock
from cas.pack import PROLOGUE_SIZE, BlobOpener, parse_prologue
from cas.repository import Repository
from cas.snapshot import Snapshot
from cas.streamrestore import STREAM_MIN_SIZE, restore_stream
from cas.tree import Node

log = logging.getLogger(__name__)

# Read a pack's whole needed span in one request unless it is over twice the
# bytes actually needed; then read each blob on its own.
_SPAN_SLACK = 2
# Descriptors each worker keeps open while it writes one pack's chunks.
_MAX_OPEN_FILES = 32


@dataclass
class CheckoutOptions:
    """Options of a checkout: overwrite, threads, memory bound and lock wait."""

    overwrite: bool = False
    threads: int = 0
    memory_limit: int = 256 << 20
    wait: float = 0.0


@dataclass
class CheckoutProgress:
    """Counters handed to the progress callback."""

    bytes_written: int = 0
    bytes_total: int = 0
    files_done: int = 0


@dataclass(frozen=True)
class CheckoutResult:
    """Summary of a checkout; ``failed`` names each path that could not be restored."""

    files: int
    dirs: int
    symlinks: int
    bytes_total: int
    failed: tuple[tuple[str, str], ...]
    seconds: float


@dataclass
class _FileJob:
    rel: tuple[bytes, ...]
    node: Node
    error: str = ""
    # Set when the content digest was checked while writing (the streaming path).
    verified: bool = False


@dataclass
class _DirJob:
    rel: tuple[bytes, ...]
    node: Node | None


@dataclass
class _Plan:
    files: list[_FileJob] = field(default_factory=list)
    dirs: list[_DirJob] = field(default_factory=list)
    symlinks: int = 0
    # chunk id -> [(file number, offset in file)]
    targets: dict[bytes, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    sizes: dict[bytes, int] = field(default_factory=dict)
    # Folders whose tree could not be read: (path below the target, reason).
    lost: list[tuple[tuple[bytes, ...], str]] = field(default_factory=list)
    # (device, inode) at snapshot time -> number of the first file restored for it.
    link_sources: dict[tuple[int, int], int] = field(default_factory=dict)
    # (path of a later hard link, number of the file it links to)
    links: list[tuple[tuple[bytes, ...], int]] = field(default_factory=list)
    # Numbers of the large files restored in file order by `restore_stream`.
    streams: list[int] = field(default_factory=list)


class _SafeTree:
    """Opens paths below the target folder without following any symlink."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self.root_fd)

    def open_dir(self, rel: tuple[bytes, ...]) -> int:
        """Open a folder below the root, refusing symlinks at every step."""
        fd = os.dup(self.root_fd)
        for part in rel:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            finally:
                os.close(fd)
            fd = child
        return fd

    def display(self, rel: tuple[bytes, ...]) -> str:
        return os.path.join(self.root, *(os.fsdecode(part) for part in rel))


class Restorer:
    """Restores one snapshot into a folder."""

    def __init__(
        self,
        repo: Repository,
        snapshot: Snapshot,
        target: str,
        options: CheckoutOptions | None = None,
        progress: Callable[[CheckoutProgress], None] | None = None,
    ) -> None:
        from cas.archiver import effective_threads

        self.repo = repo
        self.snapshot = snapshot
        self.target = os.path.abspath(target)
        self.options = options or CheckoutOptions()
        self.threads = effective_threads(self.options.threads)
        # Each worker keeps one pack span and one plaintext buffer, so fit them in the bound.
        per_worker = repo.config.pack_size + repo.config.chunker.max_size + (2 << 20)
        self.workers = max(1, min(self.threads, self.options.memory_limit // per_worker))
        self.progress_callback = progress
        self.progress = CheckoutProgress()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._zero_ids: dict[int, bytes] = {}

    def run(self) -> CheckoutResult:
        """Restore the snapshot; files that fail are listed in the result, not raised."""
        started = time.monotonic()
        self._prepare_target()
        # A shared lock keeps gc from deleting packs while they are read; the
        # index is synced under it, so it names no pack a finished gc removed.
        with RepositoryLock(
            self.repo.backend,
            self.repo.keys,
            exclusive=False,
            operation="checkout",
            wait=self.options.wait,
        ):
            self.repo.index.sync()
            plan = self._restore()
        return self._result(plan, started)

    def _restore(self) -> _Plan:
        self.safe = _SafeTree(self.target)
        try:
            plan = _Plan()
            self._plan_trees(plan)
            self.progress.bytes_total = sum(job.node.size for job in plan.files)
            self._write_content(plan)
            self._finish_files(plan)
            self._make_links(plan)
            self._finish_dirs(plan)
        finally:
            self.safe.close()
        return plan

    def _result(self, plan: _Plan, started: float) -> CheckoutResult:
        failed = tuple((self.safe.display(rel), reason) for rel, reason in plan.lost) + tuple(
            (self.safe.display(job.rel), job.error) for job in plan.files if job.error
        )
        return CheckoutResult(
            files=len(plan.files),
            dirs=len(plan.dirs),
            symlinks=plan.symlinks,
            bytes_total=self.progress.bytes_total,
            failed=failed,
            seconds=time.monotonic() - started,
        )

    def _prepare_target(self) -> None:
        if os.path.lexists(self.target) and not os.path.isdir(self.target):
            raise UsageError(f"checkout target {self.target} exists and is not a folder")
        if os.path.isdir(self.target) and os.listdir(self.target) and not self.options.overwrite:
            raise UsageError(
                f"checkout target {self.target} is not empty; choose an empty or new folder, "
                f"or pass --overwrite"
            )
        try:
            os.makedirs(self.target, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create checkout target {self.target}: {exc.strerror}"
            ) from None

    # Phase 1: plan and create the skeleton

    def _plan_trees(self, plan: _Plan) -> None:
        """Plan every folder depth first, with a stack rather than recursion.

        A stored tree can nest deeper than Python's recursion limit allows.
        """
        stack: list[tuple[bytes, tuple[bytes, ...]]] = [(self.snapshot.tree_id, ())]
        while stack:
            tree_id, rel = stack.pop()
            children = self._plan_dir(tree_id, rel, plan)
            stack.extend(reversed(children))

    def _plan_dir(
        self, tree_id: bytes, rel: tuple[bytes, ...], plan: _Plan
    ) -> list[tuple[bytes, tuple[bytes, ...]]]:
        """Create one folder's entries; return its sub-folders' (tree id, path)."""
        # A tree that cannot be read loses its folder's content only; the
        # folders beside it are still restored.
        try:
            nodes = self.repo.load_tree(tree_id)
        except CasError as exc:
            reason = f"folder content lost: tree {tree_id.hex()} is unreadable: {exc}"
            log.error("%s: %s", self.safe.display(rel), reason)
            plan.lost.append((rel, reason))
            return []
        dir_fd = self.safe.open_dir(rel)
        try:
            for node in nodes:
                self._plan_node(node, rel, dir_fd, plan)
        finally:
            os.close(dir_fd)
        children = []
        for node in nodes:
            if node.type == "dir":
                plan.dirs.append(_DirJob((*rel, node.name), node))
                children.append((node.subtree, (*rel, node.name)))
        return children

    def _plan_node(self, node: Node, rel: tuple[bytes, ...], dir_fd: int, plan: _Plan) -> None:
        name = node.name
        if node.damaged:
            log.warning("%s is marked damaged: %s", self.safe.display((*rel, name)), node.damaged)
        if node.type == "dir":
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                _require_real_dir(name, dir_fd, self.safe.display((*rel, name)))
        elif node.type == "symlink":
            _remove_existing(name, dir_fd)
            os.symlink(node.target, name, dir_fd=dir_fd)
            _apply_entry_metadata(name, dir_fd, node)
            plan.symlinks += 1
        elif node.type == "file":
            _remove_existing(name, dir_fd)
            if self._plan_link(node, (*rel, name), plan):
                return
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
            )
            os.close(fd)
            number = len(plan.files)
            plan.files.append(_FileJob((*rel, name), node))
            if node.size >= STREAM_MIN_SIZE:
                plan.streams.append(number)
                return
            offset = 0
            for chunk_id, size in zip(node.chunk_ids, node.sizes, strict=True):
                plan.targets[chunk_id].append((number, offset))
                plan.sizes[chunk_id] = size
                offset += size
        else:
            self._make_special(node, dir_fd, rel)

    def _plan_link(self, node: Node, rel: tuple[bytes, ...], plan: _Plan) -> bool:
        """Return whether ``node`` is a later path of a hard-linked file already planned.

        Paths that shared an inode at snapshot time and still have the same
        content become hard links to the first restored path.
        """
        if node.nlink < 2 or not node.inode:
            return False
        key = (node.device, node.inode)
        first = plan.link_sources.get(key)
        if first is None:
            plan.link_sources[key] = len(plan.files)
            return False
        source = plan.files[first].node
        if (source.size, source.digest) != (node.size, node.digest):
            return False
        plan.links.append((rel, first))
        return True

    def _make_special(self, node: Node, dir_fd: int, rel: tuple[bytes, ...]) -> None:
        _remove_existing(node.name, dir_fd)
        kinds = {"fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}
        if node.type not in kinds:
            log.warning(
                "not restoring %s of type %s", self.safe.display((*rel, node.name)), node.type
            )
            return
        try:
            os.mknod(node.name, kinds[node.type] | node.mode, node.rdev, dir_fd=dir_fd)
        except PermissionError:
            log.warning("no permission to create device %s", self.safe.display((*rel, node.name)))
            return
        # mknod applies the umask; the entry was just created, so chmod follows no symlink.
        os.chmod(node.name, node.mode, dir_fd=dir_fd)
        _apply_entry_metadata(node.name, dir_fd, node)

    # Phase 2: content

    def _zero_id(self, size: int) -> bytes:
        zero_id = self._zero_ids.get(size)
        if zero_id is None:
            zero_id = self.repo.keys.blob_id(bytes(size))
            self._zero_ids[size] = zero_id
        return zero_id

    def _write_content(self, plan: _Plan) -> None:
        by_pack: dict[bytes, list[tuple[bytes, BlobLocation]]] = defaultdict(list)
        for chunk_id in plan.targets:
            if chunk_id == self._zero_id(plan.sizes[chunk_id]):
                self._advance(plan.sizes[chunk_id] * len(plan.targets[chunk_id]))
                continue
            location = self.repo.index.lookup(chunk_id)
            if location is None:
                self._fail(plan, chunk_id, f"chunk {chunk_id.hex()} is missing from the index")
                continue
            by_pack[location.pack_id].append((chunk_id, location))
        packs = sorted(by_pack.items(), key=lambda item: min(loc.offset for _, loc in item[1]))
        if self.workers == 1:
            for pack_id, blobs in packs:
                self._restore_pack(plan, pack_id, blobs)
        else:
            with ThreadPoolExecutor(
                max_workers=self.workers, thread_name_prefix="cas-restore"
            ) as pool:
                for future in [
                    pool.submit(self._restore_pack, plan, pid, blobs) for pid, blobs in packs
                ]:
                    future.result()
        for number in plan.streams:
            self._stream_file(plan.files[number])

    def _stream_file(self, job: _FileJob) -> None:
        """Restore a large file in order with direct I/O; see `cas.streamrestore`."""
        direct = hasattr(os, "O_DIRECT")
        try:
            try:
                fd = self._open_file(job, os.O_WRONLY | (os.O_DIRECT if direct else 0))
            except OSError as exc:
                if not direct or exc.errno != errno.EINVAL:
                    raise
                direct = False
                fd = self._open_file(job, os.O_WRONLY)
            try:
                job.error = restore_stream(
                    self.repo, job.node, fd, direct, self._zero_id, self._advance
                )
            finally:
                os.close(fd)
            job.verified = True
        except OSError as exc:
            job.error = f"write failed: {exc.strerror}"

    def _buffers(self) -> tuple[mmap.mmap, bytearray]:
        """Return this thread's reused span and plaintext buffers."""
        buffers: tuple[mmap.mmap, bytearray] | None = getattr(self._local, "buffers", None)
        if buffers is None:
            # Page-aligned, with room for the alignment a direct read adds.
            span = mmap.mmap(-1, self.repo.config.pack_size + (1 << 20) + 8192)
            plain = bytearray(self.repo.config.chunker.max_size + TAG_SIZE)
            buffers = self._local.buffers = (span, plain)
        return buffers

    def _restore_pack(
        self, plan: _Plan, pack_id: bytes, blobs: list[tuple[bytes, BlobLocation]]
    ) -> None:
        name = pack_name(pack_id)
        blobs.sort(key=lambda item: item[1].offset)
        span_buffer, plain_buffer = self._buffers()
        try:
            key_mode, salt = parse_prologue(self.repo.backend.get(name, 0, PROLOGUE_SIZE), name)
            opener = BlobOpener(self.repo.keys, pack_id, key_mode, salt)
            start = blobs[0][1].offset
            end = max(loc.offset + loc.stored_size for _, loc in blobs)
            needed = sum(loc.stored_size for _, loc in blobs)
            span: memoryview | None = None
            if end - start <= min(_SPAN_SLACK * needed, len(span_buffer) - 8192):
                try:
                    span = self.repo.backend.read_span(name, start, end - start, span_buffer)
                except CasError as exc:
                    # A pack cut short still contains the blobs before the cut:
                    # read each blob on its own so only the lost ones fail.
                    log.warning("reading pack %s in one span failed (%s)", pack_id.hex(), exc)
                    span = None
        except CasError as exc:
            for chunk_id, _ in blobs:
                self._fail(plan, chunk_id, f"pack {pack_id.hex()} is unreadable: {exc}")
            return
        # Descriptors are per call, so no thread closes a file another one writes.
        fds: dict[int, int] = {}
        try:
            for chunk_id, loc in blobs:
                try:
                    if span is not None:
                        stored = span[loc.offset - start : loc.offset - start + loc.stored_size]
                    else:
                        stored = memoryview(
                            self.repo.backend.get(name, loc.offset, loc.stored_size)
                        )
                    plain = opener.open(
                        chunk_id,
                        loc.blob_type,
                        loc.codec,
                        loc.filter,
                        loc.raw_size,
                        loc.offset,
                        stored,
                        plain_buffer,
                    )
                except CasError as exc:
                    self._fail(plan, chunk_id, str(exc))
                    continue
                for number, offset in plan.targets[chunk_id]:
                    self._pwrite(plan, fds, number, plain, offset)
                self._advance(len(plain) * len(plan.targets[chunk_id]))
        finally:
            for fd in fds.values():
                os.close(fd)

    def _pwrite(
        self, plan: _Plan, fds: dict[int, int], number: int, data: bytes | memoryview, offset: int
    ) -> None:
        job = plan.files[number]
        if job.error:
            return
        try:
            fd = fds.get(number)
            if fd is None:
                if len(fds) >= _MAX_OPEN_FILES:
                    # A pack can hold chunks of thousands of small files: keep the
                    # descriptors under the usual limit of 1,024 per process.
                    os.close(fds.pop(next(iter(fds))))
                fd = fds[number] = self._open_file(job, os.O_WRONLY)
            view = memoryview(data)
            while view:
                written = os.pwrite(fd, view, offset)
                view = view[written:]
                offset += written
        except OSError as exc:
            job.error = f"write failed: {exc.strerror}"

    def _open_file(self, job: _FileJob, flags: int) -> int:
        dir_fd = self.safe.open_dir(job.rel[:-1])
        try:
            return os.open(job.rel[-1], flags | os.O_NOFOLLOW, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def _fail(self, plan: _Plan, chunk_id: bytes, reason: str) -> None:
        log.error("%s", reason)
        for number, _ in plan.targets.get(chunk_id, []):
            if not plan.files[number].error:
                plan.files[number].error = reason

    def _advance(self, count: int) -> None:
        with self._lock:
            self.progress.bytes_written += count
        if self.progress_callback:
            self.progress_callback(self.progress)

    # Phase 3: sizes, digests, metadata

    def _finish_files(self, plan: _Plan) -> None:
        for job in plan.files:
            try:
                self._finish_file(job)
            except (OSError, IntegrityError) as exc:
                job.error = job.error or str(exc)
            self.progress.files_done += 1

    def _finish_file(self, job: _FileJob) -> None:
        fd = self._open_file(job, os.O_RDWR)
        try:
            os.ftruncate(fd, job.node.size)
            if (
                not job.error
                and not job.verified
                and _digest_fd(fd, job.node.size, self.threads) != job.node.digest
            ):
                job.error = "content does not match the digest recorded in the snapshot"
            # A file that failed keeps mode 0600 and the time of the checkout, so
            # tools that compare size and mtime do not take it for the original.
            if not job.error:
                _apply_metadata(fd, job.node)
        finally:
            os.close(fd)

    def _make_links(self, plan: _Plan) -> None:
        for rel, first in plan.links:
            source = plan.files[first]
            job = _FileJob(rel, source.node)
            plan.files.append(job)
            if source.error:
                job.error = f"hard link to a file that failed: {source.error}"
                continue
            try:
                source_dir = self.safe.open_dir(source.rel[:-1])
                try:
                    target_dir = self.safe.open_dir(rel[:-1])
                    try:
                        os.link(
                            source.rel[-1],
                            rel[-1],
                            src_dir_fd=source_dir,
                            dst_dir_fd=target_dir,
                            follow_symlinks=False,
                        )
                    finally:
                        os.close(target_dir)
                finally:
                    os.close(source_dir)
            except OSError as exc:
                job.error = f"hard link failed: {exc.strerror}"

    def _finish_dirs(self, plan: _Plan) -> None:
        for job in sorted(plan.dirs, key=lambda item: len(item.rel), reverse=True):
            if job.node is None:
                continue
            try:
                fd = self.safe.open_dir(job.rel)
                try:
                    _apply_metadata(fd, job.node)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("cannot restore metadata of %s: %s", self.safe.display(job.rel), exc)


_DIGEST_BLOCK = 8 << 20
_digest_buffers = threading.local()


def _digest_fd(fd: int, size: int, threads: int) -> bytes:
    """Return the BLAKE3 of a file's first ``size`` bytes, read through a reused buffer.

    Reading into one buffer per thread, rather than mapping the file, keeps the
    resident set flat for files of any size.
    """
    buffer = getattr(_digest_buffers, "buffer", None)
    if buffer is None:
        buffer = _digest_buffers.buffer = bytearray(_DIGEST_BLOCK)
    view = memoryview(buffer)
    hasher = blake3.blake3(max_threads=threads)
    offset = 0
    while offset < size:
        count = os.preadv(fd, [view[: min(_DIGEST_BLOCK, size - offset)]], offset)
        if count == 0:
            break
        hasher.update(view[:count])
        offset += count
    view.release()
    return hasher.digest()


def _apply_metadata(fd: int, node: Node) -> None:
    if os.geteuid() == 0:
        try:
            os.fchown(fd, node.uid, node.gid)
        except OSError as exc:
            log.warning("cannot restore owner of %r: %s", node.name, exc)
    _apply_xattrs(fd, node)
    os.fchmod(fd, node.mode)
    os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))


def _apply_entry_metadata(name: bytes, dir_fd: int, node: Node) -> None:
    """Set the owner (as root) and times of a symlink or special file, never following it."""
    try:
        if os.geteuid() == 0:
            os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
        os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        log.warning("cannot restore owner or times of %r: %s", node.name, exc.strerror)


def _apply_xattrs(fd: int, node: Node) -> None:
    """Set the node's extended attributes; a file system without them gets a warning."""
    for key, value in node.xattrs.items():
        try:
            os.setxattr(fd, key, value)
        except OSError as exc:
            log.warning(
                "cannot restore extended attribute %r of %r: %s", key, node.name, exc.strerror
            )


def _require_real_dir(name: bytes, dir_fd: int, shown: str) -> None:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{shown} exists in the target and is not a folder; remove it first")


def _remove_existing(name: bytes, dir_fd: int) -> None:
    """Remove a non-folder entry that an overwrite replaces; never follows a symlink."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(
            f"a folder named {os.fsdecode(name)!r} is in the way of a file in the checkout "
            f"target; remove it or check out into an empty folder"
        )
    os.unlink(name, dir_fd=dir_fd)
