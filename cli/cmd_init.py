"""`cas init`: create a repository."""

from __future__ import annotations

import argparse

from cas.chunker import DEFAULT_PARAMS, ChunkerParams
from cas.codecs import (
    DEFAULT_COMPRESSION,
    Compression,
    default_byte_group,
    parse_byte_group,
    parse_codec,
)
from cas.copy import keys_sharing_ids
from cas.crypto import MasterKeys
from cas.errors import UsageError
from cas.repository import Repository

from .cmd_copy import read_other_password
from .context import cache_dir, info, print_json, read_password, repo_url


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser("init", parents=[parent], help="create a repository")
    parser.add_argument(
        "--chunk-min",
        type=int,
        help=f"minimum chunk size in bytes (default {DEFAULT_PARAMS.min_size})",
    )
    parser.add_argument(
        "--chunk-avg",
        type=int,
        help=f"average chunk size in bytes (default {DEFAULT_PARAMS.avg_size})",
    )
    parser.add_argument(
        "--chunk-max",
        type=int,
        help=f"maximum chunk size in bytes (default {DEFAULT_PARAMS.max_size})",
    )
    parser.add_argument(
        "--copy-chunker-params-from",
        metavar="REPO",
        default=None,
        help="take the chunker parameters, chunker key and id key of this repository, so that "
        "`cas copy` between the two deduplicates (see docs/multi-machine.md)",
    )
    parser.add_argument(
        "--from-password-file",
        default=None,
        help="read the password of the --copy-chunker-params-from repository from this file",
    )
    parser.add_argument(
        "--from-password-command",
        default=None,
        help="run this shell command and use its output as that repository's password",
    )
    parser.add_argument(
        "--compression",
        default=None,
        metavar="CODEC",
        help="default codec of new blobs: lz4, zstd, zstd:LEVEL (1 to 19) or none "
        f"(default {DEFAULT_COMPRESSION}; see docs/benchmarks.md)",
    )
    parser.add_argument(
        "--byte-group",
        default=None,
        metavar="RULE",
        help="auto: group the bytes of chunks whose float element size is known before "
        "compressing them; off: never (default: auto with zstd, off with lz4 and none)",
    )
    parser.set_defaults(run=run)


def _compression(args: argparse.Namespace) -> Compression:
    """Return the --compression and --byte-group choice, each defaulting on its own."""
    codec, level = DEFAULT_COMPRESSION.codec, DEFAULT_COMPRESSION.level
    if args.compression is not None:
        codec, level = parse_codec(args.compression)
    byte_group = default_byte_group(codec)
    if args.byte_group is not None:
        byte_group = parse_byte_group(args.byte_group, allow_always=False)
    return Compression(codec, level, byte_group)


def _chunker_and_keys(args: argparse.Namespace) -> tuple[ChunkerParams, MasterKeys | None]:
    """Return the chunker parameters and, with --copy-chunker-params-from, the master keys."""
    sizes = (args.chunk_min, args.chunk_avg, args.chunk_max)
    if args.copy_chunker_params_from is None:
        params = ChunkerParams(
            DEFAULT_PARAMS.min_size if args.chunk_min is None else args.chunk_min,
            DEFAULT_PARAMS.avg_size if args.chunk_avg is None else args.chunk_avg,
            DEFAULT_PARAMS.max_size if args.chunk_max is None else args.chunk_max,
            DEFAULT_PARAMS.normalization,
        )
        params.validate()
        return params, None
    if any(size is not None for size in sizes):
        raise UsageError(
            "--chunk-min, --chunk-avg and --chunk-max cannot be combined with "
            "--copy-chunker-params-from, which takes the source's sizes"
        )
    password = read_other_password(
        "--copy-chunker-params-from repository",
        args.from_password_file,
        args.from_password_command,
        "CAS_FROM_PASSWORD",
        "--from",
    )
    with Repository.open(
        args.copy_chunker_params_from, password, cache_dir=cache_dir(args)
    ) as source:
        return source.config.chunker, keys_sharing_ids(source.keys)


def run(args: argparse.Namespace) -> int:
    """Create the repository and print its location and id."""
    compression = _compression(args)
    params, keys = _chunker_and_keys(args)
    url = repo_url(args)
    repo = Repository.init(
        url,
        read_password(args, confirm=True),
        cache_dir=cache_dir(args),
        chunker=params,
        keys=keys,
        compression=compression,
    )
    with repo:
        if args.json:
            print_json(
                {
                    "repository": repo.backend.url,
                    "id": repo.config.repo_id.hex(),
                    "compression": str(compression),
                    "byte_group": compression.byte_group,
                }
            )
        info(args, f"created repository {repo.config.repo_id.hex()[:16]} at {repo.backend.url}")
    return 0
