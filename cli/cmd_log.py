"""`cas log`: list snapshots, newest first."""

from __future__ import annotations

import argparse

from cas.snapshot import Snapshot
from cas.writeonly import SealedSnapshot, list_sealed_snapshots

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
        if repo.keys.write_only:
            return run_write_only(args, list_sealed_snapshots(repo))
        snapshots = [s for s in repo.list_snapshots() if set(args.tag) <= set(s.tags)]
    snapshots.reverse()
    if args.json:
        print_json([snapshot_json(snapshot) for snapshot in snapshots])
        return 0
    for snapshot in snapshots:
        paths = ", ".join(path.decode(errors="replace") for path in snapshot.paths)
        tags = f" [{', '.join(snapshot.tags)}]" if snapshot.tags else ""
        print(f"{snapshot.snapshot_hex[:16]}  {snapshot.time[:19]}  {snapshot.host}  {paths}{tags}")
        if snapshot.message:
            print(f"    {snapshot.message}")
    return 0


def run_write_only(args: argparse.Namespace, sealed: list[SealedSnapshot]) -> int:
    """Print the snapshots for a write-only key, which cannot open snapshot objects.

    Snapshots that this machine's key wrote show in full, from its local record;
    every other one shows its id only. With --tag, only recorded snapshots can match.
    """
    shown = [
        item
        for item in sealed
        if not args.tag or (item.snapshot and set(args.tag) <= set(item.snapshot.tags))
    ]
    if args.json:
        print_json([_sealed_json(item) for item in shown])
        return 0
    for item in shown:
        if item.snapshot is None:
            print(f"{item.snapshot_hex[:16]}  (sealed: a full key can read it)")
            continue
        snapshot = item.snapshot
        paths = ", ".join(path.decode(errors="replace") for path in snapshot.paths)
        tags = f" [{', '.join(snapshot.tags)}]" if snapshot.tags else ""
        print(f"{snapshot.snapshot_hex[:16]}  {snapshot.time[:19]}  {snapshot.host}  {paths}{tags}")
    return 0


def _sealed_json(item: SealedSnapshot) -> dict[str, object]:
    if item.snapshot is None:
        return {"id": item.snapshot_hex, "readable": False, "time": None}
    return {**snapshot_json(item.snapshot), "readable": False, "from_local_record": True}
