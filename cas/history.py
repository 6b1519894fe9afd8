"""Finding snapshots and changing their tags: filters, `change_tags` and `find_paths`.

Tag changes rewrite the snapshot object, because a snapshot's id is the keyed
hash of its body. `change_tags` writes the new object first, with the old id in
its ``replaces`` field, and deletes the old object afterwards. Between the two
steps both objects exist, but `Repository.list_snapshots` hides every snapshot
that a readable snapshot replaces, so readers see exactly one of them at every
moment: the old one before the new object is published, the new one after.

Two `change_tags` runs never overlap: the shared lock of one conflicts with the
other's (``unique_operation``), because both would replace the same snapshot and
leave two copies, each with only its own tags.

Deleting the old object needs the exclusive lock, as every deletion of a
snapshot object does. `change_tags` writes under a shared lock and then tries
once to upgrade it. When another operation holds a lock, the old object stays
hidden, and the next `cas tag` or `cas prune` deletes it (`delete_replaced`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from cas.archiver import deep_recursion
from cas.errors import LockedError, NotFoundError, UsageError
from cas.locks import RepositoryLock
from cas.parts import part_name
from cas.repository import Repository
from cas.snapshot import MAX_REPLACES, SNAPSHOT_PREFIX, Snapshot, validate_labels, validate_tag
from cas.tree import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotFilter:
    """Snapshot selection of `cas log` and `cas find`; the kinds combine with AND.

    ``tag_sets``: the snapshot must have every tag of at least one set (one set
    per ``--tag`` option, whose value lists tags separated by commas).
    ``hosts``: one of them. ``paths``: every one of them among its paths.
    ``meta``: every key with exactly that value.
    """

    tag_sets: tuple[frozenset[str], ...] = ()
    hosts: frozenset[str] = frozenset()
    paths: frozenset[bytes] = frozenset()
    meta: dict[str, str] = field(default_factory=dict)

    def matches(self, snapshot: Snapshot) -> bool:
        """Return whether ``snapshot`` passes every filter."""
        tags = set(snapshot.tags)
        if self.tag_sets and not any(wanted <= tags for wanted in self.tag_sets):
            return False
        if self.hosts and snapshot.host not in self.hosts:
            return False
        if not self.paths <= set(snapshot.paths):
            return False
        return all(snapshot.meta.get(key) == value for key, value in self.meta.items())


def make_filter(
    tags: list[str], hosts: list[str], paths: list[str], meta: list[str]
) -> SnapshotFilter:
    """Build a filter from option values; raise `UsageError` on an invalid one.

    A path is compared in its absolute, normalized form, as `cas snapshot` stores it.
    """
    tag_sets = []
    for value in tags:
        names = frozenset(name.strip() for name in value.split(",") if name.strip())
        if not names:
            raise UsageError(f"invalid --tag {value!r}: give one or more tags separated by ','")
        tag_sets.append(names)
    wanted_meta = {}
    for item in meta:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --meta {item!r}: write KEY=VALUE")
        wanted_meta[key] = value
    absolute = frozenset(os.fsencode(os.path.abspath(path)) for path in paths)
    return SnapshotFilter(tuple(tag_sets), frozenset(hosts), absolute, wanted_meta)


def resolve_current(repo: Repository, name: str, snapshots: list[Snapshot]) -> Snapshot:
    """Resolve a snapshot name, following replacements to the snapshot readers see.

    ``snapshots`` is what `Repository.list_snapshots` returned just before, so
    `Repository.replaced_snapshots` is current. An old id that a tag change
    replaced thus names the new snapshot, whether the old object still exists or not.
    """
    visible = {snapshot.snapshot_hex: snapshot for snapshot in snapshots}
    try:
        found = repo.resolve_snapshot(name)
    except NotFoundError:
        matches = [old for old in repo.replaced_snapshots if old.startswith(name.lower())]
        if len(matches) != 1:
            raise
        found_hex = matches[0]
    else:
        found_hex = found.snapshot_hex
    while found_hex in repo.replaced_snapshots:
        found_hex = repo.replaced_snapshots[found_hex]
    if found_hex not in visible:
        raise NotFoundError(f"snapshot {name!r} is not readable; `cas check` reports why")
    return visible[found_hex]


@dataclass(frozen=True)
class TagChange:
    """The tags to add and remove, or the full new set (``set_tags``, when not None)."""

    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    set_tags: tuple[str, ...] | None = None

    def validate(self) -> None:
        """Raise `UsageError` for an invalid tag or an empty change."""
        if self.set_tags is None and not self.add and not self.remove:
            raise UsageError("no tag change given: pass --add TAG, --remove TAG or --set TAG")
        if self.set_tags is not None and (self.add or self.remove):
            raise UsageError("--set replaces every tag: give it without --add and --remove")
        for tag in (*self.add, *self.remove, *(self.set_tags or ())):
            validate_tag(tag)

    def apply(self, snapshot: Snapshot) -> tuple[str, ...]:
        """Return the snapshot's new tags, in order, each once.

        The ``part:NAME`` tag of a part snapshot stays, because `cas snapshot
        --join-parts` finds parts by it.
        """
        if self.set_tags is not None:
            tags = list(self.set_tags)
        else:
            tags = [tag for tag in snapshot.tags if tag not in self.remove] + list(self.add)
        name = part_name(snapshot)
        if name is not None and f"part:{name}" not in tags:
            tags.insert(0, f"part:{name}")
        return tuple(dict.fromkeys(tags))


@dataclass
class TagResult:
    """Outcome of `change_tags`: (old, new) per changed snapshot, and the cleanup counts."""

    changed: list[tuple[Snapshot, Snapshot]] = field(default_factory=list)
    unchanged: list[Snapshot] = field(default_factory=list)
    replaced_deleted: int = 0
    replaced_left: int = 0


def change_tags(
    repo: Repository, names: list[str], change: TagChange, wait: float = 0.0
) -> TagResult:
    """Change the tags of the named snapshots; see the module docstring for the protocol."""
    change.validate()
    if not names:
        raise UsageError("no snapshot given: name one or more snapshots (id, prefix or latest)")
    result = TagResult()
    # unique_operation: two tag runs that read the same snapshot would each write a
    # replacement of it, so both stay visible and each lacks the other's tags.
    with RepositoryLock(
        repo.backend, repo.keys, exclusive=False, operation="tag", wait=wait, unique_operation=True
    ) as lock:
        snapshots = repo.list_snapshots()
        chosen: dict[str, Snapshot] = {}
        for name in names:
            snapshot = resolve_current(repo, name, snapshots)
            chosen[snapshot.snapshot_hex] = snapshot
        for snapshot in chosen.values():
            tags = change.apply(snapshot)
            if tags == snapshot.tags:
                result.unchanged.append(snapshot)
                continue
            validate_labels(tags, "", {})
            lock.check_held()
            stored = _write_replacement(repo, snapshot, tags)
            result.changed.append((snapshot, stored))
        _delete_replaced_if_alone(repo, lock, result)
    return result


def _write_replacement(repo: Repository, snapshot: Snapshot, tags: tuple[str, ...]) -> Snapshot:
    # The new object also names the objects the old one replaced and that still
    # exist, so none of them becomes visible again once the old object is gone.
    earlier = [
        old for old, new in _replacement_chains(repo).items() if new == snapshot.snapshot_hex
    ]
    replaces = (snapshot.snapshot_id, *map(bytes.fromhex, sorted(earlier)))[:MAX_REPLACES]
    new = replace(snapshot, tags=tags, replaces=replaces)
    stored, _size = repo.write_snapshot(new)
    repo.replaced_snapshots[snapshot.snapshot_hex] = stored.snapshot_hex
    log.info("snapshot %s replaced by %s with new tags", snapshot.snapshot_hex, stored.snapshot_hex)
    return stored


def _replacement_chains(repo: Repository) -> dict[str, str]:
    """Map each replaced snapshot to the end of its chain of replacements."""
    ends = {}
    for old in repo.replaced_snapshots:
        new = repo.replaced_snapshots[old]
        while new in repo.replaced_snapshots:
            new = repo.replaced_snapshots[new]
        ends[old] = new
    return ends


def _delete_replaced_if_alone(repo: Repository, lock: RepositoryLock, result: TagResult) -> None:
    try:
        lock.upgrade(wait=0.0)
    except LockedError as exc:
        result.replaced_left = len(repo.replaced_snapshots)
        log.info("left %d replaced snapshot objects: %s", result.replaced_left, exc)
        return
    result.replaced_deleted = delete_replaced(repo)


def delete_replaced(repo: Repository) -> int:
    """Delete the replaced snapshot objects that the last `list_snapshots` found.

    The caller holds the exclusive lock. Returns how many objects were deleted.
    """
    count = 0
    for snapshot_hex in sorted(repo.replaced_snapshots):
        with contextlib.suppress(NotFoundError):
            repo.backend.delete(SNAPSHOT_PREFIX + snapshot_hex)
            count += 1
    repo.replaced_snapshots = {}
    return count


# Finding paths


@dataclass(frozen=True)
class FoundPath:
    """One path of a snapshot whose name (or full path) matches a pattern."""

    path: str
    node: Node


class PathFinder:
    """Matches a shell-style pattern against the entries of snapshot trees.

    A pattern without ``/`` matches entry names. A pattern with ``/`` matches the
    full path inside the snapshot, which starts with ``/``, and unless the pattern
    starts with ``/`` it may match below any folder. Matching uses `fnmatch`, so
    ``*`` also matches ``/`` in full paths.

    Results are memoized per (tree id, folder path), so a folder that is the
    same in many snapshots is walked once. For name patterns the folder path does
    not matter and the key is the tree id alone.

    NOTE: the memo contains the matches of every distinct tree walked, so memory
    grows with the number of matches times the number of distinct trees, not
    with the number of entries.
    """

    def __init__(self, repo: Repository, pattern: str, ignore_case: bool = False) -> None:
        if not pattern:
            raise UsageError("invalid PATTERN '': give a shell-style pattern such as '*.json'")
        self.repo = repo
        self.full_path = "/" in pattern
        if self.full_path and not pattern.startswith("/"):
            pattern = "*/" + pattern
        self.ignore_case = ignore_case
        self.pattern = pattern.lower() if ignore_case else pattern
        self._memo: dict[tuple[bytes, str], list[tuple[str, Node]]] = {}
        self.trees_walked = 0

    def _matches(self, name: str, path: str) -> bool:
        subject = path if self.full_path else name
        if self.ignore_case:
            subject = subject.lower()
        return fnmatch.fnmatchcase(subject, self.pattern)

    def find(self, snapshot: Snapshot) -> list[FoundPath]:
        """Return the matching entries of one snapshot, in tree order."""
        with deep_recursion():
            return [FoundPath(path, node) for path, node in self._walk(snapshot.tree_id, "")]

    def _walk(self, tree_id: bytes, folder: str) -> list[tuple[str, Node]]:
        key = (tree_id, folder if self.full_path else "")
        cached = self._memo.get(key)
        if cached is not None:
            return [(folder + relative, node) for relative, node in cached]
        self.trees_walked += 1
        relative_matches: list[tuple[str, Node]] = []
        for relative, node in self._entries(tree_id, folder):
            relative_matches.append((relative, node))
        self._memo[key] = relative_matches
        return [(folder + relative, node) for relative, node in relative_matches]

    def _entries(self, tree_id: bytes, folder: str) -> Iterator[tuple[str, Node]]:
        """Yield (path relative to ``folder``, node) of each match below the tree."""
        for node in self.repo.load_tree(tree_id):
            name = node.name.decode(errors="surrogateescape")
            relative = "/" + name
            if self._matches(name, folder + relative):
                yield relative, node
            if node.type == "dir":
                for path, child in self._walk(node.subtree, folder + relative):
                    yield path[len(folder) :], child
