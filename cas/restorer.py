"""Checking out a snapshot: recreate its tree in a folder, byte for byte, verified.

Phases:

1. Plan (`cas.restoreplan`): walk the snapshot's trees, create folders,
   symlinks and empty files, and list every (chunk id, file, offset) that
   must be written.
2. Content: group the needed chunks by pack, read each pack's needed range
   once, decrypt and verify each blob on a pool of threads, and write it
   with ``os.pwrite`` at every offset that needs it. All-zero chunks are
   recognised by id and never read nor written, so they stay holes.
3. Finish: truncate each file to its size, verify its whole-content BLAKE3
   digest, move rewritten files over the old ones, make hard links, delete
   entries the snapshot lacks (with ``delete``), then restore modes and
   times (folders last, deepest first).

Rollback: into a folder that is not empty (``overwrite``), an existing file
that `cas.target.is_trusted` accepts is kept as it is. Any other existing
file is rewritten whole under a temporary name in its folder and renamed
over the old one only once its digest is verified, so a checkout that fails
or stops half way leaves the old file intact. Entries of another type are
replaced. ``include`` restricts the checkout to some paths of the snapshot.

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
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cas.crypto import TAG_SIZE
from cas.errors import CasError, IntegrityError, UsageError
from cas.index import BlobLocation, pack_name
from cas.locks import RepositoryLock
from cas.pack import PROLOGUE_SIZE, BlobOpener, parse_prologue
from cas.paths import Selection, build_selection
from cas.repository import Repository
from cas.restoreplan import FileJob, Plan, Planner
from cas.snapshot import Snapshot
from cas.streamrestore import restore_stream
from cas.target import (
    DAMAGED_SUFFIX,
    TEMP_PREFIX,
    SafeTree,
    apply_metadata,
    digest_fd,
    free_name,
    lstat_entry,
    remove_entry,
)

log = logging.getLogger(__name__)

# Read a pack's whole needed span in one request unless it is over twice the
# bytes actually needed; then read each blob on its own.
_SPAN_SLACK = 2
# Descriptors each worker keeps open while it writes one pack's chunks.
_MAX_OPEN_FILES = 32


@dataclass
class CheckoutOptions:
    """Options of a checkout: rollback, partial checkout, threads, memory bound and lock wait.

    ``overwrite`` allows a target that is not empty and rolls it back to the
    snapshot. ``delete`` also removes entries the snapshot lacks, in the
    folders that are checked out whole. ``include`` lists snapshot paths to
    restore (as `cas ls` shows them); empty means the whole snapshot.
    """

    overwrite: bool = False
    threads: int = 0
    memory_limit: int = 256 << 20
    wait: float = 0.0
    delete: bool = False
    include: tuple[str, ...] = ()


@dataclass
class CheckoutProgress:
    """Counters handed to the progress callback."""

    bytes_written: int = 0
    bytes_total: int = 0
    files_done: int = 0


@dataclass(frozen=True)
class CheckoutResult:
    """Summary of a checkout; ``failed`` names each path that could not be restored.

    ``files`` counts every file path checked out: ``unchanged`` ones were kept
    as they were, ``rewritten`` ones replaced an existing file, ``created``
    ones are new. ``deleted`` counts entries removed because the snapshot
    lacks them (a folder counts once). ``bytes_written`` is the logical size
    of the files written, holes included; hard links add nothing to it.
    """

    files: int
    dirs: int
    symlinks: int
    bytes_total: int
    failed: tuple[tuple[str, str], ...]
    seconds: float
    unchanged: int = 0
    rewritten: int = 0
    created: int = 0
    deleted: int = 0
    bytes_written: int = 0


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
        self._check_target()
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
            # Every include is looked up before the target is created or changed.
            selection = None
            if self.options.include:
                selection = build_selection(
                    self.repo, self.snapshot.tree_id, list(self.options.include)
                )
            self._create_target()
            plan = self._restore(selection)
        return self._result(plan, started)

    def _restore(self, selection: Selection | None) -> Plan:
        self.safe = SafeTree(self.target)
        plan = Plan()
        try:
            planner = Planner(self.repo, self.safe, self.options.delete, self.threads)
            planner.build(plan, self.snapshot.tree_id, selection)
            self.progress.bytes_total = sum(job.node.size for job in plan.files if not job.kept)
            self._write_content(plan)
            self._finish_files(plan)
            self._make_links(plan)
            self._delete_extras(plan)
            self._finish_dirs(plan)
        finally:
            # After a failure or an interrupt, no temporary file stays behind.
            self._remove_temps(plan)
            self.safe.close()
        return plan

    def _result(self, plan: Plan, started: float) -> CheckoutResult:
        failed = tuple((self.safe.display(rel), reason) for rel, reason in plan.lost) + tuple(
            (self.safe.display(job.rel), job.error) for job in plan.files if job.error
        )
        done = [job for job in plan.files if not job.error]
        return CheckoutResult(
            files=len(plan.files),
            dirs=len(plan.dirs),
            symlinks=plan.symlinks,
            bytes_total=sum(job.node.size for job in plan.files),
            failed=failed,
            seconds=time.monotonic() - started,
            unchanged=sum(job.kept for job in done),
            rewritten=sum(job.existed and not job.kept for job in done),
            created=sum(not job.existed for job in done),
            deleted=plan.deleted,
            bytes_written=sum(job.node.size for job in done if not job.kept and not job.link),
        )

    def _check_target(self) -> None:
        if os.path.lexists(self.target) and not os.path.isdir(self.target):
            raise UsageError(
                f"checkout target {self.target} exists and is not a folder; "
                f"choose a new or empty folder"
            )
        if os.path.isdir(self.target) and os.listdir(self.target) and not self.options.overwrite:
            raise UsageError(
                f"checkout target {self.target} is not empty; choose an empty or new folder, "
                f"or pass --overwrite"
            )

    def _create_target(self) -> None:
        try:
            os.makedirs(self.target, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot create checkout target {self.target}: {exc.strerror}"
            ) from None

    # Phase 2: content

    def _zero_id(self, size: int) -> bytes:
        zero_id = self._zero_ids.get(size)
        if zero_id is None:
            zero_id = self.repo.keys.blob_id(bytes(size))
            self._zero_ids[size] = zero_id
        return zero_id

    def _write_content(self, plan: Plan) -> None:
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

    def _stream_file(self, job: FileJob) -> None:
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
        self, plan: Plan, pack_id: bytes, blobs: list[tuple[bytes, BlobLocation]]
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
        self, plan: Plan, fds: dict[int, int], number: int, data: bytes | memoryview, offset: int
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

    def _open_file(self, job: FileJob, flags: int) -> int:
        dir_fd = self.safe.open_dir(job.rel[:-1])
        try:
            return os.open(job.write_name, flags | os.O_NOFOLLOW, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def _fail(self, plan: Plan, chunk_id: bytes, reason: str) -> None:
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

    def _finish_files(self, plan: Plan) -> None:
        for job in plan.files:
            try:
                if job.kept:
                    self._finish_kept(job)
                elif job.error and job.existed and not job.temp:
                    # Planning failed before a temporary file existed, so the path
                    # may still hold the old file: truncating it would destroy it.
                    pass
                else:
                    self._finish_file(job)
            except (OSError, IntegrityError) as exc:
                job.error = job.error or str(exc)
            self.progress.files_done += 1

    def _finish_file(self, job: FileJob) -> None:
        fd = self._open_file(job, os.O_RDWR)
        try:
            os.ftruncate(fd, job.node.size)
            if (
                not job.error
                and not job.verified
                and digest_fd(fd, job.node.size, self.threads) != job.node.digest
            ):
                job.error = "content does not match the digest recorded in the snapshot"
            # A file that failed keeps mode 0600 and the time of the checkout, so
            # tools that compare size and mtime do not take it for the original.
            if not job.error:
                apply_metadata(fd, job.node)
        finally:
            os.close(fd)
        if job.temp:
            self._replace_with_temp(job)
        elif job.error:
            self._set_aside_damaged(job)

    def _set_aside_damaged(self, job: FileJob) -> None:
        """Rename a file that failed to NAME.cas-damaged, so its real name is never damaged.

        A model loader that opens the real name then fails loudly, instead of reading
        zeros where a chunk was lost. The renamed file keeps the intact parts for salvage.
        If the rename fails (a name too long for the suffix), the file is removed instead.
        """
        dir_fd = self.safe.open_dir(job.rel[:-1])
        try:
            damaged = free_name(job.rel[-1] + DAMAGED_SUFFIX, dir_fd)
            os.rename(job.rel[-1], damaged, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            job.error += f"; the restored part was kept as {os.fsdecode(damaged)}"
        except OSError as exc:
            os.unlink(job.rel[-1], dir_fd=dir_fd)
            job.error += f"; the file was removed, since renaming it failed: {exc.strerror}"
        finally:
            os.close(dir_fd)

    def _replace_with_temp(self, job: FileJob) -> None:
        """Rename a verified rewrite over the old file; a failed one is dropped."""
        dir_fd = self.safe.open_dir(job.rel[:-1])
        try:
            if job.error:
                os.unlink(job.temp, dir_fd=dir_fd)
                job.error += "; the existing file was left as it was"
            else:
                os.rename(job.temp, job.rel[-1], src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            job.temp = b""
        finally:
            os.close(dir_fd)

    def _finish_kept(self, job: FileJob) -> None:
        """Set the mode, owner and times of a kept file; its content is not touched."""
        fd = self._open_file(job, os.O_RDONLY)
        try:
            apply_metadata(fd, job.node)
        finally:
            os.close(fd)

    def _remove_temps(self, plan: Plan) -> None:
        for job in plan.files:
            if not job.temp:
                continue
            try:
                dir_fd = self.safe.open_dir(job.rel[:-1])
                try:
                    os.unlink(job.temp, dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                log.warning(
                    "cannot remove temporary file %s: %s",
                    self.safe.display((*job.rel[:-1], job.temp)),
                    exc.strerror,
                )
            job.temp = b""

    def _make_links(self, plan: Plan) -> None:
        for rel, first in plan.links:
            source = plan.files[first]
            job = FileJob(rel, source.node, link=True)
            plan.files.append(job)
            if source.error:
                job.error = f"hard link to a file that failed: {source.error}"
                continue
            try:
                source_dir = self.safe.open_dir(source.rel[:-1])
                try:
                    target_dir = self.safe.open_dir(rel[:-1])
                    try:
                        self._link(source, job, source_dir, target_dir)
                    finally:
                        os.close(target_dir)
                finally:
                    os.close(source_dir)
            except OSError as exc:
                job.error = f"hard link failed: {exc.strerror}"

    def _link(self, source: FileJob, job: FileJob, source_dir: int, target_dir: int) -> None:
        """Link ``job``'s path to the source file, replacing another file already there."""
        name = job.rel[-1]
        existing = lstat_entry(name, target_dir)
        job.existed = existing is not None
        if existing is not None:
            source_st = os.stat(source.rel[-1], dir_fd=source_dir, follow_symlinks=False)
            if (existing.st_dev, existing.st_ino) == (source_st.st_dev, source_st.st_ino):
                job.kept = True
                return
            # Link under a temporary name, then rename over the old file in one step.
            name = TEMP_PREFIX + os.urandom(8).hex().encode()
        os.link(
            source.rel[-1],
            name,
            src_dir_fd=source_dir,
            dst_dir_fd=target_dir,
            follow_symlinks=False,
        )
        if name != job.rel[-1]:
            try:
                os.rename(name, job.rel[-1], src_dir_fd=target_dir, dst_dir_fd=target_dir)
            except OSError:
                os.unlink(name, dir_fd=target_dir)
                raise

    def _delete_extras(self, plan: Plan) -> None:
        """Remove the entries that the snapshot lacks, after every file is in place."""
        for rel, name in plan.extras:
            try:
                dir_fd = self.safe.open_dir(rel)
                try:
                    remove_entry(name, dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError as exc:
                reason = f"delete failed: {exc.strerror}"
                log.error("%s: %s", self.safe.display((*rel, name)), reason)
                plan.lost.append(((*rel, name), reason))
                continue
            plan.deleted += 1

    def _finish_dirs(self, plan: Plan) -> None:
        for job in sorted(plan.dirs, key=lambda item: len(item.rel), reverse=True):
            if job.node is None:
                continue
            try:
                fd = self.safe.open_dir(job.rel)
                try:
                    apply_metadata(fd, job.node)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.warning("cannot restore metadata of %s: %s", self.safe.display(job.rel), exc)
