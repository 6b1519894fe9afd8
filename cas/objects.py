"""Sealed objects: config, index, snapshot and lock objects as stored.

Byte layout with key 1 or 2 (a secret of the master keys):

    offset  size  field
    0       4     magic b"CASO"
    4       1     object format version, 1
    5       1     kind: 1 config, 2 index, 3 snapshot, 4 lock
    6       1     key: 1 data key, 2 index key, 3 sealed to the X25519 public key
    7       1     reserved, 0
    8       12    random nonce
    20      ...   AES-256-GCM ciphertext of the msgpack body || 16-byte tag

The associated data is bytes 0..8 followed by the object's name, so an object
copied to another name or relabelled as another kind fails authentication
before its body is parsed.

Key 3 is how a write-only key seals a snapshot object, because it lacks the
data key. A 32-byte ephemeral X25519 public key follows the header:

    0       8     header as above, but version 2 and key byte 3
    8       32    ephemeral X25519 public key
    40      12    random nonce
    52      ...   AES-256-GCM ciphertext of the msgpack body || 16-byte tag

The AES key is `cas.crypto.object_x25519_key`: HKDF-SHA256 over the X25519
secret of the ephemeral key and the repository key, bound to both public keys
and the object name. Each object has its own ephemeral key, so each AES key
seals one message. The associated data is bytes 0..40 followed by the name.
Version 2 marks these objects, so that a reader of version 1 only objects
reports an unsupported version rather than damage.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from cas.backend import Backend
from cas.crypto import (
    KEY_SIZE,
    MasterKeys,
    object_x25519_key,
    object_x25519_writer_key,
    open_sealed,
    pack_msgpack,
    seal,
    unpack_msgpack,
)
from cas.errors import IntegrityError, UnsupportedFormatError, WriteOnlyKeyError

OBJECT_MAGIC = b"CASO"
OBJECT_VERSION = 1
# Objects sealed to the public key (key 3) carry version 2, so a reader that
# predates them reports an unsupported version instead of damage.
OBJECT_VERSION_PUBLIC_KEY = 2
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
    X25519 = 3


# The secret that seals each kind. Readers of the index (every key, including
# write-only keys) need config, index and locks; snapshots need the data key.
_KEY_OF_KIND = {
    ObjectKind.CONFIG: KeyKind.INDEX,
    ObjectKind.INDEX: KeyKind.INDEX,
    ObjectKind.SNAPSHOT: KeyKind.DATA,
    ObjectKind.LOCK: KeyKind.INDEX,
}


# Kinds that a write-only key seals to the repository's public key instead.
_SEALED_TO_PUBLIC_KEY = {ObjectKind.SNAPSHOT}


def _secret(keys: MasterKeys, key_kind: KeyKind) -> bytes:
    if key_kind == KeyKind.INDEX:
        return keys.index_key
    if keys.data_key is None:
        raise WriteOnlyKeyError.for_action("read snapshots")
    return keys.data_key


def seal_object(keys: MasterKeys, kind: ObjectKind, name: str, plaintext: bytes) -> bytes:
    """Seal an already serialized body as an object of ``kind`` stored under ``name``."""
    if keys.data_key is None and kind in _SEALED_TO_PUBLIC_KEY:
        header = OBJECT_MAGIC + bytes([OBJECT_VERSION_PUBLIC_KEY, kind, KeyKind.X25519, 0])
        ephemeral_public, key = object_x25519_writer_key(keys.x25519_public, name)
        prefix = header + ephemeral_public
        return prefix + seal(key, plaintext, prefix + name.encode())
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
    if header[4] not in (OBJECT_VERSION, OBJECT_VERSION_PUBLIC_KEY):
        # The version byte is read before authentication so that a newer object
        # gets a clear message; a forged byte here can only cause this refusal.
        raise UnsupportedFormatError(
            f"object {name} has format version {header[4]}; this cas reads version "
            f"{OBJECT_VERSION} or {OBJECT_VERSION_PUBLIC_KEY}: upgrade cas"
        )
    if header[5] != kind:
        raise IntegrityError(f"object {name} is of kind {header[5]}, expected {int(kind)}")
    # Version 2 goes with key 3 and only with it; both are in the associated data.
    if (header[4] == OBJECT_VERSION_PUBLIC_KEY) != (header[6] == KeyKind.X25519):
        raise IntegrityError(f"object {name} has version {header[4]} with key {header[6]}")
    if header[6] == KeyKind.X25519 and kind in _SEALED_TO_PUBLIC_KEY:
        return _open_sealed_to_public_key(keys, name, data)
    expected_key = _KEY_OF_KIND[kind]
    if header[6] != expected_key:
        raise IntegrityError(f"object {name} is sealed with key {header[6]}")
    return open_sealed(
        _secret(keys, expected_key), data[HEADER_SIZE:], header + name.encode(), f"object {name}"
    )


def _open_sealed_to_public_key(keys: MasterKeys, name: str, data: bytes) -> bytes:
    """Open an object of key 3: header, ephemeral public key, then the sealed body."""
    if keys.x25519_private is None:
        raise WriteOnlyKeyError.for_action("read snapshots")
    prefix_size = HEADER_SIZE + KEY_SIZE
    if len(data) < prefix_size:
        raise IntegrityError(f"object {name} is too short for its ephemeral public key")
    key = object_x25519_key(keys, data[HEADER_SIZE:prefix_size], name)
    prefix = data[:prefix_size]
    return open_sealed(key, data[prefix_size:], prefix + name.encode(), f"object {name}")


def decode_object(keys: MasterKeys, kind: ObjectKind, name: str, data: bytes) -> Any:
    """Authenticate, then parse; raise `IntegrityError` on any mismatch."""
    plain = open_object(keys, kind, name, data)
    return unpack_msgpack(plain, f"object {name}", MAX_OBJECT_SIZE)


def read_object(backend: Backend, keys: MasterKeys, kind: ObjectKind, name: str) -> Any:
    """Fetch an object, bounded in size before it is read, then authenticate and parse it."""
    return decode_object(keys, kind, name, backend.get_bounded(name, MAX_OBJECT_SIZE))
