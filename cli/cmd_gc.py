"""`cas gc`: delete or repack packs to reclaim the space no snapshot uses."""

from __future__ import annotations

import argparse

from cas.gc import DEFAULT_MAX_UNUSED, GarbageCollector, GcOptions, GcResult

from .cmd_unlock import add_wait_option
from .context import human_size, info, open_repository, plural, print_json
from .progress import progress_line


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser("gc", parents=[parent], help="reclaim space that no snapshot uses")
    parser.add_argument(
        "--max-unused",
        type=_percent,
        default=DEFAULT_MAX_UNUSED,
        metavar="PERCENT",
        help="repack a pack when more than PERCENT of its bytes are unused "
        f"(default {DEFAULT_MAX_UNUSED * 100:.0f}; 100 only deletes packs with nothing live)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="report what would be deleted and repacked"
    )
    add_wait_option(parser)
    parser.set_defaults(run=run)


def _percent(text: str) -> float:
    try:
        value = float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}: use 0 to 100") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"invalid percentage {text!r}: use 0 to 100")
    return value / 100


def result_json(result: GcResult) -> dict[str, object]:
    """Return the JSON document of a gc run."""
    return {
        "dry_run": result.dry_run,
        "snapshots": result.snapshots,
        "live_blobs": result.live_blobs,
        "missing_blobs": result.missing_blobs,
        "packs_deleted": result.packs_deleted,
        "bytes_deleted": result.bytes_deleted,
        "packs_repacked": result.packs_repacked,
        "bytes_repacked": result.bytes_repacked,
        "packs_written": result.packs_written,
        "bytes_written": result.bytes_written,
        "bytes_freed": result.bytes_deleted + result.bytes_repacked - result.bytes_written,
        "index_objects_deleted": result.index_objects_deleted,
        "index_objects_written": result.index_objects_written,
        "rescued_blobs": result.rescued_blobs,
        "packs_kept_for_new_snapshots": result.packs_kept_for_new_snapshots,
        "exclusive_seconds": round(result.exclusive_seconds, 3),
        "seconds": round(result.seconds, 3),
        "packs": [
            {
                "id": pack.pack_hex,
                "action": pack.action,
                "size": pack.size,
                "unused_bytes": pack.unused_bytes,
                "indexed": pack.indexed,
            }
            for pack in result.packs
        ],
    }


def run(args: argparse.Namespace) -> int:
    """Run gc and print its summary."""
    options = GcOptions(max_unused=args.max_unused, dry_run=args.dry_run, wait=args.wait)
    with open_repository(args) as repo:
        line = progress_line(args)

        def show(phase: str, done: int, total: int) -> None:
            if phase == "mark":
                line.update("marking what snapshots use", done, total, unit="snapshots")
            else:
                line.update("repacking live blobs", done, total)

        try:
            result = GarbageCollector(repo, options, show).run()
        finally:
            line.close()
    if args.json:
        print_json(result_json(result))
        return 0
    deleted = f"{plural(result.packs_deleted, 'pack')} ({human_size(result.bytes_deleted)})"
    repacked = f"{plural(result.packs_repacked, 'pack')} ({human_size(result.bytes_repacked)})"
    if result.dry_run:
        info(args, f"would delete {deleted} with nothing live and repack {repacked}")
        for pack in result.packs:
            info(args, f"  {pack.action:<6} {pack.pack_hex} {human_size(pack.size)}")
    else:
        info(args, f"deleted {deleted} with nothing live, repacked {repacked}")
        info(
            args,
            f"wrote {plural(result.packs_written, 'pack')} "
            f"({human_size(result.bytes_written)}); the "
            f"exclusive lock was held {result.exclusive_seconds:.2f} s of {result.seconds:.1f} s",
        )
    if result.missing_blobs:
        info(args, f"warning: snapshots use blobs that no index lists: {result.missing_blobs}")
    return 0
