"""Sharded checkpoints: snapshots of one part each, and joining parts into one snapshot.

A part is an ordinary snapshot whose meta contains ``cas.part = NAME`` and whose tags contain
``part:NAME``. Each rank of a training job stores its own shard folder as a part, from its
own machine. `join_parts` then writes one snapshot whose root tree has a folder node named
NAME for each part, whose subtree is that part's root tree. Joining reads no file data and
writes one tree and one snapshot object. The joined snapshot records each part as meta
``cas.join.NAME = <part snapshot hex>``.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime

from cas import __version__
from cas.blobstore import BlobWriter
from cas.errors import IntegrityError, NotFoundError, UsageError
from cas.keys import local_user
from cas.locks import RepositoryLock
from cas.repository import Repository
from cas.snapshot import Snapshot, check_utf8, validate_host, validate_labels
from cas.tree import Node, encode_tree, validate_name

log = logging.getLogger(__name__)

PART_META = "cas.part"
PART_TAG_PREFIX = "part:"
JOIN_META_PREFIX = "cas.join."
# Mode of the folder that contains each part in a joined snapshot. A part's root tree
# stores its entries but not the metadata of the folder that was snapshotted.
JOINED_FOLDER_MODE = 0o755
_SUMMARY_FIELDS = ("files", "dirs", "bytes_total")


@dataclass
class JoinOptions:
    """Tags, message, metadata and host of a joined snapshot."""

    tags: list[str] = field(default_factory=list)
    message: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    host: str = ""


def check_part_name(name: str) -> None:
    """Raise `UsageError` unless ``name`` can name a folder of the joined snapshot."""
    check_utf8(name, "part name")
    try:
        validate_name(os.fsencode(name))
    except IntegrityError:
        raise UsageError(
            f"invalid part name {name!r}: use one folder name, without '/' and not '.' or '..'"
        ) from None


def part_name(snapshot: Snapshot) -> str | None:
    """Return the part name of a snapshot, or None when it is not a part."""
    return snapshot.meta.get(PART_META)


def latest_part(
    snapshots: list[Snapshot], name: str, host: str | None = None, tags: tuple[str, ...] = ()
) -> Snapshot | None:
    """Return the newest part named ``name`` (of ``host``, with every tag of ``tags``).

    ``snapshots`` must be sorted oldest first, as `Repository.list_snapshots` returns them.
    """
    matches = [
        snapshot
        for snapshot in snapshots
        if part_name(snapshot) == name
        and (host is None or snapshot.host == host)
        and set(tags) <= set(snapshot.tags)
    ]
    return matches[-1] if matches else None


def resolve_parts(
    repo: Repository,
    snapshot_names: list[str],
    part_names: list[str],
    part_tags: tuple[str, ...] = (),
) -> list[Snapshot]:
    """Find the parts to join: snapshots by id, prefix or ``latest``, and newest parts by name.

    Each snapshot named must be a part. Raises `NotFoundError` for a part name that no
    snapshot carries (with every tag of ``part_tags``).
    """
    parts = []
    for name in snapshot_names:
        snapshot = repo.resolve_snapshot(name)
        if part_name(snapshot) is None:
            raise UsageError(
                f"snapshot {snapshot.snapshot_hex[:16]} is not a part: only snapshots taken "
                f"with --part NAME can be joined"
            )
        parts.append(snapshot)
    if part_names:
        snapshots = repo.list_snapshots()
        for name in part_names:
            found = latest_part(snapshots, name, tags=part_tags)
            if found is None:
                with_tags = f" with tags {', '.join(part_tags)}" if part_tags else ""
                raise NotFoundError(f"no part named {name!r}{with_tags} in the repository")
            parts.append(found)
    # A part named twice, by id and by name, is joined once.
    unique = {part.snapshot_id: part for part in parts}
    return list(unique.values())


def _part_nodes(parts: list[Snapshot]) -> list[Node]:
    """Return one folder node per part; raise `UsageError` when two parts share a name."""
    by_name: dict[str, Snapshot] = {}
    for part in parts:
        name = part_name(part) or ""
        check_part_name(name)
        other = by_name.get(name)
        if other is not None:
            raise UsageError(
                f"parts {other.snapshot_hex[:16]} and {part.snapshot_hex[:16]} are both named "
                f"{name!r}; join only one of them"
            )
        by_name[name] = part
    return [_folder_node(name, part) for name, part in sorted(by_name.items())]


def _folder_node(name: str, part: Snapshot) -> Node:
    mtime_ns = int(part.datetime.timestamp() * 1_000_000_000)
    return Node(
        name=os.fsencode(name),
        type="dir",
        mode=JOINED_FOLDER_MODE,
        uid=os.getuid(),
        gid=os.getgid(),
        mtime_ns=mtime_ns,
        ctime_ns=mtime_ns,
        subtree=part.tree_id,
    )


def _joined_snapshot(
    parts: list[Snapshot], root_id: bytes, options: JoinOptions, host: str
) -> Snapshot:
    meta = dict(options.meta)
    for part in parts:
        meta[JOIN_META_PREFIX + (part_name(part) or "")] = part.snapshot_hex
    summary = {key: sum(part.summary.get(key, 0) for part in parts) for key in _SUMMARY_FIELDS}
    summary["dirs"] += len(parts)
    summary["bytes_read"] = 0
    return Snapshot(
        snapshot_id=b"",
        time=datetime.now().astimezone().isoformat(),
        host=host,
        user=local_user(),
        paths=(),
        tree_id=root_id,
        tags=tuple(options.tags),
        message=options.message,
        meta=meta,
        parent_id=None,
        cas_version=__version__,
        summary=summary,
    )


def join_parts(repo: Repository, parts: list[Snapshot], options: JoinOptions) -> Snapshot:
    """Write one snapshot whose root contains each part's root tree under the part's name.

    Runs under a shared lock. Each part's root tree must be in the index and readable,
    so a join never names a tree that gc removed. Publishes the new tree's pack and index
    object before the snapshot object.
    """
    if not parts:
        raise UsageError("nothing to join: name parts with --join or --join-parts")
    validate_labels(options.tags, options.message, options.meta)
    if options.host:
        validate_host(options.host)
    nodes = _part_nodes(parts)
    host = options.host or socket.gethostname()
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="join"):
        repo.index.sync()
        for part in parts:
            # Loading authenticates the root tree and fails if its pack is gone.
            repo.load_tree(part.tree_id)
        payload = encode_tree(nodes)
        root_id = repo.keys.blob_id(payload)
        writer = BlobWriter(repo, threaded=False)
        try:
            writer.add_tree(root_id, payload)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        snapshot, _size = repo.write_snapshot(_joined_snapshot(parts, root_id, options, host))
    log.info("joined %d parts into snapshot %s", len(parts), snapshot.snapshot_hex)
    return snapshot
