"""Keys, keyed ids and authenticated encryption.

A repository has one random master key set (`MasterKeys`) made of separate
secrets, so that a later write-only key can hold every secret except the data
key:

- ``data_key`` encrypts blobs (chunks, trees) and snapshot objects;
- ``index_key`` encrypts index objects, pack headers and locks;
- ``id_key`` keys BLAKE3 for chunk ids, tree ids and snapshot ids;
- ``chunker_key`` derives the chunker's 64-bit gear table seed;
- ``x25519_private`` / ``x25519_public`` let writers without the data key
  (write-only keys) encrypt blobs and snapshot objects to the repository; only
  a full key contains the private half and can open them.

AES-256-GCM seals everything. Nonce rules, so that no (key, nonce) pair ever
repeats:

- Blobs: each pack gets its own key from HKDF-SHA256 over the data key, a
  random 32-byte salt and the pack id; the blob at byte offset o of the pack
  uses the 96-bit nonce o, and offsets are unique within a pack. Two packs
  share a key only if their random 256-bit salts collide.
- Blobs of a write-only writer (pack key mode 2): each pack draws a fresh
  ephemeral X25519 key pair, and its blob key is HKDF-SHA256 over the X25519
  shared secret, with salt = ephemeral public key || repository public key and
  info naming the pack id. A new ephemeral private key per pack gives a new
  shared secret per pack, so each derived key seals the blobs of one pack
  only, and offsets keep the nonces apart within it, as in mode 1.
- Snapshot objects of a write-only writer: a fresh ephemeral key pair per
  object, so each derived key seals exactly one message and its random nonce
  cannot collide with another under the same key.
- Pack headers: a second HKDF subkey per pack from the index key; nonce 0,
  used once.
- Sealed objects (config, index, snapshot, lock): a random 96-bit nonce under
  the long-lived key. NIST SP 800-38D bounds random nonces to 2^32 messages
  per key; a repository writes one such object per snapshot, index flush or
  lock refresh, far below that bound.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, replace
from typing import Any

import blake3
import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cas.errors import IntegrityError, WriteOnlyKeyError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
ID_SIZE = 32

# Domain-separation strings for the keyed BLAKE3 ids and HKDF infos.
_CHUNKER_SEED_CONTEXT = b"cas chunker seed v1"
_PACK_DATA_INFO = b"cas pack data v1"
_PACK_HEADER_INFO = b"cas pack header v1"
_PACK_X25519_INFO = b"cas pack x25519 v1"
_OBJECT_X25519_INFO = b"cas object x25519 v1"


@dataclass(frozen=True)
class MasterKeys:
    """The repository's secrets; see the module docstring for each one's use."""

    data_key: bytes | None
    index_key: bytes
    id_key: bytes
    chunker_key: bytes
    x25519_private: bytes | None
    x25519_public: bytes

    @classmethod
    def generate(cls) -> MasterKeys:
        """Draw a new random key set from the operating system's generator."""
        private = X25519PrivateKey.generate()
        public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        private_raw = private.private_bytes_raw()
        return cls(
            data_key=os.urandom(KEY_SIZE),
            index_key=os.urandom(KEY_SIZE),
            id_key=os.urandom(KEY_SIZE),
            chunker_key=os.urandom(KEY_SIZE),
            x25519_private=private_raw,
            x25519_public=public,
        )

    def write_only_copy(self) -> MasterKeys:
        """Return the key set of a write-only key: without the data key and X25519 private key."""
        return replace(self, data_key=None, x25519_private=None)

    @property
    def write_only(self) -> bool:
        """Whether these keys lack the data key and so cannot read data."""
        return self.data_key is None

    def to_dict(self) -> dict[str, Any]:
        """Return the keys as a msgpack-ready map (field names are the format)."""
        return {
            "data": self.data_key,
            "index": self.index_key,
            "id": self.id_key,
            "chunker": self.chunker_key,
            "x25519_private": self.x25519_private,
            "x25519_public": self.x25519_public,
        }

    @classmethod
    def from_dict(cls, value: Any) -> MasterKeys:
        """Build keys from a decoded map, checking every field's type and size."""
        if not isinstance(value, dict):
            raise IntegrityError("key material is not a map")

        def field(name: str, size: int, optional: bool = False) -> bytes | None:
            item = value.get(name)
            if item is None and optional:
                return None
            if not isinstance(item, bytes) or len(item) != size:
                raise IntegrityError(f"key material field {name!r} is missing or malformed")
            return item

        index_key = field("index", KEY_SIZE)
        id_key = field("id", KEY_SIZE)
        chunker_key = field("chunker", KEY_SIZE)
        public = field("x25519_public", KEY_SIZE)
        assert index_key is not None and id_key is not None
        assert chunker_key is not None and public is not None
        return cls(
            data_key=field("data", KEY_SIZE, optional=True),
            index_key=index_key,
            id_key=id_key,
            chunker_key=chunker_key,
            x25519_private=field("x25519_private", KEY_SIZE, optional=True),
            x25519_public=public,
        )

    def chunker_seed(self) -> int:
        """Return the 64-bit gear table seed: keyed BLAKE3, first 8 bytes little-endian."""
        digest = blake3.blake3(_CHUNKER_SEED_CONTEXT, key=self.chunker_key).digest()
        seed = int.from_bytes(digest[:8], "little")
        return seed or 1

    def blob_id(self, data: bytes | bytearray | memoryview) -> bytes:
        """Return the keyed BLAKE3 id of a chunk, tree or snapshot plaintext."""
        return blake3.blake3(data, key=self.id_key).digest()


