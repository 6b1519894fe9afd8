"""Garbage collection: delete or repack packs to reclaim space that no snapshot uses.

Phase 1 runs under a shared lock, so snapshots go on. It lists the index
objects (the set S0), the packs and the snapshots, and marks every tree and
chunk that a snapshot reaches. A pack with nothing live, or listed by no
index object, is deleted later. A pack whose unused share is above
``max_unused`` has its live blobs copied into new packs. New index objects
list every blob of the packs that stay and of the new packs, and name S0 in
``supersedes``.

Phase 2 runs under the exclusive lock. It walks the trees of snapshots that
appeared during phase 1, and a blob they use that the new index objects lack
keeps its pack and gets one more index object. Packs named by index objects
that appeared during phase 1 are kept. Then the S0 index objects are deleted,
and then the planned packs.

Crash safety: every index object names only packs that exist, at every step,
because new packs come before the index objects that list them and old index
objects go before their packs. docs/gc.md gives the whole argument.

A `Repository` that stays open across another process's gc must sync its
index cache after taking its next lock; `Archiver.run` and `Restorer.run` do.

NOTE: the mark set and the per-pack entry lists are held in memory, an
estimated 200 bytes per blob, so memory grows with the number of blobs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cas.codecs import DEFAULT_ZSTD_LEVEL, BlobEncoder, Codec
from cas.errors import CasError, IntegrityError, LockedError, NotFoundError, WriteOnlyKeyError
from cas.index import INDEX_PREFIX, entries_to_list, pack_name
from cas.locks import RepositoryLock
from cas.objects import ObjectKind, encode_object
from cas.pack import (
    MAX_BLOB_RAW_SIZE,
    PROLOGUE_SIZE,
    BlobOpener,
    BlobType,
    PackEntry,
    PackWriter,
    parse_prologue,
)
from cas.repository import Repository
from cas.snapshot import Snapshot

log = logging.getLogger(__name__)

DEFAULT_MAX_UNUSED = 0.10
# Trees go to their own packs with this target size, as in `cas.blobstore`.
_TREE_PACK_SIZE = 4 << 20
# An index entry takes about 60 bytes, so this keeps an index object near
# 30 MiB, well below the 256 MiB bound on sealed objects.
_MAX_INDEX_ENTRIES = 500_000
# Live blobs of a pack are read in runs: a gap of more than _READ_GAP bytes,
# or a run over _READ_RUN bytes, starts a new request.
_READ_GAP = 1 << 20
_READ_RUN = 32 << 20
_PACK_NAME = re.compile(r"^data/([0-9a-f]{2})/([0-9a-f]{64})$")

PackEntries = list[tuple[bytes, list[PackEntry]]]


@dataclass(frozen=True)
class GcOptions:
    """Settings of a gc run: ``max_unused`` is a fraction (0.10 = 10 %), ``wait`` in seconds."""

    max_unused: float = DEFAULT_MAX_UNUSED
    dry_run: bool = False
    wait: float = 0.0


@dataclass
class PackUsage:
    """One pack in gc's plan: its entries in S0 and the live copies chosen among them."""

    pack_id: bytes
    size: int
    exists: bool
    entries: list[PackEntry]
    live: list[PackEntry] = field(default_factory=list)
    action: str = "keep"

    @property
    def live_bytes(self) -> int:
        """Stored bytes of the live blob copies in this pack."""
        return sum(entry.stored_size for entry in self.live)

    @property
    def unused_bytes(self) -> int:
        """Bytes no snapshot needs: the whole pack when nothing in it is live."""
        if not self.live:
            return self.size
        return sum(entry.stored_size for entry in self.entries) - self.live_bytes


@dataclass
class GcPlan:
    """The result of phase 1: the state read at the start, the mark set and each pack's action."""

    index_names: frozenset[str]
    snapshot_hexes: frozenset[str]
    live: set[bytes]
    packs: dict[bytes, PackUsage]
    missing_blobs: int = 0

    def packs_with(self, action: str) -> list[PackUsage]:
        """Return the packs with one action (delete, repack, keep, missing), by id."""
        return sorted(
            (usage for usage in self.packs.values() if usage.action == action),
            key=lambda usage: usage.pack_id,
        )

    @property
    def unused_bytes(self) -> int:
        """Bytes in existing packs that no snapshot uses."""
        return sum(usage.unused_bytes for usage in self.packs.values() if usage.exists)

    @property
    def needs_new_index(self) -> bool:
        """Whether an indexed pack is deleted or repacked, so S0 must be replaced."""
        changed = self.packs_with("delete") + self.packs_with("repack")
        return any(usage.entries for usage in changed)


