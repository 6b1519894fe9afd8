"""`cas log`: list snapshots, newest first."""

from __future__ import annotations

import argparse

from cas.excludes import EXCLUDE_META, exclude_patterns_of
from cas.snapshot import Snapshot
from cas.streaminput import STDIN_META

from .context import open_repository, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser("log", parents=[parent], help="list snapshots, newest first")
    parser.add_argument(
        "--tag",
        action="append",
        default=[],
        help="only snapshots with this tag (repeatable: all must match)",
    )
    parser.set_defaults(run=run)


def snapshot_json(snapshot: Snapshot) -> dict[str, object]:
    """Return a snapshot as its JSON object."""
    return {
        "id": snapshot.snapshot_hex,
        "time": snapshot.time,
        "host": snapshot.host,
        "user": snapshot.user,
        "paths": [path.decode(errors="surrogateescape") for path in snapshot.paths],
        "tags": list(snapshot.tags),
        "message": snapshot.message,
        "meta": dict(snapshot.meta),
        "parent": snapshot.parent_id.hex() if snapshot.parent_id else None,
        "tree": snapshot.tree_id.hex(),
        "cas_version": snapshot.cas_version,
        "summary": dict(snapshot.summary),
    }


def run(args: argparse.Namespace) -> int:
    """Print the snapshots."""
    with open_repository(args) as repo:
        snapshots = [s for s in repo.list_snapshots() if set(args.tag) <= set(s.tags)]
    snapshots.reverse()
    if args.json:
        print_json([snapshot_json(snapshot) for snapshot in snapshots])
        return 0
    for snapshot in snapshots:
        paths = ", ".join(path.decode(errors="replace") for path in snapshot.paths)
        if not paths and STDIN_META in snapshot.meta:
            paths = f"(stdin) {snapshot.meta[STDIN_META]}"
        tags = f" [{', '.join(snapshot.tags)}]" if snapshot.tags else ""
        print(f"{snapshot.snapshot_hex[:16]}  {snapshot.time[:19]}  {snapshot.host}  {paths}{tags}")
        if snapshot.message:
            print(f"    {snapshot.message}")
        if EXCLUDE_META in snapshot.meta:
            print(f"    excluded: {', '.join(exclude_patterns_of(snapshot))}")
    return 0
