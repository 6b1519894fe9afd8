"""Sealed objects: config, index, snapshot and lock objects as stored.

Byte layout:

    offset  size  field
    0       4     magic b"CASO"
    4       1     object format version, 1
    5       1     kind: 1 config, 2 index, 3 snapshot, 4 lock
    6       1     key: 1 data key, 2 index key
    7       1     reserved, 0
    8       12    random nonce
    20      ...   AES-256-GCM ciphertext of the msgpack body || 16-byte tag

The associated data is bytes 0..8 followed by the object's name, so an object
copied to another name or relabelled as another kind fails authentication
before its body is parsed.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from cas.backend import Backend
from cas.crypto import MasterKeys, open_sealed, pack_msgpack, seal, unpack_msgpack
from cas.errors import IntegrityError, UnsupportedFormatError, WriteOnlyKeyError

OBJECT_MAGIC = b"CASO"
OBJECT_VERSION = 1
HEADER_SIZE = 8
MAX_OBJECT_SIZE = 256 << 20


class ObjectKind(IntEnum):
    """Kind of content in a sealed object."""

    CONFIG = 1
    INDEX = 2
    SNAPSHOT = 3
    LOCK = 4


class KeyKind(IntEnum):
    """Secret that seals an object."""

    DATA = 1
    INDEX = 2


# The secret that seals each kind. Readers of the index (every key, including
# write-only keys) need config, index and locks; snapshots need the data key.
_KEY_OF_KIND = {
    ObjectKind.CONFIG: KeyKind.INDEX,
    ObjectKind.INDEX: KeyKind.INDEX,
    ObjectKind.SNAPSHOT: KeyKind.DATA,
    ObjectKind.LOCK: KeyKind.INDEX,
}


def _secret(keys: MasterKeys, key_kind: KeyKind) -> bytes:
    if key_kind == KeyKind.INDEX:
        return keys.index_key
    if keys.data_key is None:
        raise WriteOnlyKeyError("this key is write-only and cannot read or write snapshot data")
    return keys.data_key


def seal_object(keys: MasterKeys, kind: ObjectKind, name: str, plaintext: bytes) -> bytes:
    """Seal an already serialized body as an object of ``kind`` stored under ``name``."""
    key_kind = _KEY_OF_KIND[kind]
    header = OBJECT_MAGIC + bytes([OBJECT_VERSION, kind, key_kind, 0])
    return header + seal(_secret(keys, key_kind), plaintext, header + name.encode())


def encode_object(keys: MasterKeys, kind: ObjectKind, name: str, body: Any) -> bytes:
    """Serialize ``body`` and seal it as an object of ``kind`` stored under ``name``."""
    return seal_object(keys, kind, name, pack_msgpack(body))


def open_object(keys: MasterKeys, kind: ObjectKind, name: str, data: bytes) -> bytes:
    """Check the header and authenticate; return the plaintext body bytes."""
    if len(data) > MAX_OBJECT_SIZE:
        raise IntegrityError(f"object {name} is {len(data)} bytes, over {MAX_OBJECT_SIZE}")
    header = data[:HEADER_SIZE]
    if len(header) != HEADER_SIZE or header[:4] != OBJECT_MAGIC:
        raise IntegrityError(f"object {name} does not start with the object magic")
    if header[4] != OBJECT_VERSION:
        # The version byte is read before authentication so that a newer object
        # gets a clear message; a forged byte here can only cause this refusal.
        raise UnsupportedFormatError(
            f"object {name} has format version {header[4]}; this cas reads version "
            f"{OBJECT_VERSION}: upgrade cas"
        )
    if header[5] != kind:
        raise IntegrityError(f"object {name} is of kind {header[5]}, expected {int(kind)}")
    expected_key = _KEY_OF_KIND[kind]
    if header[6] != expected_key:
        raise IntegrityError(f"object {name} is sealed with key {header[6]}")
    return open_sealed(
        _secret(keys, expected_key), data[HEADER_SIZE:], header + name.encode(), f"object {name}"
    )


def decode_object(keys: MasterKeys, kind: ObjectKind, name: str, data: bytes) -> Any:
    """Authenticate, then parse; raise `IntegrityError` on any mismatch."""
    plain = open_object(keys, kind, name, data)
    return unpack_msgpack(plain, f"object {name}", MAX_OBJECT_SIZE)


def read_object(backend: Backend, keys: MasterKeys, kind: ObjectKind, name: str) -> Any:
    """Fetch an object, bounded in size before it is read, then authenticate and parse it."""
    return decode_object(keys, kind, name, backend.get_bounded(name, MAX_OBJECT_SIZE))
