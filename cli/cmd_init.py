"""`cas init`: create a repository."""

from __future__ import annotations

import argparse

from cas.chunker import DEFAULT_PARAMS, ChunkerParams
from cas.repository import Repository

from .context import cache_dir, info, print_json, read_password, repo_url


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser("init", parents=[parent], help="create a repository")
    parser.add_argument(
        "--chunk-min", type=int, default=DEFAULT_PARAMS.min_size, help="minimum chunk size in bytes"
    )
    parser.add_argument(
        "--chunk-avg", type=int, default=DEFAULT_PARAMS.avg_size, help="average chunk size in bytes"
    )
    parser.add_argument(
        "--chunk-max", type=int, default=DEFAULT_PARAMS.max_size, help="maximum chunk size in bytes"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Create the repository and print its location and id."""
    params = ChunkerParams(
        args.chunk_min, args.chunk_avg, args.chunk_max, DEFAULT_PARAMS.normalization
    )
    params.validate()
    url = repo_url(args)
    repo = Repository.init(
        url, read_password(args, confirm=True), cache_dir=cache_dir(args), chunker=params
    )
    with repo:
        if args.json:
            print_json({"repository": repo.backend.url, "id": repo.config.repo_id.hex()})
        info(args, f"created repository {repo.config.repo_id.hex()[:16]} at {repo.backend.url}")
    return 0
