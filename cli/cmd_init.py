"""`cas init`: create a repository."""

from __future__ import annotations

import argparse

from cas.chunker import DEFAULT_PARAMS, ChunkerParams
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
    parser.set_defaults(run=run)


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
    )
    with Repository.open(
        args.copy_chunker_params_from, password, cache_dir=cache_dir(args)
    ) as source:
        return source.config.chunker, keys_sharing_ids(source.keys)


def run(args: argparse.Namespace) -> int:
    """Create the repository and print its location and id."""
    params, keys = _chunker_and_keys(args)
    url = repo_url(args)
    repo = Repository.init(
        url, read_password(args, confirm=True), cache_dir=cache_dir(args), chunker=params, keys=keys
    )
    with repo:
        if args.json:
            print_json({"repository": repo.backend.url, "id": repo.config.repo_id.hex()})
        info(args, f"created repository {repo.config.repo_id.hex()[:16]} at {repo.backend.url}")
    return 0
