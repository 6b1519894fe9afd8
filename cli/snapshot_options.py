"""Options shared by `cas snapshot` and `cas watch`: metadata, excludes, symlinks, memory, codec."""

from __future__ import annotations

import argparse
from dataclasses import replace

from cas.archiver import SnapshotOptions
from cas.codecs import Compression, parse_byte_group, parse_codec
from cas.errors import UsageError
from cas.excludes import check_pattern, read_exclude_file

from .context import memory_limit


def add_snapshot_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that set what a snapshot stores and with which metadata."""
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
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out paths that match this gitignore-style pattern, relative to the "
        "snapshot's root (repeatable; '!PATTERN' includes again)",
    )
    parser.add_argument(
        "--exclude-file",
        action="append",
        default=[],
        metavar="FILE",
        help="read exclude patterns from FILE, one per line, '#' for comments (repeatable; "
        "applied before --exclude patterns)",
    )
    parser.add_argument(
        "--dereference",
        action="store_true",
        help="store the files and folders that symlinks point to instead of the links",
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


def parse_meta(items: list[str]) -> dict[str, str]:
    """Parse KEY=VALUE strings."""
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid --meta {item!r}: write KEY=VALUE")
        meta[key] = value
    return meta


def exclude_patterns(args: argparse.Namespace) -> list[str]:
    """Return the patterns of every --exclude-file, in order, then every --exclude.

    A later pattern takes precedence, so a --exclude overrides the files, as a
    pattern on git's command line overrides a ``.gitignore``.
    """
    patterns: list[str] = []
    for path in args.exclude_file:
        patterns.extend(read_exclude_file(path))
    patterns.extend(check_pattern(pattern, "--exclude") for pattern in args.exclude)
    return patterns


def snapshot_options(args: argparse.Namespace, parent: str | None = None) -> SnapshotOptions:
    """Return the `SnapshotOptions` that the shared options describe."""
    return SnapshotOptions(
        tags=args.tag,
        message=args.message,
        meta=parse_meta(args.meta),
        parent=parent,
        threads=args.threads,
        memory_limit=memory_limit(args.memory),
        host=args.host,
        exclude=exclude_patterns(args),
        dereference=args.dereference,
        tensor_align=args.tensor_align,
    )


def snapshot_compression(args: argparse.Namespace, default: Compression) -> Compression:
    """Return ``default`` with the --compression and --byte-group overrides applied."""
    compression = default
    if args.compression is not None:
        codec, level = parse_codec(args.compression)
        compression = replace(compression, codec=codec, level=level)
    if args.byte_group is not None:
        compression = replace(compression, byte_group=parse_byte_group(args.byte_group))
    return compression
