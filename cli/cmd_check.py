"""`cas check [--read-data | --read-data-subset N/M|P%]`: verify the repository."""

from __future__ import annotations

import argparse
import contextlib
import sys

from cas.checker import CheckReport, check_repository, parse_subset
from cas.errors import BackendError, LockedError
from cas.locks import RepositoryLock
from cas.repository import Repository

from .cmd_unlock import add_wait_option
from .context import info, open_repository, plural, print_json
from .progress import progress_line

EXIT_WARNINGS = 1
EXIT_INTEGRITY = 3
# Findings printed per kind before the rest are summarised in one line.
_SHOWN_PER_KIND = 20


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
    parser.add_argument(
        "--read-data-subset",
        metavar="N/M|P%",
        default=None,
        help="read and verify the blobs of part N of M of the packs (by pack id), "
        "or of a random P percent of them",
    )
    parser.add_argument(
        "--no-lock",
        action="store_true",
        help="check without taking a shared lock (read-only media; a gc may then run "
        "meanwhile and its deletions show up as missing packs)",
    )
    add_wait_option(parser)
    parser.set_defaults(run=run)


def _shared_lock(
    args: argparse.Namespace, repo: Repository
) -> contextlib.AbstractContextManager[object]:
    """Return a shared lock that keeps gc from deleting packs while they are checked.

    Check only reads, so a lock that cannot be written (a full disk, a read-only
    mount) is reported and the check goes on without one; a conflicting
    exclusive lock still stops it with exit code 5.
    """
    if args.no_lock:
        return contextlib.nullcontext()
    try:
        return RepositoryLock(
            repo.backend, repo.keys, exclusive=False, operation="check", wait=args.wait
        )
    except LockedError:
        raise
    except BackendError as exc:
        print(f"warning: cannot write a lock ({exc}); checking without one", file=sys.stderr)
        return contextlib.nullcontext()


def run(args: argparse.Namespace) -> int:
    """Run the check; exit code 3 on any error, 1 on warnings only."""
    subset = parse_subset(args.read_data_subset) if args.read_data_subset else None
    with open_repository(args) as repo:
        line = progress_line(args)
        verb = "read and verified" if args.read_data or subset is not None else "checked"

        def show(done: int, total: int) -> None:
            line.update(f"pack bytes {verb}", done, total)

        with _shared_lock(args, repo):
            report = check_repository(repo, read_data=args.read_data, progress=show, subset=subset)
        line.close()
    if args.json:
        print_json(_report_json(report))
    _print_findings(report)
    if not report.ok:
        return EXIT_INTEGRITY
    read = ""
    if args.read_data or subset is not None:
        blobs = plural(report.blobs_read, "blob")
        read = f", {blobs} in {plural(report.packs_read, 'pack')} read and verified"
    counts = [
        plural(report.snapshots, "snapshot"),
        plural(report.trees, "tree"),
        plural(report.packs, "pack"),
    ]
    summary = ", ".join(counts) + read
    if report.replaced_snapshots:
        summary += (
            f"; {report.replaced_snapshots} of the snapshot objects were replaced by a tag "
            f"change and wait for `cas tag` or `cas prune` to delete them"
        )
    if report.warnings:
        info(args, f"no errors, {plural(len(report.warnings), 'warning')}: {summary}")
        return EXIT_WARNINGS
    info(args, f"no problems found: {summary}")
    return 0


def _report_json(report: CheckReport) -> dict[str, object]:
    return {
        "ok": report.ok,
        "snapshots": report.snapshots,
        "trees": report.trees,
        "index_objects": report.index_objects,
        "packs": report.packs,
        "packs_read": report.packs_read,
        "blobs_referenced": report.blobs_referenced,
        "blobs_read": report.blobs_read,
        "bytes_read": report.bytes_read,
        "replaced_snapshots": report.replaced_snapshots,
        "errors": len(report.errors),
        "warnings": len(report.warnings),
        "findings": [finding.__dict__ for finding in report.findings],
    }


def _print_findings(report: CheckReport) -> None:
    shown: dict[str, int] = {}
    for finding in report.findings:
        shown[finding.kind] = shown.get(finding.kind, 0) + 1
        if shown[finding.kind] > _SHOWN_PER_KIND:
            continue
        where = ", ".join(finding.paths[:5])
        snapshots = ", ".join(snapshot[:16] for snapshot in finding.snapshots[:3])
        used = f" (used by {where} in snapshot {snapshots})" if where else ""
        print(f"{finding.severity}: {finding.kind}: {finding.message}{used}", file=sys.stderr)
    for kind, count in shown.items():
        if count > _SHOWN_PER_KIND:
            hidden = count - _SHOWN_PER_KIND
            print(f"... and {hidden} more {kind} findings (see --json)", file=sys.stderr)
