"""Sizes of snapshots and of the repository: logical, stored, unique, and the ratios.

Terms, all in bytes:

- logical size: the sum of the sizes of the files in a snapshot, as a checkout
  writes them (a file stored twice counts twice).
- raw size: the sum of the uncompressed sizes of the distinct blobs used.
- stored size: the sum of the sizes in packs (compressed and encrypted) of the
  distinct blobs used.
- unique size: the stored size of the blobs that no other snapshot uses, which
  is about what `cas prune` of that snapshot and `cas gc` would free.

The dedup ratio is logical size over the raw size of the distinct chunks, and the
compression ratio is raw size over stored size (chunks and trees).

Every tree is walked at most twice: once when a snapshot first reaches it, and
once more when a second snapshot reaches it and everything below it becomes
shared.

NOTE: the walk keeps one entry per distinct blob (its owning snapshot, an
estimated 150 bytes with the dict overhead), so memory grows with the number of
chunks, as gc's mark set does: about 150 MB for a million chunks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cas.archiver import deep_recursion
from cas.pack import BlobType
from cas.repository import Repository
from cas.snapshot import Snapshot

log = logging.getLogger(__name__)

_SHARED = -1


def ratio(numerator: int, denominator: int) -> float | None:
    """Return numerator / denominator rounded to 3 places, or None when the denominator is 0."""
    return round(numerator / denominator, 3) if denominator else None


@dataclass
class BlobTotals:
    """Counts and sizes of a set of distinct blobs."""

    chunk_count: int = 0
    tree_count: int = 0
    chunk_raw_size: int = 0
    raw_size: int = 0
    stored_size: int = 0
    missing_count: int = 0

    def add(self, repo: Repository, blob_id: bytes) -> int:
        """Count one blob; return its stored size (0 when the index lacks it)."""
        location = repo.index.lookup(blob_id)
        if location is None:
            self.missing_count += 1
            return 0
        if location.blob_type == BlobType.TREE:
            self.tree_count += 1
        else:
            self.chunk_count += 1
            self.chunk_raw_size += location.raw_size
        self.raw_size += location.raw_size
        self.stored_size += location.stored_size
        return location.stored_size


@dataclass
class SnapshotStats:
    """Sizes of one snapshot; ``blobs`` is filled only for a single-snapshot report."""

    snapshot: Snapshot
    logical_size: int = 0
    file_count: int = 0
    unique_size: int = 0
    blobs: BlobTotals | None = None

    @property
    def dedup_ratio(self) -> float | None:
        """Logical size over the raw size of the snapshot's distinct chunks."""
        return ratio(self.logical_size, self.blobs.chunk_raw_size) if self.blobs else None

    @property
    def compression_ratio(self) -> float | None:
        """Raw size over stored size of the snapshot's distinct blobs."""
        return ratio(self.blobs.raw_size, self.blobs.stored_size) if self.blobs else None


@dataclass
class RepositoryStats:
    """Sizes of every visible snapshot and of the blobs they use together."""

    snapshots: list[SnapshotStats] = field(default_factory=list)
    blobs: BlobTotals = field(default_factory=BlobTotals)

    @property
    def logical_size(self) -> int:
        """Sum of the snapshots' logical sizes."""
        return sum(item.logical_size for item in self.snapshots)

    @property
    def dedup_ratio(self) -> float | None:
        """Logical size over the raw size of the distinct chunks of all snapshots."""
        return ratio(self.logical_size, self.blobs.chunk_raw_size)

    @property
    def compression_ratio(self) -> float | None:
        """Raw size over stored size of the distinct blobs of all snapshots."""
        return ratio(self.blobs.raw_size, self.blobs.stored_size)


class _Usage:
    """Owner of each blob: the index of the one snapshot using it, or `_SHARED`."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.owner: dict[bytes, int] = {}
        # Tree id -> (logical size, file count) of everything below it.
        self.sizes: dict[bytes, tuple[int, int]] = {}

    def visit(self, tree_id: bytes, who: int) -> tuple[int, int]:
        """Record that snapshot ``who`` uses the tree; return its (logical size, file count)."""
        prior = self.owner.get(tree_id)
        if prior is not None:
            if prior not in (who, _SHARED):
                self._share(tree_id)
            return self.sizes[tree_id]
        self.owner[tree_id] = who
        size = count = 0
        for node in self.repo.load_tree(tree_id):
            if node.type == "dir":
                below = self.visit(node.subtree, who)
                size, count = size + below[0], count + below[1]
            elif node.type == "file":
                size, count = size + node.size, count + 1
                for chunk_id in node.chunk_ids:
                    self._claim(chunk_id, who)
        self.sizes[tree_id] = (size, count)
        return size, count

    def _claim(self, blob_id: bytes, who: int) -> None:
        prior = self.owner.get(blob_id)
        if prior is None:
            self.owner[blob_id] = who
        elif prior != who:
            self.owner[blob_id] = _SHARED

    def _share(self, tree_id: bytes) -> None:
        """Mark a tree and everything below it as shared; stop at trees already shared."""
        self.owner[tree_id] = _SHARED
        for node in self.repo.load_tree(tree_id):
            if node.type == "dir" and self.owner.get(node.subtree) != _SHARED:
                self._share(node.subtree)
            elif node.type == "file":
                for chunk_id in node.chunk_ids:
                    self.owner[chunk_id] = _SHARED


def repository_stats(repo: Repository, snapshots: list[Snapshot]) -> RepositoryStats:
    """Measure ``snapshots`` (normally every visible snapshot) and the blobs they use.

    Raises `IntegrityError` or `NotFoundError` when a tree cannot be read.
    """
    usage = _Usage(repo)
    result = RepositoryStats()
    with deep_recursion():
        for who, snapshot in enumerate(snapshots):
            size, count = usage.visit(snapshot.tree_id, who)
            result.snapshots.append(SnapshotStats(snapshot, logical_size=size, file_count=count))
    for blob_id, who in usage.owner.items():
        stored = result.blobs.add(repo, blob_id)
        if who != _SHARED:
            result.snapshots[who].unique_size += stored
    log.info("stats walked %d snapshots, %d distinct blobs", len(snapshots), len(usage.owner))
    return result


def snapshot_stats(
    repo: Repository, snapshot: Snapshot, snapshots: list[Snapshot]
) -> SnapshotStats:
    """Measure one snapshot: its own sizes, and what it shares with ``snapshots``.

    ``snapshots`` must contain ``snapshot``; its unique size counts the blobs
    that no other member of ``snapshots`` uses.
    """
    whole = repository_stats(repo, snapshots)
    mine = next(item for item in whole.snapshots if item.snapshot == snapshot)
    mine.blobs = BlobTotals()
    seen: set[bytes] = set()
    stack = [snapshot.tree_id]
    while stack:
        tree_id = stack.pop()
        if tree_id in seen:
            continue
        seen.add(tree_id)
        mine.blobs.add(repo, tree_id)
        for node in repo.load_tree(tree_id):
            if node.type == "dir":
                stack.append(node.subtree)
                continue
            for chunk_id in node.chunk_ids:
                if chunk_id not in seen:
                    seen.add(chunk_id)
                    mine.blobs.add(repo, chunk_id)
    return mine
