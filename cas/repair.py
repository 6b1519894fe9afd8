"""Repairs: rebuild the index from the packs, and rewrite snapshots that lost blobs.

Both run under an exclusive lock and only when a user asks for them. Each
publishes its new objects before it deletes the old ones, so an interrupted
repair leaves the old state or the new one, never neither.

`rebuild_index` trusts nothing but the packs: it reads every pack's prologue,
trailer and authenticated header, writes one index object that lists them
all and supersedes every old index object, deletes the old ones and rebuilds
the local cache.

`repair_snapshots` finds every lost blob with a full data check: a blob is lost
when it is missing from the index or fails to read, authenticate or verify. It
then rewrites each snapshot that uses one. A file is cut before its first lost
chunk and marked in its node's ``damaged`` field, and a file whose first chunk
is lost is dropped. A folder whose tree is lost becomes an empty folder, marked
the same way.
The new snapshot keeps the old time, gains the tag ``repaired`` and names the
old id in ``meta["repaired_from"]``; then the old snapshot object is deleted.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import blake3

from cas.archiver import deep_recursion
from cas.blobstore import BlobWriter
from cas.checker import check_repository
from cas.errors import CasError, NotFoundError, WriteOnlyKeyError
from cas.history import delete_replaced
from cas.index import INDEX_PREFIX, entries_to_list, pack_name
from cas.locks import RepositoryLock
from cas.objects import ObjectKind, encode_object
from cas.pack import (
    PROLOGUE_SIZE,
    TRAILER_SIZE,
    PackEntry,
    PackHeader,
    decode_header,
    parse_trailer,
)
from cas.repository import Repository
from cas.snapshot import SNAPSHOT_PREFIX, Snapshot
from cas.tree import Node, encode_tree

log = logging.getLogger(__name__)

REPAIRED_TAG = "repaired"
# Findings whose blob is unusable; "missing-pack" findings lose every blob of the pack.
_LOST_KINDS = frozenset({"missing-blob", "damaged-blob", "truncated-pack", "tree"})


# Index


@dataclass
class IndexRepairResult:
    """Counts and object names from one `rebuild_index` run."""

    packs: int = 0
    blobs: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    new_name: str = ""


def read_pack_header(repo: Repository, pack_id: bytes, size: int) -> PackHeader:
    """Read and authenticate one pack's header with three small reads."""
    name = pack_name(pack_id)
    prologue = repo.backend.get(name, 0, PROLOGUE_SIZE)
    trailer = repo.backend.get(name, size - TRAILER_SIZE, TRAILER_SIZE) if size >= 8 else b""
    header_size = parse_trailer(trailer, size, name)
    start = size - TRAILER_SIZE - header_size
    sealed = repo.backend.get(name, start, header_size)
    return decode_header(repo.keys, pack_id, prologue, sealed, start)


def _stored_packs(repo: Repository) -> Iterator[tuple[bytes, int]]:
    for info in repo.backend.list("data/"):
        try:
            pack_id = bytes.fromhex(info.name.rsplit("/", 1)[-1])
        except ValueError:
            continue
        if len(pack_id) == 32 and info.name == pack_name(pack_id):
            yield pack_id, info.size


def rebuild_index(repo: Repository, dry_run: bool = False) -> IndexRepairResult:
    """Replace every index object by one built from the pack headers; rebuild the cache."""
    if repo.keys.write_only:
        raise WriteOnlyKeyError.for_action("repair the index, which deletes index objects")
    with RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="repair index"):
        result = IndexRepairResult()
        packs: list[tuple[bytes, list[PackEntry]]] = []
        for pack_id, size in sorted(_stored_packs(repo)):
            try:
                header = read_pack_header(repo, pack_id, size)
            except CasError as exc:
                log.warning("skipping pack %s: %s", pack_id.hex(), exc)
                result.unreadable.append((pack_id.hex(), str(exc)))
                continue
            packs.append((pack_id, list(header.entries)))
            result.packs += 1
            result.blobs += len(header.entries)
        old_names = sorted(info.name for info in repo.backend.list(INDEX_PREFIX))
        result.removed = old_names
        if dry_run:
            return result
        # NOTE: one object contains every entry, so a repository of several
        # million blobs would exceed the 256 MiB object bound; split it then.
        body = {
            "v": 1,
            "packs": [[pack_id, entries_to_list(entries)] for pack_id, entries in packs],
            "supersedes": old_names,
        }
        result.new_name = INDEX_PREFIX + os.urandom(32).hex()
        repo.backend.put(
            result.new_name, encode_object(repo.keys, ObjectKind.INDEX, result.new_name, body)
        )
        for name in old_names:
            _delete_quietly(repo, name)
        repo.index.sync()
        log.info(
            "rebuilt the index: %d packs, %d blobs, %d old index objects removed",
            result.packs,
            result.blobs,
            len(old_names),
        )
        return result


