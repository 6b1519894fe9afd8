"""`cas repair index|snapshots [--dry-run]`: rebuild the index, or rewrite damaged snapshots."""

from __future__ import annotations

import argparse
import sys

from cas.repair import rebuild_index, repair_snapshots

from .context import info, open_repository, plural, print_json

EXIT_WARNINGS = 1
EXIT_INTEGRITY = 3


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "repair", parents=[parent], help="rebuild the index or rewrite damaged snapshots"
    )
    parser.add_argument(
        "what",
        choices=["index", "snapshots"],
        help="index: rebuild the index objects and the cache from the pack headers; "
        "snapshots: rewrite snapshots that use lost data so the rest stays restorable",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="report what would change and write nothing"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the repair; see docs/integrity.md for what each one changes."""
    if args.what == "index":
        return _run_index(args)
    return _run_snapshots(args)


def _run_index(args: argparse.Namespace) -> int:
    with open_repository(args) as repo:
        result = rebuild_index(repo, dry_run=args.dry_run)
    if args.json:
        print_json(
            {
                "dry_run": args.dry_run,
                "packs": result.packs,
                "blobs": result.blobs,
                "index_object": result.new_name or None,
                "removed": result.removed,
                "unreadable_packs": [
                    {"pack": pack_hex, "error": error} for pack_hex, error in result.unreadable
                ],
            }
        )
    for pack_hex, error in result.unreadable:
        print(f"warning: pack {pack_hex} left out: {error}", file=sys.stderr)
    verb = "would replace" if args.dry_run else "replaced"
    info(
        args,
        f"{verb} {len(result.removed)} index objects by one listing {plural(result.packs, 'pack')} "
        f"and {plural(result.blobs, 'blob')}",
    )
    return EXIT_WARNINGS if result.unreadable else 0


def _run_snapshots(args: argparse.Namespace) -> int:
    with open_repository(args) as repo:
        repairs = repair_snapshots(repo, dry_run=args.dry_run)
    if args.json:
        print_json({"dry_run": args.dry_run, "snapshots": [record.__dict__ for record in repairs]})
    failed = [record for record in repairs if record.error]
    for record in repairs:
        if record.error:
            print(f"error: snapshot {record.old_hex}: {record.error}", file=sys.stderr)
            continue
        target = "(dry run)" if args.dry_run else f"-> {record.new_hex}"
        info(args, f"snapshot {record.old_hex[:16]} {target}")
        for label, paths in (
            ("truncated", record.truncated),
            ("dropped", record.dropped),
            ("emptied folder", record.lost_folders),
        ):
            for path in paths:
                info(args, f"  {label}: {path}")
    if not repairs:
        info(args, "no snapshot uses lost data; nothing to repair")
    return EXIT_INTEGRITY if failed else 0
