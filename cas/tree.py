"""Trees and nodes: one folder's entries as an immutable msgpack object.

A tree is stored as a blob of type TREE, named by the keyed BLAKE3 of its
serialized form. Its body is ``{"v": 1, "nodes": [node, ...]}`` with nodes
sorted by name. A node is a msgpack map; absent keys take the defaults of
`Node`:

    name      bytes, one path component (never "", ".", "..", or containing "/" or NUL)
    type      "file", "dir", "symlink", "fifo", "socket", "chardev" or "blockdev"
    mode      permission bits (st_mode & 0o7777)
    uid, gid, user, group
    mtime_ns, ctime_ns          nanoseconds since the epoch
    inode, device, nlink        as stat returned them at snapshot time
    size      bytes of content (files)
    chunks    the file's chunk ids concatenated, 32 bytes each
    sizes     each chunk's length in bytes
    digest    BLAKE3-256 (unkeyed) of the whole file content, so `b3sum` agrees
    target    symlink target as bytes
    subtree   tree id of a folder's tree
    rdev      device number of a device node
    xattrs    map of extended attribute name to value, both bytes
    damaged   text set by `cas repair snapshots` on a file it truncated or a folder
              whose tree was lost. Readers that do not know the key ignore it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from typing import Any

from cas.crypto import ID_SIZE, pack_msgpack, unpack_msgpack
from cas.errors import IntegrityError, UnsupportedFormatError

TREE_VERSION = 1
NODE_TYPES = frozenset({"file", "dir", "symlink", "fifo", "socket", "chardev", "blockdev"})
MAX_TREE_SIZE = 64 << 20
# The chunker's largest maximum chunk size.
MAX_CHUNK_SIZE = 16 << 20


@dataclass(frozen=True)
class Node:
    """One entry of a folder, with its metadata and content references."""

    name: bytes
    type: str
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    user: str = ""
    group: str = ""
    mtime_ns: int = 0
    ctime_ns: int = 0
    inode: int = 0
    device: int = 0
    nlink: int = 1
    size: int = 0
    chunks: bytes = b""
    sizes: tuple[int, ...] = ()
    digest: bytes = b""
    target: bytes = b""
    subtree: bytes = b""
    rdev: int = 0
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    damaged: str = ""

    @property
    def chunk_ids(self) -> list[bytes]:
        """Return the chunk ids as a list of 32-byte ids."""
        return [self.chunks[i : i + ID_SIZE] for i in range(0, len(self.chunks), ID_SIZE)]

    def to_map(self) -> dict[str, Any]:
        """Return the node as stored, leaving out fields at their default."""
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        for item in fields(self):
            if item.name in ("name", "type"):
                continue
            value = getattr(self, item.name)
            if value != _DEFAULTS[item.name]:
                out[item.name] = list(value) if isinstance(value, tuple) else value
        return out


_DEFAULTS: dict[str, Any] = {
    item.name: (item.default_factory() if callable(item.default_factory) else item.default)
    for item in fields(Node)
}
_INT_FIELDS = (
    "mode",
    "uid",
    "gid",
    "mtime_ns",
    "ctime_ns",
    "inode",
    "device",
    "nlink",
    "size",
    "rdev",
)
_BYTES_FIELDS = ("chunks", "digest", "target", "subtree")


def validate_name(name: bytes) -> None:
    """Raise `IntegrityError` unless ``name`` is one safe path component."""
    if name in (b"", b".", b"..") or b"/" in name or b"\x00" in name:
        raise IntegrityError(f"tree contains an unsafe name {name!r}")


def node_from_map(raw: Any) -> Node:
    """Validate one stored node and return it; raise `IntegrityError` when malformed."""
    if not isinstance(raw, dict):
        raise IntegrityError("tree node is not a map")
    name, node_type = raw.get("name"), raw.get("type")
    if not isinstance(name, bytes):
        raise IntegrityError("tree node has no name")
    validate_name(name)
    if node_type not in NODE_TYPES:
        raise IntegrityError(f"tree node {name!r} has unknown type {node_type!r}")
    values: dict[str, Any] = {"name": name, "type": node_type}
    for key in _INT_FIELDS:
        value = raw.get(key, _DEFAULTS[key])
        if not isinstance(value, int) or isinstance(value, bool):
            raise IntegrityError(f"tree node {name!r} has a bad {key}")
        values[key] = value
    for key in _BYTES_FIELDS:
        value = raw.get(key, b"")
        if not isinstance(value, bytes):
            raise IntegrityError(f"tree node {name!r} has a bad {key}")
        values[key] = value
    for key in ("user", "group", "damaged"):
        value = raw.get(key, "")
        values[key] = value if isinstance(value, str) else ""
    values["sizes"] = _read_sizes(raw.get("sizes", []), name)
    values["xattrs"] = _read_xattrs(raw.get("xattrs", {}), name)
    node = Node(**values)
    _check_content(node)
    return node


def _read_sizes(sizes: Any, name: bytes) -> tuple[int, ...]:
    if not isinstance(sizes, list) or not all(
        isinstance(size, int) and 0 < size <= MAX_CHUNK_SIZE for size in sizes
    ):
        raise IntegrityError(f"tree node {name!r} has bad chunk sizes")
    return tuple(sizes)


def _read_xattrs(xattrs: Any, name: bytes) -> dict[bytes, bytes]:
    if not isinstance(xattrs, dict) or not all(
        isinstance(key, bytes) and isinstance(value, bytes) for key, value in xattrs.items()
    ):
        raise IntegrityError(f"tree node {name!r} has bad extended attributes")
    return dict(xattrs)


def _check_content(node: Node) -> None:
    where = f"tree node {node.name!r}"
    if len(node.chunks) != ID_SIZE * len(node.sizes):
        raise IntegrityError(f"{where} has {len(node.sizes)} chunk sizes for its chunk ids")
    if node.type == "file":
        if sum(node.sizes) != node.size or node.size < 0:
            raise IntegrityError(f"{where} has chunks that do not add up to its size")
        if len(node.digest) != ID_SIZE:
            raise IntegrityError(f"{where} has no content digest")
    elif node.chunks:
        raise IntegrityError(f"{where} of type {node.type} has chunks")
    if node.type == "dir" and len(node.subtree) != ID_SIZE:
        raise IntegrityError(f"{where} is a folder without a subtree id")


def encode_tree(nodes: list[Node]) -> bytes:
    """Serialize a folder's nodes, sorted by name; duplicate names are an error."""
    ordered = sorted(nodes, key=lambda node: node.name)
    for before, after in itertools.pairwise(ordered):
        if before.name == after.name:
            raise IntegrityError(f"tree has two entries named {before.name!r}")
    return pack_msgpack({"v": TREE_VERSION, "nodes": [node.to_map() for node in ordered]})


def decode_tree(data: bytes, what: str) -> list[Node]:
    """Parse and validate a tree blob's plaintext."""
    body = unpack_msgpack(data, what, MAX_TREE_SIZE)
    if not isinstance(body, dict):
        raise IntegrityError(f"{what} is not a map")
    if body.get("v") != TREE_VERSION:
        raise UnsupportedFormatError(f"{what} has tree layout version {body.get('v')!r}")
    raw_nodes = body.get("nodes")
    if not isinstance(raw_nodes, list):
        raise IntegrityError(f"{what} has no node list")
    nodes = [node_from_map(raw) for raw in raw_nodes]
    for before, after in itertools.pairwise(nodes):
        if before.name >= after.name:
            raise IntegrityError(f"{what} is not sorted or repeats the name {after.name!r}")
    return nodes