def _delete_quietly(repo: Repository, name: str) -> None:
    try:
        repo.backend.delete(name)
    except NotFoundError:
        log.info("%s was already gone", name)


# Snapshots


@dataclass
class SnapshotRepair:
    """One snapshot that uses lost blobs, and what its repair kept."""

    old_hex: str
    new_hex: str = ""
    truncated: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    lost_folders: list[str] = field(default_factory=list)
    error: str = ""


@dataclass(frozen=True)
class _TreeResult:
    """A rewritten tree's id (the old one when unchanged) and its damage, relative to it."""

    tree_id: bytes
    damage: tuple[tuple[str, str], ...] = ()


def find_lost_blobs(repo: Repository) -> set[bytes]:
    """Return the ids of blobs that snapshots use and that cannot be read back intact."""
    report = check_repository(repo, read_data=True)
    lost: set[bytes] = set()
    lost_packs: set[str] = set()
    for finding in report.errors:
        if finding.kind in _LOST_KINDS and finding.blob_hex:
            lost.add(bytes.fromhex(finding.blob_hex))
        elif finding.kind == "missing-pack":
            lost_packs.add(finding.pack_hex)
    if lost_packs:
        for blob_id, location in repo.index.cache.items():
            if location.pack_id.hex() in lost_packs:
                lost.add(blob_id)
    return lost


class _Rewriter:
    """Rewrites trees without their lost blobs; each distinct tree is rewritten once."""

    def __init__(self, repo: Repository, lost: set[bytes], writer: BlobWriter | None) -> None:
        self.repo = repo
        self.lost = lost
        self.writer = writer
        self._done: dict[bytes, _TreeResult | None] = {}

    def tree(self, tree_id: bytes) -> _TreeResult | None:
        """Return the rewritten tree, or None when the tree itself is lost."""
        if tree_id not in self._done:
            self._done[tree_id] = self._rewrite(tree_id)
        return self._done[tree_id]

    def _rewrite(self, tree_id: bytes) -> _TreeResult | None:
        if tree_id in self.lost:
            return None
        try:
            nodes = self.repo.load_tree(tree_id)
        except CasError as exc:
            log.warning("tree %s is lost: %s", tree_id.hex(), exc)
            return None
        kept: list[Node] = []
        damage: list[tuple[str, str]] = []
        for node in nodes:
            name = node.name.decode(errors="backslashreplace")
            new_node = self._node(node, name, damage)
            if new_node is not None:
                kept.append(new_node)
        if kept == nodes:
            return _TreeResult(tree_id)
        return _TreeResult(self._store(kept), tuple(damage))

    def _node(self, node: Node, name: str, damage: list[tuple[str, str]]) -> Node | None:
        if node.type == "dir":
            sub = self.tree(node.subtree)
            if sub is None:
                damage.append((name, "lost_folders"))
                note = "folder content lost: its tree could not be read"
                return replace(node, subtree=self._store([]), damaged=note)
            damage.extend((f"{name}/{path}", kind) for path, kind in sub.damage)
            return node if sub.tree_id == node.subtree else replace(node, subtree=sub.tree_id)
        if node.type != "file" or not any(chunk in self.lost for chunk in node.chunk_ids):
            return node
        keep = next(i for i, chunk in enumerate(node.chunk_ids) if chunk in self.lost)
        if keep == 0:
            damage.append((name, "dropped"))
            return None
        damage.append((name, "truncated"))
        return self._truncate(node, keep)

    def _truncate(self, node: Node, keep: int) -> Node:
        """Return ``node`` cut to its first ``keep`` chunks, with the digest of what is left."""
        chunk_ids = node.chunk_ids[:keep]
        hasher = blake3.blake3()
        for chunk_id in chunk_ids:
            hasher.update(self.repo.read_blob(chunk_id))
        size = sum(node.sizes[:keep])
        note = (
            f"truncated by cas repair from {node.size} to {size} bytes: "
            f"chunk {keep + 1} of {len(node.sizes)} was lost"
        )
        return replace(
            node,
            chunks=b"".join(chunk_ids),
            sizes=node.sizes[:keep],
            size=size,
            digest=hasher.digest(),
            damaged=note,
        )

    def _store(self, nodes: list[Node]) -> bytes:
        payload = encode_tree(nodes)
        tree_id = self.repo.keys.blob_id(payload)
        if self.writer is not None:
            self.writer.add_tree(tree_id, payload)
        return tree_id