@dataclass(frozen=True)
class KdfParams:
    """Argon2id parameters stored in each key object."""

    salt: bytes
    iterations: int = 3
    lanes: int = 4
    memory_kib: int = 65536

    def derive(self, password: bytes) -> bytes:
        """Derive the 32-byte key-encryption key from a password."""
        kdf = Argon2id(
            salt=self.salt,
            length=KEY_SIZE,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        )
        return kdf.derive(password)


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Encrypt with AES-256-GCM under a random nonce; return nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes, what: str) -> bytes:
    """Decrypt and authenticate the output of `seal`; raise `IntegrityError` naming ``what``."""
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise IntegrityError(f"{what} is too short to be sealed ({len(sealed)} bytes)")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], associated_data)
    except InvalidTag:
        raise IntegrityError(f"{what} failed authentication (damaged or forged)") from None


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """Derive a 32-byte subkey with HKDF-SHA256."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=salt, info=info).derive(ikm)


def pack_data_key(data_key: bytes, salt: bytes, pack_id: bytes) -> bytes:
    """Return the per-pack blob key (see the module docstring for the nonce argument)."""
    return hkdf(data_key, salt, _PACK_DATA_INFO + pack_id)


def pack_header_key(index_key: bytes, salt: bytes, pack_id: bytes) -> bytes:
    """Return the per-pack header key, derived from the index key."""
    return hkdf(index_key, salt, _PACK_HEADER_INFO + pack_id)


def x25519_sender_key(recipient_public: bytes, info: bytes) -> tuple[bytes, bytes]:
    """Return (ephemeral public key, derived key) for sealing to ``recipient_public``.

    The key is HKDF-SHA256 over the X25519 shared secret of a new ephemeral key
    pair, with salt = ephemeral public key || recipient public key, so the key
    is bound to both public keys as well as to ``info``.
    """
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public))
    return ephemeral_public, hkdf(shared, ephemeral_public + recipient_public, info)


def x25519_recipient_key(
    keys: MasterKeys, ephemeral_public: bytes, info: bytes, what: str
) -> bytes:
    """Return the key that `x25519_sender_key` derived, using the repository's private key."""
    if keys.x25519_private is None:
        raise WriteOnlyKeyError.for_action(f"open {what}")
    private = X25519PrivateKey.from_private_bytes(keys.x25519_private)
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError:
        # A low-order point gives an all-zero secret, which `cryptography` rejects.
        raise IntegrityError(f"{what} has an invalid ephemeral X25519 public key") from None
    return hkdf(shared, ephemeral_public + keys.x25519_public, info)


def pack_x25519_writer_key(public: bytes, pack_id: bytes) -> tuple[bytes, bytes]:
    """Return (ephemeral public key, blob key) of a new key mode 2 pack."""
    return x25519_sender_key(public, _PACK_X25519_INFO + pack_id)


def pack_x25519_key(keys: MasterKeys, ephemeral_public: bytes, pack_id: bytes) -> bytes:
    """Return the blob key of a key mode 2 pack from its prologue's ephemeral public key."""
    info = _PACK_X25519_INFO + pack_id
    return x25519_recipient_key(keys, ephemeral_public, info, f"pack {pack_id.hex()}")


def object_x25519_writer_key(public: bytes, name: str) -> tuple[bytes, bytes]:
    """Return (ephemeral public key, key) to seal the object ``name`` to the public key."""
    return x25519_sender_key(public, _OBJECT_X25519_INFO + name.encode())


def object_x25519_key(keys: MasterKeys, ephemeral_public: bytes, name: str) -> bytes:
    """Return the key of an object sealed to the public key, from its ephemeral public key."""
    info = _OBJECT_X25519_INFO + name.encode()
    return x25519_recipient_key(keys, ephemeral_public, info, f"object {name}")


def counter_nonce(counter: int) -> bytes:
    """Return ``counter`` as a 96-bit little-endian nonce."""
    return struct.pack("<QI", counter & 0xFFFFFFFFFFFFFFFF, counter >> 64)


def pack_msgpack(value: Any) -> bytes:
    """Serialize with the settings every `cas` object uses (bin type for bytes)."""
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def unpack_msgpack(data: bytes, what: str, max_size: int = 256 << 20) -> Any:
    """Decode msgpack with bounds on every length; raise `IntegrityError` when malformed.

    ``max_size`` bounds the input; each string, byte string, array and map is
    bounded by the input size, so decoding never allocates more than a small
    multiple of the input.
    """
    if len(data) > max_size:
        raise IntegrityError(f"{what} is {len(data)} bytes, over the limit of {max_size}")
    limit = len(data)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise IntegrityError(f"{what} is not valid msgpack: {exc}") from None
    except (TypeError, UnicodeDecodeError, OverflowError) as exc:
        raise IntegrityError(f"{what} is not valid msgpack: {exc}") from None
