"""Copying snapshots into another repository, transferring only the blobs it lacks.

Two repositories share chunk ids when they share the id key, which `cas init
--copy-chunker-params-from` arranges together with the chunker key and parameters. Then
every tree and chunk keeps its id, a lookup in the target's index decides what to send, and
each snapshot object is copied byte for byte, so it keeps its id in the target.

Without a shared id key, every chunk is read and decrypted to compute its id under the
target's id key, and trees are rewritten with those ids. The chunks keep the source's cut
points, so they do not deduplicate against data snapshotted directly into the target, whose
chunker cuts at other points. A rewritten snapshot records its source in the meta
``cas.copied_from``.

Write order in the target is the one of a snapshot run: packs, then the index object, then
the snapshot object, one snapshot at a time, under a shared lock in each repository.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from cas.archiver import deep_recursion
from cas.blobstore import BlobWriter
from cas.crypto import MasterKeys
from cas.errors import AlreadyExistsError, UsageError
from cas.locks import RepositoryLock
from cas.objects import MAX_OBJECT_SIZE, ObjectKind, open_object, seal_object
from cas.parts import JOIN_META_PREFIX
from cas.repository import Repository
from cas.snapshot import SNAPSHOT_PREFIX, Snapshot
from cas.tree import Node, decode_tree, encode_tree

log = logging.getLogger(__name__)

COPIED_FROM_META = "cas.copied_from"
# Packs whose prologue (key mode and salt) stays known while blobs are read.


def keys_sharing_ids(source: MasterKeys) -> MasterKeys:
    """Return new random master keys that take the id key and chunker key of ``source``.

    A repository created with them cuts chunks at the same points and names them with the
    same ids as the source, while its data key, index key and X25519 key pair are its own.
    """
    fresh = MasterKeys.generate()
    return replace(fresh, id_key=source.id_key, chunker_key=source.chunker_key)


@dataclass
class CopyResult:
    """Summary of a copy: (source hex, target hex) id pairs and the bytes written to the target."""

    copied: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    blobs_copied: int = 0
    bytes_added: int = 0
    shared_ids: bool = False


def _shared_lock(repo: Repository) -> RepositoryLock:
    return RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="copy")


class Copier:
    """Copies snapshots from ``source`` to ``target``; see the module docstring."""

    def __init__(self, source: Repository, target: Repository) -> None:
        if source.config.repo_id == target.config.repo_id:
            raise UsageError("the source and the target of a copy are the same repository")
        self.source = source
        self.target = target
        self.shared_ids = source.keys.id_key == target.keys.id_key
        # Source id -> target id of every tree, chunk and snapshot handled in this run.
        # NOTE: the chunk map grows by an estimated 150 bytes per distinct chunk copied.
        self._tree_ids: dict[bytes, bytes] = {}
        self._chunk_ids: dict[bytes, bytes] = {}
        self._snapshot_ids: dict[bytes, bytes] = {}
        self._present: dict[str, str] = {}
        self.result = CopyResult(shared_ids=self.shared_ids)

    def select(self, names: list[str]) -> list[Snapshot]:
        """Resolve snapshot names of the source (all snapshots when none), oldest first."""
        if not names:
            return self.source.list_snapshots()
        chosen = {snap.snapshot_id: snap for snap in map(self.source.resolve_snapshot, names)}
        return sorted(chosen.values(), key=lambda snap: (snap.datetime, snap.snapshot_hex))

    def run(self, snapshots: list[Snapshot]) -> CopyResult:
        """Copy each snapshot that the target lacks, under a shared lock in both repositories."""
        with (
            RepositoryLock(
                self.source.backend, self.source.keys, exclusive=False, operation="copy"
            ),
            RepositoryLock(
                self.target.backend, self.target.keys, exclusive=False, operation="copy"
            ),
            deep_recursion(),
        ):
            self.source.index.sync()
            self.target.index.sync()
            self._present = self._target_copies()
            for snapshot in snapshots:
                found = self._existing_copy(snapshot, self._present)
                if found is not None:
                    log.info("snapshot %s is in the target as %s", snapshot.snapshot_hex, found)
                    self._snapshot_ids[snapshot.snapshot_id] = bytes.fromhex(found)
                    self.result.skipped.append((snapshot.snapshot_hex, found))
                    continue
                self._copy_snapshot(snapshot)
        self.result.bytes_added += self.target.index.bytes_written
        return self.result

    def _target_copies(self) -> dict[str, str]:
        """Return a map to each target snapshot hex from itself and from its source."""
        present: dict[str, str] = {}
        for snapshot in self.target.list_snapshots():
            present[snapshot.snapshot_hex] = snapshot.snapshot_hex
            origin = snapshot.meta.get(COPIED_FROM_META)
            if origin:
                present.setdefault(origin, snapshot.snapshot_hex)
        return present

    def _existing_copy(self, snapshot: Snapshot, present: dict[str, str]) -> str | None:
        found = present.get(snapshot.snapshot_hex)
        if found is not None:
            return found
        # A snapshot that was copied from the target in the first place.
        origin = snapshot.meta.get(COPIED_FROM_META, "")
        return origin if present.get(origin) == origin else None

    def _copy_snapshot(self, snapshot: Snapshot) -> None:
        writer = BlobWriter(self.target, threaded=False)
        try:
            root_id = self._copy_tree(snapshot.tree_id, writer)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        self.result.blobs_copied += writer.stats.new_chunks + writer.stats.new_trees
        self.result.bytes_added += writer.bytes_uploaded
        if self.shared_ids:
            target_hex = self._copy_snapshot_object(snapshot)
        else:
            target_hex = self._write_rewritten(snapshot, root_id)
        self._snapshot_ids[snapshot.snapshot_id] = bytes.fromhex(target_hex)
        self.result.copied.append((snapshot.snapshot_hex, target_hex))
        log.info("copied snapshot %s as %s", snapshot.snapshot_hex, target_hex)

    def _copy_snapshot_object(self, snapshot: Snapshot) -> str:
        """Store the source's snapshot plaintext byte for byte, so it keeps its id."""
        name = SNAPSHOT_PREFIX + snapshot.snapshot_hex
        data = self.source.backend.get_bounded(name, MAX_OBJECT_SIZE)
        plain = open_object(self.source.keys, ObjectKind.SNAPSHOT, name, data)
        sealed = seal_object(self.target.keys, ObjectKind.SNAPSHOT, name, plain)
        try:
            self.target.backend.put(name, sealed)
            self.result.bytes_added += len(sealed)
        except AlreadyExistsError:
            log.info("snapshot %s was stored in the target meanwhile", snapshot.snapshot_hex)
        return snapshot.snapshot_hex

    def _target_hex(self, source_hex: str) -> str | None:
        """Return the target id of a source snapshot copied in this or an earlier run."""
        try:
            copied = self._snapshot_ids.get(bytes.fromhex(source_hex))
        except ValueError:
            return None  # free meta that only looks like a reference
        return copied.hex() if copied is not None else self._present.get(source_hex)

    def _write_rewritten(self, snapshot: Snapshot, root_id: bytes) -> str:
        parent_id = None
        if snapshot.parent_id is not None:
            parent_hex = self._target_hex(snapshot.parent_id.hex())
            parent_id = bytes.fromhex(parent_hex) if parent_hex else None
        meta = {**snapshot.meta, COPIED_FROM_META: snapshot.snapshot_hex}
        # A joined snapshot names its parts by id: name their copies where they exist.
        for key, value in snapshot.meta.items():
            copied_part = self._target_hex(value) if key.startswith(JOIN_META_PREFIX) else None
            if copied_part is not None:
                meta[key] = copied_part
        # A tag change's replaces list names source ids: name the copies of those
        # snapshots that the target has, so the target hides them as the source does.
        replaced = (self._target_hex(old_id.hex()) for old_id in snapshot.replaces)
        replaces = tuple(bytes.fromhex(found) for found in replaced if found is not None)
        rewritten = replace(
            snapshot, tree_id=root_id, parent_id=parent_id, meta=meta, replaces=replaces
        )
        stored, size = self.target.write_snapshot(rewritten)
        self.result.bytes_added += size
        return stored.snapshot_hex

    def _copy_tree(self, tree_id: bytes, writer: BlobWriter) -> bytes:
        """Copy a tree and everything below it; return its id in the target."""
        done = self._tree_ids.get(tree_id)
        if done is not None:
            return done
        payload = self.source.read_blob(tree_id)
        nodes = [
            self._copy_node(node, writer) for node in decode_tree(payload, f"tree {tree_id.hex()}")
        ]
        if self.shared_ids:
            # The stored bytes, not a re-encoding, so keys unknown to this version stay.
            target_id = tree_id
        else:
            payload = encode_tree(nodes)
            target_id = self.target.keys.blob_id(payload)
        writer.add_tree(target_id, payload)
        self._tree_ids[tree_id] = target_id
        return target_id

    def _copy_node(self, node: Node, writer: BlobWriter) -> Node:
        if node.type == "dir":
            return replace(node, subtree=self._copy_tree(node.subtree, writer))
        if not node.chunks:
            return node
        writer.reset_sampling()
        chunk_ids = [self._copy_chunk(chunk_id, writer) for chunk_id in node.chunk_ids]
        return replace(node, chunks=b"".join(chunk_ids))

    def _copy_chunk(self, chunk_id: bytes, writer: BlobWriter) -> bytes:
        """Copy one chunk unless the target has it; return its id in the target."""
        # A byte-grouping filter's value is the element size, so the copy can be
        # grouped as the source chunk was, when the target's byte grouping is on.
        location = self.source.index.lookup(chunk_id)
        element_size = location.filter if location is not None else 0
        if self.shared_ids:
            if not writer.has(chunk_id):
                plain = self.source.read_blob(chunk_id)
                writer.add_chunk(chunk_id, memoryview(plain), element_size)
            return chunk_id
        mapped = self._chunk_ids.get(chunk_id)
        if mapped is not None:
            return mapped
        plain = self.source.read_blob(chunk_id)
        target_id = self.target.keys.blob_id(plain)
        writer.add_chunk(target_id, memoryview(plain), element_size)
        self._chunk_ids[chunk_id] = target_id
        return target_id
