"""`cas snapshot PATH...`: store files and folders as a new snapshot, or join parts into one."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from cas.archiver import Archiver, SnapshotOptions, SnapshotProgress
from cas.codecs import LEGACY_COMPRESSION, Compression, parse_byte_group, parse_codec
from cas.errors import UsageError
from cas.parts import JoinOptions, join_parts, part_name, resolve_parts
from cas.snapshot import Snapshot

from .cmd_unlock import add_wait_option, retry_while_locked
from .context import human_size, info, memory_limit, open_repository, print_json
from .progress import progress_line


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "snapshot", parents=[parent], help="store files and folders as a new snapshot"
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="files or folders to store")
    parser.add_argument("--tag", action="append", default=[], help="tag the snapshot (repeatable)")
    parser.add_argument("--message", "-m", default="", help="a message stored with the snapshot")
    parser.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="free metadata (repeatable)",
    )
    parser.add_argument(
        "--parent",
        default=None,
        help="snapshot whose unchanged files are reused without reading (default: the latest "
        "non-part snapshot of the same paths and host, or for --part the latest part of the "
        "same name and host)",
    )
    parser.add_argument("--host", default="", help="host name to record (default: this machine's)")
    parser.add_argument(
        "--memory",
        type=int,
        default=256,
        metavar="MIB",
        help="bound on file and pack buffers in MiB (default 256)",
    )
    parser.add_argument(
        "--compression",
        default=None,
        metavar="CODEC",
        help="codec of this snapshot's new blobs: lz4, zstd, zstd:LEVEL (1 to 19) or none "
        "(default: the repository's, set by cas init)",
    )
    parser.add_argument(
        "--byte-group",
        default=None,
        metavar="RULE",
        help="auto: group the bytes of chunks whose float element size is known; off: never; "
        "always:K: also group other chunks as elements of K bytes (2, 4 or 8), for raw float "
        "arrays cas does not recognise (default: the repository's)",
    )
    parser.add_argument(
        "--no-tensor-align",
        dest="tensor_align",
        action="store_false",
        help="cut model files (safetensors, GGUF, torch, npz) like any other file, not at "
        "tensor boundaries",
    )
    _add_part_options(parser)
    add_wait_option(parser)
    parser.set_defaults(run=run)


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


def parse_meta(items: list[str]) -> dict[str, str]:
    """Parse KEY=VALUE strings."""
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --meta {item!r}: write KEY=VALUE")
        meta[key] = value
    return meta


def snapshot_compression(args: argparse.Namespace, default: Compression) -> Compression:
    """Return ``default`` with the --compression and --byte-group overrides applied."""
    compression = default
    if args.compression is not None:
        codec, level = parse_codec(args.compression)
        compression = replace(compression, codec=codec, level=level)
    if args.byte_group is not None:
        compression = replace(compression, byte_group=parse_byte_group(args.byte_group))
    return compression


def run(args: argparse.Namespace) -> int:
    """Take the snapshot, or join parts, and print its summary."""
    if args.join or args.join_parts:
        return run_join(args)
    if args.join_tag:
        raise UsageError("--join-tag only selects parts for --join-parts")
    options = SnapshotOptions(
        tags=args.tag,
        message=args.message,
        meta=parse_meta(args.meta),
        parent=args.parent,
        threads=args.threads,
        memory_limit=memory_limit(args.memory),
        host=args.host,
        part=args.part,
        tensor_align=args.tensor_align,
    )
    # Parsed before the repository opens, so a typo costs no password prompt.
    snapshot_compression(args, LEGACY_COMPRESSION)
    with open_repository(args) as repo:
        options.compression = snapshot_compression(args, repo.config.compression)
        line = progress_line(args)

        def show(progress: SnapshotProgress) -> None:
            line.update(
                f"{progress.files} files, {human_size(progress.bytes_read)} read",
                progress.bytes_done,
                progress.bytes_expected,
            )

        # Without a visible bar, no callback, so the archiver skips summing file sizes.
        archiver = Archiver(repo, options, show if line.enabled else None)
        # The archiver takes its lock before it writes anything, so a run that
        # failed on the lock can be repeated as a whole.
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
                "seconds": round(result.seconds, 3),
                "warnings": list(result.warnings),
            }
        )
    info(
        args,
        f"snapshot {snapshot.snapshot_hex[:16]} saved: {result.files} files, "
        f"{human_size(result.bytes_total)} total, {human_size(result.bytes_read)} read, "
        f"{human_size(result.bytes_added)} added in {result.seconds:.1f} s",
    )
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 1 if result.warnings else 0


def run_join(args: argparse.Namespace) -> int:
    """Join the parts named by --join and --join-parts into one snapshot."""
    if args.paths or args.part:
        raise UsageError("--join and --join-parts take no PATH and no --part: they read no files")
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
    info(args, f"snapshot {snapshot.snapshot_hex[:16]} saved: joined {len(parts)} parts")
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
