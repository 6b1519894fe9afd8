"""`cas check [--read-data]`: verify the repository."""

from __future__ import annotations

import argparse
import sys

from cas.checker import check_repository

from .context import info, open_repository, print_json

EXIT_INTEGRITY = 3


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "check", parents=[parent], help="verify the repository's structure and data"
    )
    parser.add_argument(
        "--read-data", action="store_true", help="also read, decrypt and verify every blob"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the check; exit code 3 when anything is wrong."""
    with open_repository(args) as repo:
        report = check_repository(repo, read_data=args.read_data)
    if args.json:
        print_json(
            {
                "ok": report.ok,
                "snapshots": report.snapshots,
                "trees": report.trees,
                "blobs_referenced": report.blobs_referenced,
                "blobs_read": report.blobs_read,
                "bytes_read": report.bytes_read,
                "findings": [finding.__dict__ for finding in report.findings],
            }
        )
    for finding in report.findings:
        where = ", ".join(finding.paths[:5])
        print(
            f"error: {finding.kind}: {finding.message}" + (f" (used by {where})" if where else ""),
            file=sys.stderr,
        )
    if not report.ok:
        return EXIT_INTEGRITY
    read = f", {report.blobs_read} blobs read and verified" if args.read_data else ""
    info(args, f"no problems found: {report.snapshots} snapshots, {report.trees} trees{read}")
    return 0