def repair_snapshots(repo: Repository, dry_run: bool = False) -> list[SnapshotRepair]:
    """Rewrite every snapshot that uses a lost blob; see the module docstring.

    With ``dry_run`` nothing is written or deleted, and the returned records
    have no ``new_hex``.
    """
    if repo.keys.write_only:
        raise WriteOnlyKeyError.for_action("repair snapshots, which reads them")
    with (
        deep_recursion(),
        RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="repair snapshots"),
    ):
        lost = find_lost_blobs(repo)
        log.info("%d blobs are lost", len(lost))
        writer = None if dry_run else BlobWriter(repo, threaded=False)
        rewriter = _Rewriter(repo, lost, writer)
        plans: list[tuple[Snapshot, SnapshotRepair, bytes]] = []
        repairs: list[SnapshotRepair] = []
        # Objects replaced by a tag change are hidden; repairing one would make it
        # visible again beside its replacement, so they are deleted instead.
        repo.list_snapshots()
        hidden = set(repo.replaced_snapshots)
        if not dry_run:
            delete_replaced(repo)
        for snapshot_hex in repo.snapshot_names():
            if snapshot_hex in hidden:
                continue
            planned = _plan_snapshot(repo, rewriter, snapshot_hex)
            if planned is None:
                continue
            repairs.append(planned[1])
            if not planned[1].error:
                plans.append(planned)
        if writer is None:
            return repairs
        writer.finish()
        for snapshot, record, root_id in plans:
            record.new_hex = _replace_snapshot(repo, snapshot, record, root_id)
        return repairs


def _plan_snapshot(
    repo: Repository, rewriter: _Rewriter, snapshot_hex: str
) -> tuple[Snapshot, SnapshotRepair, bytes] | None:
    """Return what repairing one snapshot means, or None when it needs no repair."""
    try:
        snapshot = repo.load_snapshot(snapshot_hex)
    except CasError as exc:
        return _unloadable(snapshot_hex, exc)
    record = SnapshotRepair(snapshot_hex)
    result = rewriter.tree(snapshot.tree_id)
    if result is None:
        record.error = "the root tree is lost, so nothing of this snapshot can be restored"
        return snapshot, record, b""
    if result.tree_id == snapshot.tree_id:
        return None
    for path, kind in result.damage:
        getattr(record, kind).append("/" + path)
    return snapshot, record, result.tree_id


def _unloadable(snapshot_hex: str, exc: CasError) -> tuple[Snapshot, SnapshotRepair, bytes]:
    placeholder = Snapshot(b"", "", "", "", (), b"")
    record = SnapshotRepair(snapshot_hex, error=f"the snapshot object is unreadable: {exc}")
    return placeholder, record, b""


def _replace_snapshot(
    repo: Repository, snapshot: Snapshot, record: SnapshotRepair, root_id: bytes
) -> str:
    """Write the repaired snapshot, then delete the old one; return the new hex id."""
    lost_count = len(record.truncated) + len(record.dropped) + len(record.lost_folders)
    note = (
        f"repaired: {len(record.truncated)} files truncated, {len(record.dropped)} dropped, "
        f"{len(record.lost_folders)} folders emptied"
    )
    tags = snapshot.tags if REPAIRED_TAG in snapshot.tags else (*snapshot.tags, REPAIRED_TAG)
    # `replaces` hides the damaged object from readers until it is deleted below.
    repaired = replace(
        snapshot,
        snapshot_id=b"",
        replaces=(snapshot.snapshot_id,),
        tree_id=root_id,
        tags=tags,
        message=f"{snapshot.message} ({note})" if snapshot.message else note,
        meta={
            **snapshot.meta,
            "repaired_from": snapshot.snapshot_hex,
            "repaired_paths": str(lost_count),
        },
    )
    stored, _size = repo.write_snapshot(repaired)
    _delete_quietly(repo, SNAPSHOT_PREFIX + snapshot.snapshot_hex)
    log.info("snapshot %s repaired as %s: %s", snapshot.snapshot_hex, stored.snapshot_hex, note)
    return stored.snapshot_hex
