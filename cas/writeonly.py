"""The local record of what a write-only key stored, since it cannot read it back.

A write-only key seals trees and snapshots to the repository's public key, so
it cannot read the parent snapshot that the unchanged-file fast path needs. It
keeps its own copy of what it wrote instead, under the repository's cache
folder (``<cache dir>/<repo_id hex>/write-only/``):

    parents/<64 hex>     msgpack {"v": 1, "snapshot": bin 32, "trees": [[tree id, tree bytes], ...]}
                         for the last snapshot of one source set; the name is
                         BLAKE3 of msgpack [host, sorted source paths, part name]
    snapshots/<64 hex>   the body of a snapshot this key wrote, exactly as stored

Nothing here is trusted: a snapshot body must hash (keyed BLAKE3) to its name,
a tree's bytes must hash to its tree id, and the archiver reuses a file's
chunks only while the index still lists every one of them. Anything that fails
is skipped, so the affected files are read again. Deleting the folder loses
nothing but the fast path of the next run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import blake3

from cas.crypto import ID_SIZE, pack_msgpack, unpack_msgpack
from cas.errors import CasError, IntegrityError, NotFoundError, UnsupportedFormatError
from cas.objects import MAX_OBJECT_SIZE
from cas.repository import Repository
from cas.snapshot import SNAPSHOT_PREFIX, Snapshot, snapshot_from_body
from cas.tree import Node, decode_tree

log = logging.getLogger(__name__)

CACHE_FOLDER = "write-only"
_VERSION = 1


@dataclass(frozen=True)
class SealedSnapshot:
    """A snapshot id of the repository, with its body when this machine's key wrote it."""

    snapshot_hex: str
    snapshot: Snapshot | None


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` through a temporary file, so readers see all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.urandom(8).hex()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_bounded(path: Path) -> bytes:
    with open(path, "rb") as handle:
        data = handle.read(MAX_OBJECT_SIZE + 1)
    if len(data) > MAX_OBJECT_SIZE:
        raise IntegrityError(f"{path} is over {MAX_OBJECT_SIZE} bytes")
    return data


class LocalTreeCache:
    """Trees and snapshot bodies that a write-only key stored, read back from local disk.

    Not thread-safe; one archiver run uses one instance.
    """

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.root = repo.cache_dir / CACHE_FOLDER
        self._parent_trees: dict[bytes, bytes] = {}
        self._written_trees: dict[bytes, bytes] = {}

    def _entry_path(self, sources: list[str], host: str, part: str) -> Path:
        paths = sorted(os.fsencode(source) for source in sources)
        digest = blake3.blake3(pack_msgpack([host, paths, part])).hexdigest()
        return self.root / "parents" / digest

    def find_parent(self, sources: list[str], host: str, part: str) -> Snapshot | None:
        """Return the last snapshot this cache recorded for the sources, or None.

        A missing, damaged or forged entry, or one whose snapshot is gone from the
        repository (pruned by the owner), gives None, so every file is read again.
        """
        path = self._entry_path(sources, host, part)
        try:
            body = unpack_msgpack(_read_bounded(path), str(path), MAX_OBJECT_SIZE)
            snapshot_id, trees = self._parse_entry(body, path)
            snapshot = self.load_snapshot(snapshot_id.hex())
        except FileNotFoundError:
            return None
        except (OSError, CasError) as exc:
            log.warning("ignoring the local record of the last snapshot: %s", exc)
            return None
        if snapshot is None or not self.repo.backend.exists(
            SNAPSHOT_PREFIX + snapshot.snapshot_hex
        ):
            return None
        self._parent_trees = trees
        return snapshot

    def _parse_entry(self, body: object, path: Path) -> tuple[bytes, dict[bytes, bytes]]:
        if not isinstance(body, dict) or body.get("v") != _VERSION:
            raise IntegrityError(f"{path} is not a version {_VERSION} record")
        snapshot_id, pairs = body.get("snapshot"), body.get("trees")
        if not isinstance(snapshot_id, bytes) or len(snapshot_id) != ID_SIZE:
            raise IntegrityError(f"{path} has a malformed snapshot id")
        if not isinstance(pairs, list):
            raise IntegrityError(f"{path} has no tree list")
        trees: dict[bytes, bytes] = {}
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise IntegrityError(f"{path} has a malformed tree entry")
            tree_id, payload = pair
            if not isinstance(tree_id, bytes) or not isinstance(payload, bytes):
                raise IntegrityError(f"{path} has a malformed tree entry")
            trees[tree_id] = payload
        return snapshot_id, trees

    def load_tree(self, tree_id: bytes) -> list[Node]:
        """Return a tree of the parent snapshot; its bytes must hash to ``tree_id``."""
        payload = self._parent_trees.get(tree_id)
        if payload is None:
            raise NotFoundError(f"tree {tree_id.hex()} is not in the local write-only cache")
        if self.repo.keys.blob_id(payload) != tree_id:
            raise IntegrityError(
                f"tree {tree_id.hex()} in the local write-only cache does not match its id"
            )
        return decode_tree(payload, f"cached tree {tree_id.hex()}")

    def record_tree(self, tree_id: bytes, payload: bytes) -> None:
        """Remember a tree of the running snapshot, for the fast path of the next one."""
        self._written_trees[tree_id] = payload

    def save(self, sources: list[str], host: str, part: str, snapshot: Snapshot) -> None:
        """Record a published snapshot and its trees; a failure only costs the fast path."""
        body = pack_msgpack(snapshot.to_body())
        if self.repo.keys.blob_id(body) != snapshot.snapshot_id:
            raise IntegrityError(f"snapshot {snapshot.snapshot_hex} does not re-encode to its id")
        entry = {
            "v": _VERSION,
            "snapshot": snapshot.snapshot_id,
            "trees": [[tree_id, payload] for tree_id, payload in self._written_trees.items()],
        }
        try:
            _write_atomically(self.root / "snapshots" / snapshot.snapshot_hex, body)
            _write_atomically(self._entry_path(sources, host, part), pack_msgpack(entry))
        except OSError as exc:
            log.warning("cannot record the snapshot in the local write-only cache: %s", exc)

    def load_snapshot(self, snapshot_hex: str) -> Snapshot | None:
        """Return a snapshot body this key recorded, checked against its id, or None."""
        path = self.root / "snapshots" / snapshot_hex
        try:
            body_bytes = _read_bounded(path)
        except FileNotFoundError:
            return None
        if self.repo.keys.blob_id(body_bytes).hex() != snapshot_hex:
            raise IntegrityError(f"{path} does not match its snapshot id")
        body = unpack_msgpack(body_bytes, str(path), MAX_OBJECT_SIZE)
        return snapshot_from_body(bytes.fromhex(snapshot_hex), body, str(path))


def list_sealed_snapshots(repo: Repository) -> list[SealedSnapshot]:
    """Return every snapshot id of the repository, with the bodies this machine recorded.

    For a write-only key, which cannot open snapshot objects. Known snapshots come
    first, newest first; the rest follow in id order.
    """
    cache = LocalTreeCache(repo)
    known: list[Snapshot] = []
    unknown: list[SealedSnapshot] = []
    for snapshot_hex in repo.snapshot_names():
        try:
            snapshot = cache.load_snapshot(snapshot_hex)
        except (OSError, IntegrityError, UnsupportedFormatError) as exc:
            log.warning("ignoring the local record of snapshot %s: %s", snapshot_hex, exc)
            snapshot = None
        if snapshot is None:
            unknown.append(SealedSnapshot(snapshot_hex, None))
        else:
            known.append(snapshot)
    known.sort(key=lambda snap: (snap.datetime, snap.snapshot_hex), reverse=True)
    return [SealedSnapshot(snap.snapshot_hex, snap) for snap in known] + unknown


def visible_snapshots(repo: Repository) -> list[Snapshot]:
    """Return the snapshots this key can read, oldest first.

    A full key reads every snapshot (`Repository.list_snapshots`). A write-only key
    cannot open snapshot objects, so the result holds only those that this machine's key wrote
    and recorded locally. Parent searches of stream snapshots and the restart check of
    `cas watch` use this, so they work with either kind of key.
    """
    if not repo.keys.write_only:
        return repo.list_snapshots()
    known = [item.snapshot for item in list_sealed_snapshots(repo) if item.snapshot is not None]
    return sorted(known, key=lambda snap: (snap.datetime, snap.snapshot_hex))
