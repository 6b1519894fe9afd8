"""`cas stats [SNAPSHOT]`: sizes and ratios of one snapshot or of the whole repository."""

from __future__ import annotations

import argparse
import sys

from cas.errors import IntegrityError, NotFoundError
from cas.gc import measure_unused
from cas.history import resolve_current
from cas.repository import Repository
from cas.snapshot import Snapshot
from cas.stats import BlobTotals, SnapshotStats, ratio, repository_stats, snapshot_stats

from .context import human_size, open_repository, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "stats", parents=[parent], help="show sizes and ratios of a snapshot or the repository"
    )
    parser.add_argument(
        "snapshot",
        nargs="?",
        default=None,
        metavar="SNAPSHOT",
        help="snapshot id, unique prefix or 'latest' (default: the whole repository)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the statistics."""
    with open_repository(args) as repo:
        if args.snapshot is not None:
            return _run_snapshot(args, repo)
        stats = _repository_json(repo)
    if args.json:
        print_json(stats)
        return 0
    _print_repository(stats)
    return 0


def _blobs_json(blobs: BlobTotals) -> dict[str, object]:
    return {
        "chunk_count": blobs.chunk_count,
        "tree_count": blobs.tree_count,
        "raw_bytes": blobs.raw_size,
        "stored_bytes": blobs.stored_size,
        "missing_blobs": blobs.missing_count,
    }


def _snapshot_json(item: SnapshotStats) -> dict[str, object]:
    document: dict[str, object] = {
        "id": item.snapshot.snapshot_hex,
        "time": item.snapshot.time,
        "files": item.file_count,
        "logical_bytes": item.logical_size,
        "unique_bytes": item.unique_size,
    }
    if item.blobs is not None:
        document.update(_blobs_json(item.blobs))
        document["dedup_ratio"] = item.dedup_ratio
        document["compression_ratio"] = item.compression_ratio
    return document


def _run_snapshot(args: argparse.Namespace, repo: Repository) -> int:
    snapshots = repo.list_snapshots()
    snapshot = resolve_current(repo, args.snapshot, snapshots)
    item = _snapshot_json(snapshot_stats(repo, snapshot, snapshots))
    if args.json:
        print_json(item)
        return 0
    print(f"snapshot           {snapshot.snapshot_hex[:16]}  {snapshot.time}")
    print(f"files              {item['files']}")
    print(f"logical size       {human_size(int(str(item['logical_bytes'])))}")
    print(f"stored size        {human_size(int(str(item['stored_bytes'])))} (distinct blobs)")
    print(
        f"unique size        {human_size(int(str(item['unique_bytes'])))} "
        f"(used by no other snapshot)"
    )
    print(f"dedup ratio        {_shown(item['dedup_ratio'])}")
    print(f"compression ratio  {_shown(item['compression_ratio'])}")
    return 0


def _repository_json(repo: Repository) -> dict[str, object]:
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for prefix in ("data/", "index/", "snapshots/", "keys/", "locks/"):
        objects = list(repo.backend.list(prefix))
        sizes[prefix.rstrip("/")] = sum(item.size for item in objects)
        counts[prefix.rstrip("/")] = len(objects)
    snapshots = repo.list_snapshots()
    # Walking reads every tree that a snapshot reaches; damage leaves those figures unknown.
    unused: int | None = None
    walked = None
    try:
        unused = measure_unused(repo).unused_bytes
        walked = repository_stats(repo, snapshots)
    except (IntegrityError, NotFoundError) as exc:
        print(f"warning: cannot count unused bytes: {exc}", file=sys.stderr)
    logical = walked.logical_size if walked else _summary_logical(snapshots)
    stats: dict[str, object] = {
        "repository_size": sum(sizes.values()),
        "pack_count": counts["data"],
        "pack_bytes": sizes["data"],
        "index_count": counts["index"],
        "snapshot_count": len(snapshots),
        "snapshot_objects": counts["snapshots"],
        "blob_count": repo.index.cache.count(),
        "unused_bytes": unused,
        "logical_bytes": logical,
        "stored_bytes": walked.blobs.stored_size if walked else None,
        "raw_bytes": walked.blobs.raw_size if walked else None,
        "dedup_ratio": walked.dedup_ratio if walked else ratio(logical, sizes["data"]),
        "compression_ratio": walked.compression_ratio if walked else None,
        "snapshots": [_snapshot_json(item) for item in walked.snapshots] if walked else [],
    }
    return stats


def _summary_logical(snapshots: list[Snapshot]) -> int:
    return sum(int(snapshot.summary.get("bytes_total", 0)) for snapshot in snapshots)


def _shown(value: object) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_repository(stats: dict[str, object]) -> None:
    def size(key: str) -> str:
        value = stats[key]
        return "unknown" if value is None else human_size(int(str(value)))

    print(f"repository size    {size('repository_size')}")
    print(f"packs              {stats['pack_count']} ({size('pack_bytes')})")
    if stats["unused_bytes"] is not None:
        print(
            f"unused             {size('unused_bytes')} (no snapshot uses it; `cas gc` frees "
            f"dead packs, and packs over --max-unused, default 10 %)"
        )
    print(f"blobs              {stats['blob_count']}")
    print(f"snapshots          {stats['snapshot_count']}")
    print(f"logical size       {size('logical_bytes')} (sum over snapshots)")
    print(f"stored size        {size('stored_bytes')} (blobs that snapshots use)")
    print(f"dedup ratio        {_shown(stats['dedup_ratio'])}")
    print(f"compression ratio  {_shown(stats['compression_ratio'])}")
    snapshots = stats["snapshots"]
    if isinstance(snapshots, list) and snapshots:
        print("per snapshot, newest first: id, logical size, unique size")
        for item in reversed(snapshots):
            logical = human_size(int(item["logical_bytes"]))
            unique = human_size(int(item["unique_bytes"]))
            print(f"  {str(item['id'])[:16]}  {logical:>10}  {unique:>10}")
