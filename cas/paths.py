"""Paths inside a snapshot: parse them, find their nodes, and select parts of a tree.

A snapshot path is written as `cas ls` shows it: components separated by
"/", relative to the snapshot's root, with or without a leading "/". The
root itself is "/" (or the empty string).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cas.errors import NotFoundError, UsageError
from cas.repository import Repository
from cas.tree import Node

# A selection of a folder's entries: entry name -> the selection below that entry,
# or None when the whole entry is selected. A None selection selects everything.
Selection = dict[bytes, "Selection | None"]


@dataclass(frozen=True)
class Located:
    """A path found in a snapshot: its components and its node (None for the root)."""

    parts: tuple[bytes, ...]
    node: Node | None

    @property
    def shown(self) -> str:
        """Return the path as `cas ls` prints it, with a leading "/"."""
        return "/" + "/".join(os.fsdecode(part) for part in self.parts)


def split_path(path: str) -> tuple[bytes, ...]:
    """Split a snapshot path into components; raise `UsageError` on "." or ".."."""
    parts = tuple(os.fsencode(part) for part in path.split("/") if part)
    for part in parts:
        if part in (b".", b".."):
            raise UsageError(
                f"invalid snapshot path {path!r}: '.' and '..' are not allowed; "
                f"give the path as `cas ls` shows it"
            )
    return parts


def locate(repo: Repository, root_id: bytes, path: str) -> Located:
    """Find the node at ``path``; raise `NotFoundError` naming the path when it is absent."""
    parts = split_path(path)
    tree_id, node = root_id, None
    for depth, part in enumerate(parts):
        if node is not None and node.type != "dir":
            shown = "/" + "/".join(os.fsdecode(p) for p in parts[:depth])
            raise NotFoundError(
                f"path {shown} in the snapshot is a {node.type}, not a folder; "
                f"`cas ls SNAPSHOT` lists its paths"
            )
        node = next((entry for entry in repo.load_tree(tree_id) if entry.name == part), None)
        if node is None:
            shown = "/" + "/".join(os.fsdecode(p) for p in parts[: depth + 1])
            raise NotFoundError(
                f"path {shown} is not in the snapshot; `cas ls SNAPSHOT` lists its paths"
            )
        tree_id = node.subtree
    return Located(parts, node)


def build_selection(repo: Repository, root_id: bytes, paths: list[str]) -> Selection | None:
    """Return the selection of the given include paths, or None when one is the root.

    Every path is looked up first, so an include that names nothing raises
    `UsageError` naming it before the caller writes anything. A path below
    another included path adds nothing.
    """
    located = []
    for path in paths:
        try:
            located.append(locate(repo, root_id, path))
        except NotFoundError as exc:
            raise UsageError(f"invalid --include {path}: {exc}") from None
    if any(not item.parts for item in located):
        return None
    selection: Selection = {}
    for item in located:
        _add_path(selection, item.parts)
    return selection


def _add_path(selection: Selection, parts: tuple[bytes, ...]) -> None:
    level = selection
    for part in parts[:-1]:
        if part in level and level[part] is None:
            return
        below = level.setdefault(part, {})
        assert below is not None
        level = below
    level[parts[-1]] = None
