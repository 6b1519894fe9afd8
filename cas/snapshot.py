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
    replaces     ids of the snapshots this one replaces (only when non-empty), written
                 by `cas.history.change_tags` and `cas.repair`. Readers hide every
                 snapshot that a readable snapshot names here.

`validate_labels` bounds what a user can set: tags, message and meta.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cas.crypto import ID_SIZE
from cas.errors import IntegrityError, UnsupportedFormatError, UsageError

SNAPSHOT_PREFIX = "snapshots/"
SNAPSHOT_VERSION = 1
_HEX_RE = re.compile(r"^[0-9a-f]+$")

# Tags: printable, no white space, no comma (a comma separates tags in some
# command lines), at most 128 characters. Meta keys: a letter, then letters,
# digits and ``_ . : -``, at most 128 characters. The bounds keep one snapshot
# object small, since `cas log` reads every snapshot object.
MAX_TAG_LENGTH = 128
MAX_TAG_COUNT = 256
MAX_META_KEY_LENGTH = 128
MAX_META_VALUE_LENGTH = 4096
MAX_META_COUNT = 1024
MAX_MESSAGE_LENGTH = 65536
MAX_REPLACES = 64
_TAG_RE = re.compile(r"^[^\s,\x00-\x1f\x7f]+$")
_META_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:-]*$")
RESERVED_META_PREFIX = "cas."


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
    replaces: tuple[bytes, ...] = ()

    @property
    def snapshot_hex(self) -> str:
        """Return the full hex id."""
        return self.snapshot_id.hex()

    @property
    def datetime(self) -> datetime:
        """Return the snapshot time as an aware datetime."""
        return datetime.fromisoformat(self.time)

    def to_body(self) -> dict[str, Any]:
        """Return the stored body (without the id, which is derived from it).

        ``replaces`` is left out when empty, so snapshots that replace nothing
        encode exactly as version 1 writers before it encoded them.
        """
        body: dict[str, Any] = {
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
        if self.replaces:
            body["replaces"] = list(self.replaces)
        return body


def check_utf8(value: str, subject: str) -> None:
    """Raise `UsageError` when ``value`` cannot be stored as UTF-8.

    Arguments that are not valid UTF-8 reach Python as lone surrogates (PEP 383), which
    msgpack cannot encode, so the snapshot object could not be written.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"invalid {subject} {value!r}: it is not valid UTF-8; give it as UTF-8 text"
        ) from None


def validate_tag(tag: str) -> None:
    """Raise `UsageError` unless ``tag`` is a valid tag."""
    check_utf8(tag, "tag")
    if not tag or len(tag) > MAX_TAG_LENGTH or not _TAG_RE.match(tag):
        raise UsageError(
            f"invalid tag {tag!r}: use 1 to {MAX_TAG_LENGTH} characters without white "
            f"space, commas or control characters"
        )


def validate_labels(tags: list[str] | tuple[str, ...], message: str, meta: dict[str, str]) -> None:
    """Raise `UsageError` for a tag, message or meta entry that a user may not store.

    Meta keys that start with ``cas.`` are reserved for `cas` itself and
    rejected here; the code that sets them skips this check.
    """
    if len(tags) > MAX_TAG_COUNT:
        raise UsageError(f"invalid tags: {len(tags)} given, at most {MAX_TAG_COUNT} allowed")
    for tag in tags:
        validate_tag(tag)
    check_utf8(message, "--message")
    if len(message) > MAX_MESSAGE_LENGTH:
        raise UsageError(
            f"invalid --message: {len(message)} characters, at most {MAX_MESSAGE_LENGTH}"
        )
    if len(meta) > MAX_META_COUNT:
        raise UsageError(f"invalid --meta: {len(meta)} keys, at most {MAX_META_COUNT}")
    for key, value in meta.items():
        check_utf8(key, "--meta key")
        check_utf8(value, f"--meta {key!r} value")
        validate_meta_key(key)
        if key.startswith(RESERVED_META_PREFIX):
            raise UsageError(
                f"invalid --meta key {key!r}: keys starting with {RESERVED_META_PREFIX!r} are "
                f"set by cas itself; choose another name"
            )
        if len(value) > MAX_META_VALUE_LENGTH:
            raise UsageError(
                f"invalid --meta {key}=...: the value has {len(value)} characters, at most "
                f"{MAX_META_VALUE_LENGTH}"
            )


MAX_HOST_LENGTH = 255


def validate_host(host: str) -> None:
    """Raise `UsageError` unless ``host`` can be recorded as a snapshot's host name."""
    check_utf8(host, "--host")
    if len(host) > MAX_HOST_LENGTH or not _TAG_RE.match(host):
        raise UsageError(
            f"invalid --host {host!r}: use 1 to {MAX_HOST_LENGTH} characters without white "
            f"space, commas or control characters"
        )


def validate_meta_key(key: str) -> None:
    """Raise `UsageError` unless ``key`` is a valid meta key."""
    if len(key) > MAX_META_KEY_LENGTH or not _META_KEY_RE.match(key):
        raise UsageError(
            f"invalid --meta key {key!r}: start with a letter, then use letters, digits and "
            f"'_ . : -', at most {MAX_META_KEY_LENGTH} characters"
        )


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
    replaces = body.get("replaces", [])
    if (
        not isinstance(replaces, list)
        or len(replaces) > MAX_REPLACES
        or not all(_is_id(item) for item in replaces)
    ):
        raise IntegrityError(f"snapshot {name} has a malformed replaces list")
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
        replaces=tuple(replaces),
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
