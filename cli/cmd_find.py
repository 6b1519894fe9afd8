"""`cas find PATTERN`: list the snapshots and paths whose names match a shell-style pattern."""

from __future__ import annotations

import argparse
import os

from cas.history import PathFinder, resolve_current

from .cmd_log import add_filter_options, describe, filter_of
from .cmd_ls import node_json, printable
from .context import open_repository, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "find", parents=[parent], help="find files and folders by name in snapshots"
    )
    parser.add_argument(
        "pattern",
        metavar="PATTERN",
        help="shell-style pattern (*, ?, [abc]) on names; with a '/', on full paths",
    )
    parser.add_argument(
        "--snapshot",
        action="append",
        default=[],
        metavar="SNAPSHOT",
        help="search only this snapshot (repeatable; default: every snapshot the filters select)",
    )
    parser.add_argument(
        "--ignore-case", "-i", action="store_true", help="match without regard to case"
    )
    add_filter_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print each snapshot with matches, newest first, and its matching paths."""
    wanted = filter_of(args)
    with open_repository(args) as repo:
        snapshots = repo.list_snapshots()
        if args.snapshot:
            chosen = {resolve_current(repo, name, snapshots).snapshot_hex for name in args.snapshot}
            snapshots = [s for s in snapshots if s.snapshot_hex in chosen]
        snapshots = [s for s in snapshots if wanted.matches(s)]
        finder = PathFinder(repo, args.pattern, ignore_case=args.ignore_case)
        found = [(snapshot, finder.find(snapshot)) for snapshot in reversed(snapshots)]
    found = [(snapshot, matches) for snapshot, matches in found if matches]
    if args.json:
        print_json(
            [
                {
                    "snapshot": {
                        "id": snapshot.snapshot_hex,
                        "time": snapshot.time,
                        "host": snapshot.host,
                        "tags": list(snapshot.tags),
                    },
                    "matches": [node_json(match.path, match.node) for match in matches],
                }
                for snapshot, matches in found
            ]
        )
        return 0
    for snapshot, matches in found:
        print(describe(snapshot))
        for match in matches:
            kind = match.node.type[:4]
            print(f"    {kind:4} {match.node.size:>14}  {printable(os.fsencode(match.path))}")
    return 0
