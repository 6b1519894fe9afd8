"""`cas stats`: repository size, packs, blobs and snapshots."""

from __future__ import annotations

import argparse
import sys

from cas.errors import IntegrityError
from cas.gc import measure_unused

from .context import human_size, open_repository, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser("stats", parents=[parent], help="show repository size and counts")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the statistics."""
    with open_repository(args) as repo:
        sizes: dict[str, int] = {}
        counts: dict[str, int] = {}
        for prefix in ("data/", "index/", "snapshots/", "keys/", "locks/"):
            objects = list(repo.backend.list(prefix))
            sizes[prefix.rstrip("/")] = sum(item.size for item in objects)
            counts[prefix.rstrip("/")] = len(objects)
        logical = 0
        for snapshot in repo.list_snapshots():
            logical += int(snapshot.summary.get("bytes_total", 0))
        # Marking reads every tree that a snapshot reaches; damage leaves the figure unknown.
        unused: int | None = None
        try:
            unused = measure_unused(repo).unused_bytes
        except IntegrityError as exc:
            print(f"warning: cannot count unused bytes: {exc}", file=sys.stderr)
        stats: dict[str, object] = {
            "repository_size": sum(sizes.values()),
            "pack_count": counts["data"],
            "pack_bytes": sizes["data"],
            "index_count": counts["index"],
            "snapshot_count": counts["snapshots"],
            "blob_count": repo.index.cache.count(),
            "unused_bytes": unused,
            "logical_bytes": logical,
            "dedup_ratio": round(logical / sizes["data"], 3) if sizes["data"] else None,
        }
    if args.json:
        print_json(stats)
        return 0
    print(f"repository size  {human_size(sum(sizes.values()))}")
    print(f"packs            {stats['pack_count']} ({human_size(sizes['data'])})")
    if unused is not None:
        print(
            f"unused           {human_size(unused)} (no snapshot uses it; `cas gc` frees "
            f"dead packs, and packs over --max-unused, default 10 %)"
        )
    print(f"blobs            {stats['blob_count']}")
    print(f"snapshots        {stats['snapshot_count']}")
    print(f"logical size     {human_size(logical)} (sum over snapshots)")
    if sizes["data"]:
        print(f"dedup ratio      {logical / sizes['data']:.2f}")
    return 0
