"""`cas log`: list snapshots, newest first, with filters and a lineage graph."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from cas.excludes import EXCLUDE_META, exclude_patterns_of
from cas.history import SnapshotFilter, make_filter
from cas.repository import Repository
from cas.snapshot import Snapshot
from cas.streaminput import STDIN_META
from cas.writeonly import SealedSnapshot, list_sealed_snapshots

from .context import open_repository, print_json


def add_filter_options(parser: argparse.ArgumentParser) -> None:
    """Add --tag, --host, --path and --meta, the snapshot filters of log and find."""
    parser.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG[,TAG...]",
        help="only snapshots with all these tags; repeated, snapshots that match any one",
    )
    parser.add_argument(
        "--host", action="append", default=[], help="only snapshots of this host (repeatable)"
    )
    parser.add_argument(
        "--path",
        action="append",
        default=[],
        help="only snapshots that include this source path (repeatable: all of them)",
    )
    parser.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only snapshots with this metadata value (repeatable: all of them)",
    )


def filter_of(args: argparse.Namespace) -> SnapshotFilter:
    """Return the filter that the options of `add_filter_options` give."""
    return make_filter(args.tag, args.host, args.path, args.meta)


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser("log", parents=[parent], help="list snapshots, newest first")
    add_filter_options(parser)
    parser.add_argument(
        "--graph", action="store_true", help="draw each snapshot's parent lineage in ASCII"
    )
    parser.set_defaults(run=run)


def current_parent(repo: Repository, snapshot: Snapshot) -> str | None:
    """Return the hex id of the snapshot's parent as readers see it now.

    A parent whose tags were changed lives on under a new id. The stored parent
    id names the old object, so this follows the chain of replacements.
    """
    if snapshot.parent_id is None:
        return None
    parent_hex = snapshot.parent_id.hex()
    seen = set()
    while parent_hex in repo.replaced_snapshots and parent_hex not in seen:
        seen.add(parent_hex)
        parent_hex = repo.replaced_snapshots[parent_hex]
    return parent_hex


def snapshot_json(snapshot: Snapshot, parent_hex: str | None = None) -> dict[str, object]:
    """Return a snapshot as its JSON object; ``parent_hex`` overrides the stored parent."""
    if parent_hex is None and snapshot.parent_id is not None:
        parent_hex = snapshot.parent_id.hex()
    return {
        "id": snapshot.snapshot_hex,
        "time": snapshot.time,
        "host": snapshot.host,
        "user": snapshot.user,
        "paths": [path.decode(errors="surrogateescape") for path in snapshot.paths],
        "tags": list(snapshot.tags),
        "message": snapshot.message,
        "meta": dict(snapshot.meta),
        "parent": parent_hex,
        "tree": snapshot.tree_id.hex(),
        "cas_version": snapshot.cas_version,
        "summary": dict(snapshot.summary),
        "replaces": [old_id.hex() for old_id in snapshot.replaces],
    }


def describe(snapshot: Snapshot) -> str:
    """Return the one-line text form: short id, time, host, paths and tags."""
    paths = ", ".join(path.decode(errors="replace") for path in snapshot.paths)
    if not paths and STDIN_META in snapshot.meta:
        paths = f"(stdin) {snapshot.meta[STDIN_META]}"
    tags = f" [{', '.join(snapshot.tags)}]" if snapshot.tags else ""
    return f"{snapshot.snapshot_hex[:16]}  {snapshot.time[:19]}  {snapshot.host}  {paths}{tags}"


def detail_lines(snapshot: Snapshot) -> Iterator[str]:
    """Yield the indented lines under a snapshot's line: message, user meta, excludes.

    Meta keys that start with ``cas.`` are shown in their own form (the stdin name in
    the paths column, the exclude patterns on their own line), not as KEY=VALUE.
    """
    if snapshot.message:
        yield f"    {snapshot.message}"
    user_meta = {key: value for key, value in snapshot.meta.items() if not key.startswith("cas.")}
    if user_meta:
        yield "    " + ", ".join(f"{key}={value}" for key, value in user_meta.items())
    if EXCLUDE_META in snapshot.meta:
        yield f"    excluded: {', '.join(exclude_patterns_of(snapshot))}"


def graph_lines(snapshots: list[Snapshot], parents: dict[str, str | None]) -> Iterator[str]:
    """Yield the graph of ``snapshots`` (newest first), one lane per line of descent.

    A node line has ``*`` in the snapshot's lane and ``|`` in every other open
    lane. When two snapshots share a parent, their lanes join with ``/`` on the
    line before the parent.
    """
    shown = {snapshot.snapshot_hex for snapshot in snapshots}
    lanes: list[str | None] = []
    for snapshot in snapshots:
        waiting = [i for i, expected in enumerate(lanes) if expected == snapshot.snapshot_hex]
        if len(waiting) > 1:
            yield _join_line(lanes, set(waiting[1:]))
            for lane in waiting[1:]:
                lanes[lane] = None
        if waiting:
            column = waiting[0]
        elif None in lanes:
            column = lanes.index(None)
        else:
            column = len(lanes)
            lanes.append(None)
        cells = [_cell(i == column, lane) for i, lane in enumerate(lanes)]
        yield " ".join(cells).rstrip() + "  " + describe(snapshot)
        parent = parents.get(snapshot.snapshot_hex)
        lanes[column] = parent if parent in shown else None
        if snapshot.message:
            yield _continuation(lanes).ljust(2 * len(lanes) + 1) + "    " + snapshot.message
        while lanes and lanes[-1] is None:
            lanes.pop()


def _cell(is_node: bool, lane: str | None) -> str:
    """Return one lane's character on a node line: the node, an open lane, or a gap."""
    if is_node:
        return "*"
    if lane:
        return "|"
    return " "


