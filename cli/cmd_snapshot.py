"""`cas snapshot PATH...`: store files and folders as a new snapshot, or join parts into one."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from cas.archiver import Archiver, SnapshotOptions, SnapshotProgress
from cas.codecs import LEGACY_COMPRESSION
from cas.errors import UsageError
from cas.parts import JoinOptions, join_parts, part_name, resolve_parts
from cas.repository import Repository
from cas.snapshot import Snapshot
from cas.streaminput import StreamArchiver, check_stream_name

from .cmd_unlock import add_wait_option, retry_while_locked
from .context import human_size, info, open_repository, plural, print_json
from .progress import progress_line
from .snapshot_options import (
    add_snapshot_options,
    parse_meta,
    snapshot_compression,
    snapshot_options,
)

STDIN_FD = 0


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "snapshot", parents=[parent], help="store files and folders as a new snapshot"
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="files or folders to store")
    add_snapshot_options(parser)
    parser.add_argument(
        "--parent",
        default=None,
        help="snapshot whose unchanged files are reused without reading (default: the latest "
        "non-part snapshot of the same paths and host, or for --part the latest part of the "
        "same name and host)",
    )
    _add_stdin_options(parser)
    _add_part_options(parser)
    add_wait_option(parser)
    parser.set_defaults(run=run)


def _add_stdin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stdin",
        action="store_true",
        help="store standard input as one file named by --stdin-name, instead of PATHs",
    )
    parser.add_argument(
        "--stdin-name",
        default=None,
        metavar="NAME",
        help="name of the file that --stdin stores, such as model.pt or ckpt/model.pt",
    )


def _add_part_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--part",
        default="",
        metavar="NAME",
        help="store the paths as the part NAME of a sharded checkpoint (see --join)",
    )
    parser.add_argument(
        "--join",
        action="extend",
        nargs="+",
        default=[],
        metavar="SNAPSHOT",
        help="instead of reading paths, join these parts (ids, prefixes or 'latest') into one "
        "snapshot with a folder per part name",
    )
    parser.add_argument(
        "--join-parts",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help="join the newest part of each NAME, from any host",
    )
    parser.add_argument(
        "--join-tag",
        action="append",
        default=[],
        metavar="TAG",
        help="with --join-parts, take the newest part that has this tag (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    """Take the snapshot, or join parts, and print its summary."""
    if args.join or args.join_parts:
        return run_join(args)
    if args.join_tag:
        raise UsageError("--join-tag only selects parts for --join-parts")
    if args.stdin_name is not None and not args.stdin:
        raise UsageError("--stdin-name names the file of --stdin; add --stdin or drop it")
    options = snapshot_options(args, parent=args.parent)
    options.part = args.part
    if args.stdin and args.stdin_name is None:
        raise UsageError(
            "--stdin needs --stdin-name NAME, the name of the file in the snapshot, "
            "such as --stdin-name model.pt"
        )
    if args.stdin:
        check_stream_name(args.stdin_name)
    # Parsed before the repository opens, so a typo costs no password prompt.
    snapshot_compression(args, LEGACY_COMPRESSION)
    with open_repository(args) as repo:
        options.compression = snapshot_compression(args, repo.config.compression)
        line = progress_line(args)

        def show(progress: SnapshotProgress) -> None:
            line.update(
                f"{plural(progress.files, 'file')}, {human_size(progress.bytes_read)} read",
                progress.bytes_done,
                progress.bytes_expected,
            )

        # Without a visible bar, no callback, so the archiver skips summing file sizes.
        archiver = _archiver(args, repo, options, show if line.enabled else None)
        # The archiver takes its lock before it writes anything, so a run that
        # failed on the lock can be repeated as a whole. A stream cannot be
        # read twice, but nothing of it is read before the lock is taken.
        result = retry_while_locked(lambda: archiver.run(args.paths), args.wait)
        line.close()
    snapshot = result.snapshot
    if args.json:
        print_json(
            {
                "id": snapshot.snapshot_hex,
                "time": snapshot.time,
                "parent": snapshot.parent_id.hex() if snapshot.parent_id else None,
                "files": result.files,
                "dirs": result.dirs,
                "unchanged_files": result.unchanged_files,
                "bytes_total": result.bytes_total,
                "bytes_read": result.bytes_read,
                "bytes_added": result.bytes_added,
                "new_chunks": result.new_chunks,
                "compression": str(options.compression),
                "byte_group": options.compression.byte_group if options.compression else "",
                "excluded": result.excluded,
                "seconds": round(result.seconds, 3),
                "warnings": list(result.warnings),
            }
        )
    info(
        args,
        f"snapshot {snapshot.snapshot_hex[:16]} saved: {plural(result.files, 'file')}, "
        f"{human_size(result.bytes_total)} total, {human_size(result.bytes_read)} read, "
        f"{human_size(result.bytes_added)} added in {result.seconds:.1f} s",
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 1 if result.warnings else 0


def _archiver(
    args: argparse.Namespace,
    repo: Repository,
    options: SnapshotOptions,
    show: Callable[[SnapshotProgress], None] | None,
) -> Archiver:
    """Return the archiver of the files and folders, or with --stdin of standard input."""
    if not args.stdin:
        return Archiver(repo, options, show)
    if args.paths:
        raise UsageError("--stdin reads standard input and takes no PATH; drop the paths")
    try:
        if os.isatty(STDIN_FD):
            raise UsageError("--stdin reads standard input, which is a terminal; pipe the data in")
        # Unbuffered, so each read fills the block buffer without an extra copy.
        stdin = open(STDIN_FD, "rb", buffering=0, closefd=False)  # noqa: SIM115
    except OSError as exc:
        raise UsageError(f"--stdin cannot read standard input: {exc.strerror}") from None
    return StreamArchiver(repo, options, stdin, args.stdin_name, show)


def run_join(args: argparse.Namespace) -> int:
    """Join the parts named by --join and --join-parts into one snapshot."""
    if args.paths or args.part or args.stdin:
        raise UsageError(
            "--join and --join-parts take no PATH, --part or --stdin: they read no files"
        )
    if args.exclude or args.exclude_file or args.dereference:
        raise UsageError(
            "--join and --join-parts take no --exclude, --exclude-file or --dereference: "
            "they join stored parts as they are"
        )
    options = JoinOptions(
        tags=args.tag, message=args.message, meta=parse_meta(args.meta), host=args.host
    )
    with open_repository(args) as repo:
        parts = resolve_parts(repo, args.join, args.join_parts, tuple(args.join_tag))
        snapshot = retry_while_locked(lambda: join_parts(repo, parts, options), args.wait)
    if args.json:
        print_json(
            {"id": snapshot.snapshot_hex, "time": snapshot.time, "parts": _parts_json(parts)}
        )
    info(args, f"snapshot {snapshot.snapshot_hex[:16]} saved: joined {plural(len(parts), 'part')}")
    for part in parts:
        info(
            args, f"    {part_name(part)}: {part.snapshot_hex[:16]} from {part.host} at {part.time}"
        )
    return 0


def _parts_json(parts: list[Snapshot]) -> list[dict[str, str]]:
    return [
        {
            "name": part_name(part) or "",
            "id": part.snapshot_hex,
            "host": part.host,
            "time": part.time,
        }
        for part in parts
    ]
