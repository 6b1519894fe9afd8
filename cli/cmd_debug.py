"""`cas debug chunks FILE`: print the chunker's cut points."""

from __future__ import annotations

import argparse
import sys

from cas.chunker import DEBUG_PARAMS, ChunkerParams, cut_points
from cas.errors import NotFoundError, UsageError

from .context import open_repository, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "debug", parents=[parent], help="tools for checking cas from the shell"
    )
    sub = parser.add_subparsers(dest="debug_command", required=True, metavar="TOOL")
    chunks = sub.add_parser("chunks", parents=[parent], help="print the cut points of a file")
    chunks.add_argument("file", help="file to cut, or - for standard input")
    chunks.add_argument("--min", type=int, default=None, help="minimum chunk size in bytes")
    chunks.add_argument("--avg", type=int, default=None, help="average chunk size in bytes")
    chunks.add_argument("--max", type=int, default=None, help="maximum chunk size in bytes")
    chunks.add_argument("--normalization", type=int, default=None, help="normalization level 0-3")
    chunks.add_argument(
        "--unkeyed", action="store_true", help="use the public gear table; needs no repository"
    )
    chunks.add_argument(
        "--seed",
        type=int,
        default=0,
        help="with --unkeyed: XOR the public table with this 64-bit seed",
    )
    chunks.set_defaults(run=run_chunks)


def run_chunks(args: argparse.Namespace) -> int:
    """Print the cut points as JSON (with --json) or as offset/length lines."""
    if args.unkeyed:
        base, seed = DEBUG_PARAMS, args.seed
        if not 0 <= seed < 1 << 64:
            raise UsageError(f"invalid --seed {seed}: use 0 to 2^64-1")
    else:
        if args.seed:
            raise UsageError("--seed only applies with --unkeyed")
        with open_repository(args) as repo:
            base, seed = repo.config.chunker, repo.keys.chunker_seed()
    params = ChunkerParams(
        min_size=base.min_size if args.min is None else args.min,
        avg_size=base.avg_size if args.avg is None else args.avg,
        max_size=base.max_size if args.max is None else args.max,
        normalization=base.normalization if args.normalization is None else args.normalization,
    )
    params.validate()
    try:
        if args.file == "-":
            points = cut_points(sys.stdin.buffer, params, seed)
        else:
            with open(args.file, "rb") as reader:
                points = cut_points(reader, params, seed)
    except FileNotFoundError:
        raise NotFoundError(f"file {args.file} not found") from None
    if args.json:
        print_json([{"offset": offset, "length": length} for offset, length in points])
    else:
        for offset, length in points:
            print(offset, length)
    return 0