def _join_line(lanes: list[str | None], joining: set[int]) -> str:
    line = [" "] * (2 * len(lanes))
    for i, lane in enumerate(lanes):
        if i in joining:
            line[2 * i - 1] = "/"
        elif lane:
            line[2 * i] = "|"
    return "".join(line).rstrip()


def _continuation(lanes: list[str | None]) -> str:
    return " ".join("|" if lane else " " for lane in lanes).rstrip()


def run(args: argparse.Namespace) -> int:
    """Print the snapshots."""
    wanted = filter_of(args)
    with open_repository(args) as repo:
        if repo.keys.write_only:
            return run_write_only(args, wanted, list_sealed_snapshots(repo))
        snapshots = [s for s in repo.list_snapshots() if wanted.matches(s)]
        parents = {s.snapshot_hex: current_parent(repo, s) for s in snapshots}
    snapshots.reverse()
    if args.json:
        print_json([snapshot_json(s, parents[s.snapshot_hex]) for s in snapshots])
        return 0
    if args.graph:
        for line in graph_lines(snapshots, parents):
            print(line)
        return 0
    for snapshot in snapshots:
        print(describe(snapshot))
        for line in detail_lines(snapshot):
            print(line)
    return 0


def run_write_only(
    args: argparse.Namespace, wanted: SnapshotFilter, sealed: list[SealedSnapshot]
) -> int:
    """Print the snapshots for a write-only key, which cannot open snapshot objects.

    Snapshots that this machine's key wrote show in full, from its local record;
    every other one shows its id only. With a filter, only recorded snapshots can match.
    """
    filtered = bool(args.tag or args.host or args.path or args.meta)
    shown = [
        item
        for item in sealed
        if not filtered or (item.snapshot is not None and wanted.matches(item.snapshot))
    ]
    if args.json:
        print_json([_sealed_json(item) for item in shown])
        return 0
    for item in shown:
        if item.snapshot is None:
            print(f"{item.snapshot_hex[:16]}  (sealed: a full key can read it)")
            continue
        print(describe(item.snapshot))
        for line in detail_lines(item.snapshot):
            print(line)
    return 0


def _sealed_json(item: SealedSnapshot) -> dict[str, object]:
    if item.snapshot is None:
        return {"id": item.snapshot_hex, "readable": False, "time": None}
    return {**snapshot_json(item.snapshot), "readable": False, "from_local_record": True}
