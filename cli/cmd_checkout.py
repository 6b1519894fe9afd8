"""`cas checkout SNAPSHOT DEST`: restore a snapshot, or part of it, into a folder, verified.

With --overwrite it rolls an existing folder back to the snapshot; the rules
are in docs/commands/checkout.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from cas.errors import UsageError
from cas.restorer import CheckoutOptions, CheckoutProgress, Restorer

from .checkout_verify import add_verify_options, verify_checkout
from .cmd_ls import printable
from .cmd_unlock import add_wait_option
from .context import human_size, info, memory_limit, open_repository, plural, print_json
from .progress import progress_line

EXIT_WARNINGS = 1
EXIT_OPERATIONAL = 2
EXIT_INTEGRITY = 3
EXIT_VERIFICATION = 6


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "checkout", parents=[parent], help="restore a snapshot into a folder"
    )
    parser.add_argument("snapshot", help="snapshot id, unique prefix, or 'latest'")
    parser.add_argument("dest", help="target folder; must be empty or new unless --overwrite")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="roll a folder that is not empty back to the snapshot, keeping files that match",
    )
    parser.add_argument(
        "--delete",
        action="store_true",
        help="with --overwrite, also remove entries that the snapshot lacks",
    )
    parser.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="PATH",
        help="restore only this file or folder of the snapshot, as `cas ls` shows it (repeatable)",
    )
    parser.add_argument(
        "--memory",
        type=int,
        default=256,
        metavar="MIB",
        help="bound on buffers in MiB (default 256)",
    )
    add_verify_options(parser)
    add_wait_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Restore and report; exit code 3 names each file that failed verification."""
    if args.delete and not args.overwrite:
        raise UsageError(
            "--delete removes entries from a folder that is not empty; pass --overwrite with it"
        )
    options = CheckoutOptions(
        overwrite=args.overwrite,
        threads=args.threads,
        memory_limit=memory_limit(args.memory),
        wait=args.wait,
        delete=args.delete,
        include=tuple(args.include),
    )
    with open_repository(args) as repo:
        snapshot = repo.resolve_snapshot(args.snapshot)
        line = progress_line(args)

        def show(progress: CheckoutProgress) -> None:
            line.update(
                plural(progress.files_done, "file"),
                progress.bytes_written,
                progress.bytes_total,
            )

        result = Restorer(repo, snapshot, args.dest, options, show).run()
        line.close()
    verified, verify_error = verify_checkout(args) if not result.failed else ({}, None)
    if verify_error is not None:
        # The restore summary and the checks' results stay in the one JSON document.
        verified.update(error=verify_error, exit_code=EXIT_VERIFICATION)
    if args.json:
        print_json(
            {
                "id": snapshot.snapshot_hex,
                "dest": args.dest,
                "files": result.files,
                "dirs": result.dirs,
                "symlinks": result.symlinks,
                "bytes_total": result.bytes_total,
                "unchanged": result.unchanged,
                "rewritten": result.rewritten,
                "created": result.created,
                "deleted": result.deleted,
                "bytes_written": result.bytes_written,
                "include": [printable(os.fsencode(path)) for path in args.include],
                "seconds": round(result.seconds, 3),
                "failed": [{"path": path, "error": error} for path, error in result.failed],
                **verified,
            }
        )
    for path, error in result.failed:
        print(f"error: {path}: {error}", file=sys.stderr)
    if args.snapshot == "latest" and repo.skipped_snapshots:
        # A damaged snapshot may be the newest one: the restore is of an older one.
        print(
            f"warning: {len(repo.skipped_snapshots)} snapshot objects could not be read, so "
            f"'latest' may not be the newest snapshot; run `cas check`",
            file=sys.stderr,
        )
    if verify_error is not None:
        print(f"cas: {verify_error}; the files stay in {args.dest}", file=sys.stderr)
        return EXIT_VERIFICATION
    if result.failed:
        print(
            f"checkout incomplete: {plural(len(result.failed), 'path')} could not be restored "
            f"({plural(result.files, 'file')} in the snapshot)",
            file=sys.stderr,
        )
        # Failures to write into or delete from the target (disk full, too many
        # files, no permission) are operational errors. Any other failure means
        # that the repository is damaged.
        if all(error.startswith(("write failed", "delete failed")) for _, error in result.failed):
            return EXIT_OPERATIONAL
        return EXIT_INTEGRITY
    info(
        args,
        f"restored snapshot {snapshot.snapshot_hex[:16]}: {plural(result.files, 'file')}, "
        f"{human_size(result.bytes_total)}, verified, in {result.seconds:.1f} s",
    )
    if args.overwrite:
        info(
            args,
            f"{plural(result.unchanged, 'file')} unchanged, {result.rewritten} rewritten, "
            f"{result.created} created, {result.deleted} deleted; "
            f"{human_size(result.bytes_written)} written",
        )
    return EXIT_WARNINGS if args.snapshot == "latest" and repo.skipped_snapshots else 0
