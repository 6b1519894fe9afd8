"""`cas tag SNAPSHOT... --add T / --remove T / --set T`: change the tags of snapshots."""

from __future__ import annotations

import argparse

from cas.history import TagChange, change_tags

from .cmd_unlock import add_wait_option
from .context import info, open_repository, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "tag", parents=[parent], help="add, remove or set the tags of snapshots"
    )
    parser.add_argument(
        "snapshots", nargs="+", metavar="SNAPSHOT", help="snapshot ids, unique prefixes or 'latest'"
    )
    parser.add_argument("--add", action="append", default=[], metavar="TAG", help="add TAG")
    parser.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove TAG")
    parser.add_argument(
        "--set",
        action="append",
        default=None,
        metavar="TAG",
        help="replace every tag with these (repeatable; --set '' removes every tag)",
    )
    add_wait_option(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Change the tags and print the old and new id of each changed snapshot."""
    set_tags = None if args.set is None else tuple(tag for tag in args.set if tag)
    change = TagChange(add=tuple(args.add), remove=tuple(args.remove), set_tags=set_tags)
    with open_repository(args) as repo:
        result = change_tags(repo, args.snapshots, change, wait=args.wait)
    if args.json:
        print_json(
            {
                "changed": [
                    {"old_id": old.snapshot_hex, "id": new.snapshot_hex, "tags": list(new.tags)}
                    for old, new in result.changed
                ],
                "unchanged": [snapshot.snapshot_hex for snapshot in result.unchanged],
                "replaced_deleted": result.replaced_deleted,
                "replaced_left": result.replaced_left,
            }
        )
        return 0
    for old, new in result.changed:
        tags = ", ".join(new.tags) or "no tags"
        info(args, f"snapshot {old.snapshot_hex[:16]} is now {new.snapshot_hex[:16]} [{tags}]")
    for snapshot in result.unchanged:
        info(args, f"snapshot {snapshot.snapshot_hex[:16]} unchanged")
    if result.replaced_left:
        info(
            args,
            f"{result.replaced_left} replaced snapshot objects are hidden but not deleted yet, "
            f"because another operation holds a lock; the next `cas tag` or `cas prune` "
            f"deletes them",
        )
    return 0