@dataclass(frozen=True)
class PackAction:
    """One pack that gc deletes or repacks (``action``), with its size and unused bytes."""

    pack_hex: str
    action: str
    size: int
    unused_bytes: int
    indexed: bool


@dataclass
class GcResult:
    """Counts and sizes in bytes of a gc run, or with ``dry_run`` of the planned one."""

    dry_run: bool
    snapshots: int
    live_blobs: int
    packs_deleted: int = 0
    packs_repacked: int = 0
    packs_written: int = 0
    bytes_deleted: int = 0
    bytes_repacked: int = 0
    bytes_written: int = 0
    index_objects_deleted: int = 0
    index_objects_written: int = 0
    rescued_blobs: int = 0
    packs_kept_for_new_snapshots: int = 0
    missing_blobs: int = 0
    exclusive_seconds: float = 0.0
    seconds: float = 0.0
    packs: list[PackAction] = field(default_factory=list)


@dataclass
class _Written:
    """The writes of phase 1: new packs with their entries, and the new index objects."""

    packs: PackEntries = field(default_factory=list)
    pack_bytes: int = 0
    index_names: list[str] = field(default_factory=list)


class _Marker:
    """The set of trees and chunks reachable from snapshots, and the ids added since a reset."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.live: set[bytes] = set()
        self.added: set[bytes] = set()

    def mark(self, snapshot: Snapshot) -> None:
        """Add the snapshot's trees and chunks to the mark set."""
        stack = [snapshot.tree_id]
        while stack:
            tree_id = stack.pop()
            if tree_id in self.live:
                continue
            try:
                nodes = self.repo.load_tree(tree_id)
            except CasError as exc:
                what = f"tree {tree_id.hex()} of snapshot {snapshot.snapshot_hex}"
                raise _stopped(what, exc) from None
            self._add(tree_id)
            for node in nodes:
                if node.type == "dir":
                    stack.append(node.subtree)
                else:
                    for chunk_id in node.chunk_ids:
                        self._add(chunk_id)

    def _add(self, blob_id: bytes) -> None:
        if blob_id not in self.live:
            self.live.add(blob_id)
            self.added.add(blob_id)


