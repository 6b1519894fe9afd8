"""`cas dump SNAPSHOT PATH`: write one file of a snapshot, or a folder as a tar stream."""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import BinaryIO

from cas.dump import DumpResult, dump
from cas.errors import UsageError
from cas.repository import Repository
from cas.snapshot import Snapshot

from .cmd_ls import printable
from .cmd_unlock import add_wait_option
from .context import human_size, open_repository, plural, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "dump",
        parents=[parent],
        help="write a file of a snapshot to stdout, or a folder as a tar stream",
    )
    parser.add_argument("snapshot", help="snapshot id, unique prefix, or 'latest'")
    parser.add_argument("path", help="file or folder inside the snapshot, as `cas ls` shows it")
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    parser.add_argument(
        "--archive",
        choices=["tar"],
        help="archive format; a folder is always written as tar, a file only with this option",
    )
    add_wait_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Stream the path; a verification failure raises `IntegrityError` (exit code 3)."""
    if args.output is None:
        if args.json:
            raise UsageError("--json prints its document on stdout: pass -o FILE for the data")
        if sys.stdout.isatty():
            raise UsageError(
                "refusing to write binary data to a terminal: redirect stdout to a file "
                "or a pipe, or pass -o FILE"
            )
    with open_repository(args) as repo:
        snapshot = repo.resolve_snapshot(args.snapshot)
        if args.output is None:
            sys.stdout.flush()
            result = dump(
                repo, snapshot, args.path, sys.stdout.buffer, args.archive == "tar", args.wait
            )
            sys.stdout.buffer.flush()
        else:
            result = _dump_to_file(repo, snapshot, args)
    # Names that are not UTF-8 appear with \xNN escapes, as `cas ls` shows them.
    shown = printable(os.fsencode(result.path))
    if args.json:
        print_json(
            {
                "id": snapshot.snapshot_hex,
                "path": shown,
                "format": result.format,
                "output": args.output,
                "files": result.files,
                "bytes_written": result.bytes_written,
                "seconds": round(result.seconds, 3),
            }
        )
    elif not args.quiet:
        print(
            f"dumped {shown} as {result.format}: {plural(result.files, 'file')}, "
            f"{human_size(result.bytes_written)} written",
            file=sys.stderr,
        )
    return 0


def _dump_to_file(repo: Repository, snapshot: Snapshot, args: argparse.Namespace) -> DumpResult:
    """Dump into a temporary file beside FILE and rename it over FILE only on success.

    So a failed or interrupted dump leaves no partial FILE and keeps an older one.
    """
    output = os.path.abspath(args.output)
    folder = os.path.dirname(output)
    temp = os.path.join(folder, f".cas-dump-{secrets.token_hex(8)}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise UsageError(f"invalid -o {args.output}: {exc.strerror}") from None
    try:
        with open(fd, "wb") as out:
            result = _dump_into(repo, snapshot, args, out)
        os.replace(temp, output)
    except BaseException:
        os.unlink(temp)
        raise
    return result


def _dump_into(
    repo: Repository, snapshot: Snapshot, args: argparse.Namespace, out: BinaryIO
) -> DumpResult:
    result = dump(repo, snapshot, args.path, out, args.archive == "tar", args.wait)
    out.flush()
    os.fsync(out.fileno())
    return result
