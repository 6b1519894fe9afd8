"""`cas ls SNAPSHOT [PATH]`: list the files of a snapshot."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from datetime import UTC, datetime

from cas.errors import NotFoundError
from cas.repository import Repository
from cas.tree import Node

from .context import open_repository, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser("ls", parents=[parent], help="list the files of a snapshot")
    parser.add_argument("snapshot", help="snapshot id, unique prefix, or 'latest'")
    parser.add_argument(
        "path", nargs="?", default="/", help="folder or file inside the snapshot (default /)"
    )
    parser.set_defaults(run=run)


def find_node(repo: Repository, root_id: bytes, path: str) -> tuple[str, Node | None, bytes]:
    """Return (normalized path, node or None for the root, tree id to list)."""
    parts = [part for part in path.strip("/").split("/") if part]
    tree_id, node, shown = root_id, None, ""
    for number, part in enumerate(parts):
        if node is not None and node.type != "dir":
            raise NotFoundError(f"path {shown} is not a folder")
        nodes = {n.name: n for n in repo.load_tree(tree_id)}
        node = nodes.get(os.fsencode(part))
        shown += "/" + part
        if node is None:
            raise NotFoundError(
                f"path {shown} is not in the snapshot; `cas ls SNAPSHOT` lists its paths"
            )
        if node.type == "dir":
            tree_id = node.subtree
        elif number < len(parts) - 1:
            raise NotFoundError(f"path {shown} is not a folder")
    return shown or "/", node, tree_id


def walk(repo: Repository, tree_id: bytes, prefix: str) -> Iterator[tuple[str, Node]]:
    """Yield (path, node) for everything below a tree, folders before their content."""
    for node in repo.load_tree(tree_id):
        path = prefix.rstrip("/") + "/" + node.name.decode(errors="surrogateescape")
        yield path, node
        if node.type == "dir":
            yield from walk(repo, node.subtree, path)


def printable(name: bytes) -> str:
    """Return a name for a terminal: bytes that are not UTF-8 shown as \\xNN escapes."""
    return name.decode(errors="backslashreplace")


def node_json(path: str, node: Node) -> dict[str, object]:
    """Return one listed entry as its JSON object."""
    return {
        # Names that are not UTF-8 appear with \xNN escapes, so the document is valid UTF-8.
        "path": printable(os.fsencode(path)),
        "type": node.type,
        "size": node.size,
        "mode": f"{node.mode:04o}",
        "mtime": datetime.fromtimestamp(node.mtime_ns / 1e9, UTC).astimezone().isoformat(),
        "digest": node.digest.hex() if node.digest else None,
        "target": node.target.decode(errors="surrogateescape") if node.target else None,
    }


def run(args: argparse.Namespace) -> int:
    """Print the entries below the given path."""
    with open_repository(args) as repo:
        snapshot = repo.resolve_snapshot(args.snapshot)
        shown, node, tree_id = find_node(repo, snapshot.tree_id, args.path)
        if node is not None and node.type != "dir":
            entries = [(shown, node)]
        else:
            entries = list(walk(repo, tree_id, shown))
    if args.json:
        print_json([node_json(path, entry) for path, entry in entries])
        return 0
    for path, entry in entries:
        suffix = " -> " + printable(entry.target) if entry.type == "symlink" else ""
        shown_path = printable(os.fsencode(path))
        print(f"{entry.type[:4]:4} {entry.mode:04o} {entry.size:>14}  {shown_path}{suffix}")
    return 0
