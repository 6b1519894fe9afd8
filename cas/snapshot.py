"""Snapshot objects: one backup at one time, pointing at a root tree.

A snapshot is a sealed object ``snapshots/<snapshot_hex>`` (see `cas.objects`)
whose id is the keyed BLAKE3 of its msgpack body. Body fields:

    v            1
    time         ISO 8601 with the local UTC offset, microseconds
    host, user   where and by whom it was taken
    paths        absolute source paths as bytes
    tags         list of strings
    message      string
    meta         map of string to string (hyperparameters, data digests, git commits)
    parent       snapshot id (32 bytes) or nil
    tree         root tree id
    cas_version  the `cas` version that wrote it
    summary      counts and sizes of the run that wrote it (files, bytes_read, ...)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cas.crypto import ID_SIZE
from cas.errors import IntegrityError, UnsupportedFormatError

SNAPSHOT_PREFIX = "snapshots/"
SNAPSHOT_VERSION = 1
_HEX_RE = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Snapshot:
    """A snapshot's metadata and root tree id."""

    snapshot_id: bytes
    time: str
    host: str
    user: str
    paths: tuple[bytes, ...]
    tree_id: bytes
    tags: tuple[str, ...] = ()
    message: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    parent_id: bytes | None = None
    cas_version: str = ""
    summary: dict[str, int] = field(default_factory=dict)

    @property
    def snapshot_hex(self) -> str:
        """Return the full hex id."""
        return self.snapshot_id.hex()

    @property
    def datetime(self) -> datetime:
        """Return the snapshot time as an aware datetime."""
        return datetime.fromisoformat(self.time)

    def to_body(self) -> dict[str, Any]:
        """Return the stored body (without the id, which is derived from it)."""
        return {
            "v": SNAPSHOT_VERSION,
            "time": self.time,
            "host": self.host,
            "user": self.user,
            "paths": list(self.paths),
            "tags": list(self.tags),
            "message": self.message,
            "meta": dict(self.meta),
            "parent": self.parent_id,
            "tree": self.tree_id,
            "cas_version": self.cas_version,
            "summary": dict(self.summary),
        }


def snapshot_from_body(snapshot_id: bytes, body: Any, name: str) -> Snapshot:
    """Validate a decoded snapshot body and return the snapshot."""
    if not isinstance(body, dict):
        raise IntegrityError(f"snapshot {name} is not a map")
    if body.get("v") != SNAPSHOT_VERSION:
        raise UnsupportedFormatError(f"snapshot {name} has layout version {body.get('v')!r}")
    try:
        time = _typed(body, "time", str, name)
        datetime.fromisoformat(time)
        tree_id = _typed(body, "tree", bytes, name)
        parent = body.get("parent")
        paths = _typed(body, "paths", list, name)
        tags = _typed(body, "tags", list, name)
        meta = _typed(body, "meta", dict, name)
        summary = body.get("summary", {})
    except ValueError as exc:
        raise IntegrityError(f"snapshot {name} has a malformed time: {exc}") from None
    if len(tree_id) != ID_SIZE or (parent is not None and not _is_id(parent)):
        raise IntegrityError(f"snapshot {name} has a malformed tree or parent id")
    if not all(isinstance(path, bytes) for path in paths):
        raise IntegrityError(f"snapshot {name} has malformed paths")
    if not all(isinstance(tag, str) for tag in tags):
        raise IntegrityError(f"snapshot {name} has malformed tags")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise IntegrityError(f"snapshot {name} has malformed metadata")
    if not isinstance(summary, dict):
        summary = {}
    return Snapshot(
        snapshot_id=snapshot_id,
        time=time,
        host=str(body.get("host", "")),
        user=str(body.get("user", "")),
        paths=tuple(paths),
        tree_id=tree_id,
        tags=tuple(tags),
        message=str(body.get("message", "")),
        meta=dict(meta),
        parent_id=parent,
        cas_version=str(body.get("cas_version", "")),
        summary={str(k): v for k, v in summary.items() if isinstance(v, int)},
    )


def _typed(body: dict[str, Any], key: str, kind: type, name: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind):
        raise IntegrityError(f"snapshot {name} has a missing or malformed {key}")
    return value


def _is_id(value: Any) -> bool:
    return isinstance(value, bytes) and len(value) == ID_SIZE


def is_hex_prefix(text: str) -> bool:
    """Return whether ``text`` could be a snapshot id or a prefix of one."""
    return bool(_HEX_RE.match(text))