class GarbageCollector:
    """One gc run over an open repository; `run` takes the locks and runs both phases.

    The phases are public so that tests can interleave other operations
    between them; callers of `plan`, `write` and `commit` hold the locks.
    """

    def __init__(
        self,
        repo: Repository,
        options: GcOptions | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        if repo.keys.write_only:
            raise WriteOnlyKeyError.for_action("run gc, which reads and deletes data")
        self.repo = repo
        self.options = options or GcOptions()
        self.marker = _Marker(repo)
        self.index_bytes = 0
        # Called with (phase, done, total): "mark" counts snapshots, "repack" bytes.
        self.progress = progress

    def run(self) -> GcResult:
        """Run gc under a shared lock, upgraded to exclusive for the deletions."""
        started = time.monotonic()
        with RepositoryLock(
            self.repo.backend,
            self.repo.keys,
            exclusive=False,
            operation="gc",
            wait=self.options.wait,
            unique_operation=True,
        ) as lock:
            plan = self.plan()
            result = self._result(plan)
            if self.options.dry_run or not (plan.packs_with("delete") or plan.packs_with("repack")):
                result.seconds = time.monotonic() - started
                return result
            written = self.write(plan)
            try:
                lock.upgrade(self.options.wait)
            except LockedError:
                log.warning(
                    "gc wrote %d packs and %d index objects but could not take the exclusive "
                    "lock, so nothing was deleted; the next gc removes the duplicates",
                    len(written.packs),
                    len(written.index_names),
                )
                raise
            exclusive_started = time.monotonic()
            log.info(
                "gc took the exclusive lock after writing %d packs (%d bytes)",
                len(written.packs),
                written.pack_bytes,
            )
            result = self.commit(plan, written, result, lock)
            result.exclusive_seconds = time.monotonic() - exclusive_started
        # This process's cache still names the deleted packs; rebuild it so that
        # the open repository stays usable.
        self.repo.index.sync()
        result.seconds = time.monotonic() - started
        log.info(
            "gc done: %d packs deleted, %d repacked, exclusive lock held %.3f s",
            result.packs_deleted,
            result.packs_repacked,
            result.exclusive_seconds,
        )
        return result

    # Phase 1: read, mark and plan

    def plan(self) -> GcPlan:
        """List index objects, packs and snapshots, mark live blobs, and decide each pack."""
        self.repo.index.sync()
        index_names = sorted(info.name for info in self.repo.backend.list(INDEX_PREFIX))
        indexed = self._read_index_objects(index_names)
        sizes = self._list_packs()
        snapshot_hexes = self.repo.snapshot_names()
        for done, snapshot_hex in enumerate(snapshot_hexes, 1):
            self.marker.mark(self._load_snapshot(snapshot_hex))
            if self.progress:
                self.progress("mark", done, len(snapshot_hexes))
        live = self.marker.live
        log.info(
            "gc marked %d blobs in %d snapshots; %d index objects, %d packs",
            len(live),
            len(snapshot_hexes),
            len(index_names),
            len(sizes),
        )
        packs = {
            pack_id: PackUsage(
                pack_id,
                sizes.get(pack_id, 0),
                pack_id in sizes,
                sorted(indexed.get(pack_id, {}).values(), key=lambda entry: entry.offset),
            )
            for pack_id in set(indexed) | set(sizes)
        }
        missing = _choose_live_copies(packs, live)
        self._decide(packs)
        return GcPlan(frozenset(index_names), frozenset(snapshot_hexes), live, packs, missing)

    def _load_snapshot(self, snapshot_hex: str) -> Snapshot:
        try:
            return self.repo.load_snapshot(snapshot_hex)
        except NotFoundError:
            raise LockedError(
                f"snapshot {snapshot_hex} disappeared while gc read it; another prune or gc "
                f"is running. Run gc again when it ends"
            ) from None
        except CasError as exc:
            raise _stopped(f"snapshot {snapshot_hex}", exc) from None

    def _read_index_objects(self, names: list[str]) -> dict[bytes, dict[int, PackEntry]]:
        """Return pack id -> offset -> entry over the index objects, each entry once."""
        indexed: dict[bytes, dict[int, PackEntry]] = {}
        for name in names:
            try:
                packs, _supersedes = self.repo.index.read_index_object(name)
            except NotFoundError:
                raise LockedError(
                    f"index object {name} disappeared while gc read it; another gc is "
                    f"running. Run gc again when it ends"
                ) from None
            except CasError as exc:
                # Its packs would look unlisted and be deleted, so stop.
                raise _stopped(f"index object {name}", exc) from None
            for pack_id, entries in packs:
                by_offset = indexed.setdefault(pack_id, {})
                for entry in entries:
                    by_offset[entry.offset] = entry
        return indexed

    def _list_packs(self) -> dict[bytes, int]:
        sizes = {}
        for info in self.repo.backend.list("data/"):
            match = _PACK_NAME.match(info.name)
            if match and match.group(2).startswith(match.group(1)):
                sizes[bytes.fromhex(match.group(2))] = info.size
            else:
                log.debug("gc ignores %s, which is not named like a pack", info.name)
        return sizes

    def _decide(self, packs: dict[bytes, PackUsage]) -> None:
        for usage in packs.values():
            if not usage.exists:
                usage.action = "missing"
                if usage.live:
                    log.warning(
                        "pack %s is listed in the index and contains live blobs, but is missing; "
                        "run `cas check`",
                        usage.pack_id.hex(),
                    )
            elif not usage.live:
                usage.action = "delete"
            elif usage.unused_bytes > self.options.max_unused * usage.size:
                usage.action = "repack"

    def _result(self, plan: GcPlan) -> GcResult:
        deleted, repacked = plan.packs_with("delete"), plan.packs_with("repack")
        result = GcResult(
            dry_run=self.options.dry_run,
            snapshots=len(plan.snapshot_hexes),
            live_blobs=len(plan.live),
            packs_deleted=len(deleted),
            packs_repacked=len(repacked),
            bytes_deleted=sum(usage.size for usage in deleted),
            bytes_repacked=sum(usage.size for usage in repacked),
            missing_blobs=plan.missing_blobs,
        )
        result.packs = [
            PackAction(u.pack_id.hex(), u.action, u.size, u.unused_bytes, bool(u.entries))
            for u in deleted + repacked
        ]
        return result

    # Phase 1: write the new packs and index objects

    def write(self, plan: GcPlan) -> _Written:
        """Copy live blobs of the packs to repack into new packs; publish the new index."""
        written = _Written()
        try:
            self._repack(plan, written)
        except BaseException:
            # The new packs are listed by no index object, so no one can be using them.
            for pack_id, _entries in written.packs:
                with contextlib.suppress(CasError):
                    self.repo.backend.delete(pack_name(pack_id))
            raise
        if plan.needs_new_index:
            self._write_index(plan, written)
        return written

    def _repack(self, plan: GcPlan, written: _Written) -> None:
        keys, config = self.repo.keys, self.repo.config
        writers = {
            BlobType.CHUNK: PackWriter(keys, config.pack_size, config.chunker.max_size),
            BlobType.TREE: PackWriter(keys, _TREE_PACK_SIZE, MAX_BLOB_RAW_SIZE),
        }
        # A copied blob keeps its codec and filter. A zstd blob gets the config's
        # level, or the default level when the config's codec is another one.
        level = config.compression.level or DEFAULT_ZSTD_LEVEL
        encoders = {
            codec: BlobEncoder(codec, level, config.chunker.max_size)
            for codec in (Codec.LZ4, Codec.ZSTD)
        }
        total = sum(
            entry.stored_size for usage in plan.packs_with("repack") for entry in usage.live
        )
        done = 0
        for usage in plan.packs_with("repack"):
            for entry, plain in self._read_live(usage):
                done += entry.stored_size
                if self.progress:
                    self.progress("repack", done, total)
                writer = writers[entry.blob_type]
                encoder = encoders.get(entry.codec)
                encoded = encoder.encode(plain, entry.filter) if encoder else None
                if encoded is None:
                    writer.add(entry.blob_type, entry.blob_id, plain, Codec.NONE, entry.raw_size)
                else:
                    payload, codec, filt = encoded
                    writer.add(entry.blob_type, entry.blob_id, payload, codec, entry.raw_size, filt)
                if writer.full:
                    self._upload(writer, written)
            log.debug("gc copied %d blobs of pack %s", len(usage.live), usage.pack_id.hex())
        for writer in writers.values():
            if writer.blob_count:
                self._upload(writer, written)

    def _upload(self, writer: PackWriter, written: _Written) -> None:
        data = writer.finish()
        self.repo.backend.put(pack_name(writer.pack_id), data)
        written.packs.append((writer.pack_id, list(writer.entries)))
        written.pack_bytes += len(data)
        writer.reset()

    def _read_live(self, usage: PackUsage) -> Iterator[tuple[PackEntry, bytes]]:
        """Yield each live blob of a pack with its verified plaintext, in offset order."""
        name = pack_name(usage.pack_id)
        key_mode, salt = parse_prologue(self.repo.backend.get(name, 0, PROLOGUE_SIZE), name)
        opener = BlobOpener(self.repo.keys, usage.pack_id, key_mode, salt)
        for start, end, run in _read_runs(sorted(usage.live, key=lambda entry: entry.offset)):
            data = memoryview(self.repo.backend.get(name, start, end - start))
            for entry in run:
                stored = data[entry.offset - start : entry.offset - start + entry.stored_size]
                try:
                    plain = opener.open(
                        entry.blob_id,
                        entry.blob_type,
                        entry.codec,
                        entry.filter,
                        entry.raw_size,
                        entry.offset,
                        stored,
                    )
                except IntegrityError as exc:
                    raise _stopped("a blob to repack", exc, "--read-data") from None
                yield entry, bytes(plain)

    def _write_index(self, plan: GcPlan, written: _Written) -> None:
        """Publish index objects for the packs that stay and the new packs, superseding S0."""
        packs: PackEntries = [
            (usage.pack_id, usage.entries)
            for usage in plan.packs_with("keep") + plan.packs_with("missing")
            if usage.entries and (usage.exists or usage.live)
        ]
        packs += written.packs
        supersedes = sorted(plan.index_names)
        for batch in _batches(packs, _MAX_INDEX_ENTRIES):
            name = self._publish_index(batch, supersedes)
            written.index_names.append(name)

    def _publish_index(self, packs: PackEntries, supersedes: list[str]) -> str:
        name = INDEX_PREFIX + os.urandom(32).hex()
        body = {
            "v": 1,
            "packs": [[pack_id, entries_to_list(entries)] for pack_id, entries in packs],
            "supersedes": supersedes,
        }
        data = encode_object(self.repo.keys, ObjectKind.INDEX, name, body)
        self.repo.backend.put(name, data)
        self.index_bytes += len(data)
        log.debug("gc published %s with %d packs", name, len(packs))
        return name

    # Phase 2: under the exclusive lock

    def commit(
        self,
        plan: GcPlan,
        written: _Written,
        result: GcResult | None = None,
        lock: RepositoryLock | None = None,
    ) -> GcResult:
        """Protect what new snapshots need, then delete S0 and the planned packs.

        The caller holds the exclusive lock; ``lock``, when given, is checked
        once more right before the first deletion.
        """
        result = result or self._result(plan)
        names_now = {info.name for info in self.repo.backend.list(INDEX_PREFIX)}
        if plan.needs_new_index and plan.index_names - names_now:
            # Another gc that ran meanwhile either deleted this run's index objects
            # too, or read them as new and kept every pack they name, so leaving
            # them in place keeps every index object's packs in existence.
            raise LockedError(
                f"{len(plan.index_names - names_now)} index objects disappeared while gc ran, "
                f"so another gc or repair changed the repository; nothing was deleted. Run gc "
                f"again"
            )
        new_names = names_now - plan.index_names - set(written.index_names)
        protected, new_blobs, complete = self._read_new_indexes(new_names)
        rescued = self._mark_new_snapshots(plan, new_blobs)
        for pack_id, _entries in rescued:
            protected.add(pack_id)
        if rescued:
            written.index_names.append(self._publish_index(rescued, []))
        if lock is not None:
            lock.check_held()
        if plan.needs_new_index:
            for name in sorted(plan.index_names):
                self._delete(name)
                result.index_objects_deleted += 1
        self._delete_packs(plan, protected, complete, result)
        result.packs_written = len(written.packs)
        result.bytes_written = written.pack_bytes + self.index_bytes
        result.index_objects_written = len(written.index_names)
        result.rescued_blobs = sum(len(entries) for _pack_id, entries in rescued)
        return result

    def _read_new_indexes(self, names: set[str]) -> tuple[set[bytes], set[bytes], bool]:
        """Return the packs and blobs that index objects published during phase 1 name.

        The flag is False when one of them cannot be read; then no unlisted
        pack is deleted, since that object might list it.
        """
        packs: set[bytes] = set()
        blobs: set[bytes] = set()
        complete = True
        for name in sorted(names):
            try:
                listed, _supersedes = self.repo.index.read_index_object(name)
            except CasError as exc:
                log.warning("gc keeps every unlisted pack: index object %s: %s", name, exc)
                complete = False
                continue
            for pack_id, entries in listed:
                packs.add(pack_id)
                blobs.update(entry.blob_id for entry in entries)
        return packs, blobs, complete

    def _mark_new_snapshots(self, plan: GcPlan, new_blobs: set[bytes]) -> PackEntries:
        """Mark snapshots that appeared since phase 1; return the entries to index again.

        A blob that a new snapshot uses and that phase 1 found dead is kept
        where it is, unless a pack that stays, or a new index object, has it.
        """
        new_hexes = sorted(set(self.repo.snapshot_names()) - plan.snapshot_hexes)
        if not new_hexes:
            return []
        self.repo.index.sync()
        self.marker.added.clear()
        for snapshot_hex in new_hexes:
            self.marker.mark(self._load_snapshot(snapshot_hex))
        needed = self.marker.added - new_blobs
        for usage in plan.packs_with("keep"):
            needed.difference_update(entry.blob_id for entry in usage.entries)
        rescued: dict[bytes, list[PackEntry]] = {}
        for usage in plan.packs_with("delete") + plan.packs_with("repack"):
            for entry in usage.entries:
                if entry.blob_id in needed:
                    needed.discard(entry.blob_id)
                    rescued.setdefault(usage.pack_id, []).append(entry)
        if needed:
            log.warning("%d blobs of new snapshots are in no index object", len(needed))
        log.info("gc walked %d new snapshots; %d packs kept for them", len(new_hexes), len(rescued))
        return sorted(rescued.items())

    def _delete_packs(
        self, plan: GcPlan, protected: set[bytes], complete: bool, result: GcResult
    ) -> None:
        result.packs_deleted = result.packs_repacked = 0
        result.bytes_deleted = result.bytes_repacked = 0
        for usage in plan.packs_with("delete") + plan.packs_with("repack"):
            if usage.pack_id in protected or (not usage.entries and not complete):
                result.packs_kept_for_new_snapshots += 1
                continue
            self._delete(pack_name(usage.pack_id))
            if usage.action == "delete":
                result.packs_deleted += 1
                result.bytes_deleted += usage.size
            else:
                result.packs_repacked += 1
                result.bytes_repacked += usage.size

    def _delete(self, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            self.repo.backend.delete(name)


def _choose_live_copies(packs: dict[bytes, PackUsage], live: set[bytes]) -> int:
    """Assign each live blob to one copy; return how many live blobs no index lists.

    Packs with more live bytes are served first, so a blob stored twice (an
    interrupted gc, two concurrent writers, or one pack holding it twice) keeps
    the copy in the pack that stays fullest. Missing packs are served last.
    """
    candidate: dict[bytes, int] = {}
    for usage in packs.values():
        seen: set[bytes] = set()
        total = 0
        for entry in usage.entries:
            if entry.blob_id in live and entry.blob_id not in seen:
                seen.add(entry.blob_id)
                total += entry.stored_size
        candidate[usage.pack_id] = total
    order = sorted(
        packs.values(),
        key=lambda usage: (not usage.exists, -candidate[usage.pack_id], usage.pack_id),
    )
    assigned: set[bytes] = set()
    for usage in order:
        for entry in usage.entries:
            if entry.blob_id in live and entry.blob_id not in assigned:
                assigned.add(entry.blob_id)
                usage.live.append(entry)
    return len(live) - len(assigned)


def _read_runs(
    entries: list[PackEntry],
) -> Iterator[tuple[int, int, list[PackEntry]]]:
    """Group entries sorted by offset into (start, end, entries) byte ranges to read at once."""
    run: list[PackEntry] = []
    start = end = 0
    for entry in entries:
        entry_end = entry.offset + entry.stored_size
        if run and (entry.offset - end > _READ_GAP or entry_end - start > _READ_RUN):
            yield start, end, run
            run = []
        if not run:
            start = entry.offset
        run.append(entry)
        end = max(end, entry_end) if len(run) > 1 else entry_end
    if run:
        yield start, end, run


def _batches(packs: PackEntries, limit: int) -> Iterator[PackEntries]:
    """Split pack lists into batches of at most about ``limit`` entries (whole packs)."""
    batch: PackEntries = []
    count = 0
    for pack_id, entries in packs:
        if batch and count + len(entries) > limit:
            yield batch
            batch, count = [], 0
        batch.append((pack_id, entries))
        count += len(entries)
    if batch:
        yield batch


def _stopped(what: str, exc: CasError, check_option: str = "") -> IntegrityError:
    """Return the error that stops gc, before any deletion, when it cannot read something."""
    command = f"cas check {check_option}".strip()
    return IntegrityError(
        f"gc stopped: {what} cannot be read ({exc}). Nothing was deleted; run `{command}`"
    )


def measure_unused(repo: Repository) -> GcPlan:
    """Mark and plan without writing or locking; for `cas stats`."""
    return GarbageCollector(repo).plan()
