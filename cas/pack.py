"""Packs: many encrypted blobs in one backend object, with an encrypted header.

Byte layout of a pack (all integers little-endian; docs/format.md has the
full contract):

    offset  size  field
    0       4     magic b"CASP"
    4       1     pack format version, 1
    5       1     key mode: 1 = blob key from the data key,
                            2 = blob key from an X25519 exchange (write-only writers)
    6       2     reserved, 0
    8       32    salt (mode 1) or the writer's ephemeral X25519 public key (mode 2)
    40      ...   blobs, back to back: AES-256-GCM ciphertext || 16-byte tag
    ...     P     zero bytes, so that the pack's length is a multiple of 4096
    H       L     header: AES-256-GCM(header key, nonce 0, msgpack entry list,
                  associated data = bytes 0..40)
    H+L     4     L, the sealed header's length
    H+L+4   4     magic b"CASE"

In key mode 1 the blob key is HKDF(data key, salt, pack id); in key mode 2 it
is HKDF over the X25519 secret of the ephemeral key and the repository key
(see `cas.crypto.pack_x25519_key`), so a writer without the data key can seal
blobs that only the holder of the X25519 private key opens. The header key is
HKDF(index key, bytes 8..40, pack id) in both modes.

Each header entry is ``[blob_id, type, codec, filter, offset, stored_size,
raw_size]``. A blob at offset o is sealed with nonce o under the pack's blob
key (offsets are unique within a pack, and each pack has its own key),
with associated data ``type, codec, filter, raw_size (u32), blob_id``, so a
blob cannot be moved to another pack, renamed, retyped or resized without
failing authentication.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cas.codecs import (
    FILTER_NONE,
    Codec,
    check_codec_and_filter,
    compress_payload,
    decode_payload,
)
from cas.crypto import (
    ID_SIZE,
    TAG_SIZE,
    MasterKeys,
    counter_nonce,
    pack_data_key,
    pack_header_key,
    pack_msgpack,
    pack_x25519_key,
    pack_x25519_writer_key,
    unpack_msgpack,
)
from cas.errors import IntegrityError, UnsupportedFormatError, WriteOnlyKeyError

PACK_MAGIC = b"CASP"
PACK_END_MAGIC = b"CASE"
PACK_VERSION = 1
PROLOGUE_SIZE = 40
TRAILER_SIZE = 8
KEY_MODE_DATA = 1
KEY_MODE_X25519 = 2

# Bounds checked before anything read from storage is allocated or parsed.
MAX_BLOB_RAW_SIZE = 64 << 20  # largest chunk is 16 MiB; a tree may be larger
MAX_HEADER_SIZE = 64 << 20
MAX_PACK_SIZE = 4 << 30
# Packs are zero-padded before the header to a multiple of this many bytes,
# the block size that O_DIRECT writes need on common Linux file systems.
PACK_ALIGNMENT = 4096

_BLOB_AD = struct.Struct("<BBBI")
_ENTRY_FIELDS = 7


class BlobType(IntEnum):
    """Kind of content in a blob."""

    CHUNK = 0
    TREE = 1


@dataclass(frozen=True)
class PackEntry:
    """One blob's place in a pack; ``offset + stored_size`` lies inside the blob area."""

    blob_id: bytes
    blob_type: BlobType
    codec: Codec
    filter: int
    offset: int
    stored_size: int
    raw_size: int

    def to_list(self) -> list[object]:
        """Return the header entry as stored."""
        return [
            self.blob_id,
            int(self.blob_type),
            int(self.codec),
            self.filter,
            self.offset,
            self.stored_size,
            self.raw_size,
        ]


@dataclass(frozen=True)
class PackHeader:
    """A pack's decrypted header, with what is needed to open its blobs."""

    pack_id: bytes
    key_mode: int
    salt: bytes
    entries: tuple[PackEntry, ...]
    blob_area_end: int


def blob_associated_data(
    entry_type: int, codec: int, filt: int, raw_size: int, blob_id: bytes
) -> bytes:
    """Return the associated data that binds a blob's ciphertext to its metadata."""
    return _BLOB_AD.pack(entry_type, codec, filt, raw_size) + blob_id


class PackWriter:
    """Builds one pack in a reusable buffer; not thread-safe.

    The buffer has room for ``target_size`` bytes of blobs plus room for one more
    blob and the header, so `add` never reallocates. Call `finish` to get the
    bytes to upload, then `reset` to start the next pack in the same buffer.
    """

    def __init__(self, keys: MasterKeys, target_size: int, max_blob_size: int) -> None:
        self.keys = keys
        self.target_size = target_size
        capacity = PROLOGUE_SIZE + target_size + max_blob_size + TAG_SIZE + (1 << 20)
        # An anonymous mapping is page-aligned, so the local backend can write
        # the finished pack with O_DIRECT (see `cas.backend.local`).
        self._buffer = mmap.mmap(-1, _round_up(capacity))
        self._view = memoryview(self._buffer)
        self._max_blob_size = max_blob_size
        # Set while no upload thread is using the buffer; see `cas.blobstore`.
        self.ready = threading.Event()
        self.ready.set()
        self.reset()

    def reset(self) -> None:
        """Start a new pack with a fresh id and salt (or ephemeral X25519 public key)."""
        self.pack_id = os.urandom(ID_SIZE)
        # Without the data key, seal to the repository's public key (key mode 2).
        if self.keys.data_key is None:
            key_mode = KEY_MODE_X25519
            self._salt, blob_key = pack_x25519_writer_key(self.keys.x25519_public, self.pack_id)
        else:
            key_mode = KEY_MODE_DATA
            self._salt = os.urandom(32)
            blob_key = pack_data_key(self.keys.data_key, self._salt, self.pack_id)
        self.key_mode = key_mode
        self._aead = AESGCM(blob_key)
        prologue = PACK_MAGIC + bytes([PACK_VERSION, key_mode, 0, 0]) + self._salt
        self._view[:PROLOGUE_SIZE] = prologue
        self._offset = PROLOGUE_SIZE
        self.entries: list[PackEntry] = []
        self.raw_bytes = 0

    @property
    def blob_count(self) -> int:
        """Number of blobs added since the last reset."""
        return len(self.entries)

    @property
    def full(self) -> bool:
        """Whether the pack has reached its target size."""
        return self._offset - PROLOGUE_SIZE >= self.target_size

    def add(
        self,
        blob_type: BlobType,
        blob_id: bytes,
        payload: bytes | bytearray | memoryview,
        codec: Codec,
        raw_size: int,
        filt: int = 0,
    ) -> PackEntry:
        """Encrypt an already compressed ``payload`` into the pack and record its entry."""
        size = len(payload)
        if size > self._max_blob_size or raw_size > MAX_BLOB_RAW_SIZE:
            raise IntegrityError(f"blob of {raw_size} bytes is over the pack writer's limit")
        ad = blob_associated_data(blob_type, codec, filt, raw_size, blob_id)
        stored_size = size + TAG_SIZE
        out = self._view[self._offset : self._offset + stored_size]
        self._aead.encrypt_into(counter_nonce(self._offset), payload, ad, out)
        entry = PackEntry(blob_id, blob_type, codec, filt, self._offset, stored_size, raw_size)
        self.entries.append(entry)
        self._offset += stored_size
        self.raw_bytes += raw_size
        return entry

    def finish(self) -> memoryview:
        """Append the sealed header and trailer; return a view of the whole pack."""
        header = pack_msgpack([entry.to_list() for entry in self.entries])
        key = pack_header_key(self.keys.index_key, self._salt, self.pack_id)
        prologue = bytes(self._view[:PROLOGUE_SIZE])
        sealed = AESGCM(key).encrypt(counter_nonce(0), header, prologue)
        padding = -(self._offset + len(sealed) + TRAILER_SIZE) % PACK_ALIGNMENT
        header_start = self._offset + padding
        end = header_start + len(sealed) + TRAILER_SIZE
        if end > len(self._buffer):
            self._grow(end)
        self._view[self._offset : header_start] = bytes(padding)
        self._view[header_start : header_start + len(sealed)] = sealed
        trailer = struct.pack("<I", len(sealed)) + PACK_END_MAGIC
        self._view[header_start + len(sealed) : end] = trailer
        return self._view[:end]

    def _grow(self, size: int) -> None:
        """Move the pack to a larger buffer; only a header of many tiny blobs needs it."""
        bigger = mmap.mmap(-1, _round_up(size))
        bigger[: self._offset] = self._view[: self._offset]
        self._view.release()
        self._buffer.close()
        self._buffer = bigger
        self._view = memoryview(self._buffer)


def _round_up(size: int) -> int:
    return -(-size // PACK_ALIGNMENT) * PACK_ALIGNMENT


def compress(data: bytes | bytearray | memoryview) -> bytes | None:
    """Return the lz4 block of ``data``, or None when it would not shrink it."""
    packed = compress_payload(data, Codec.LZ4, 0)
    if len(packed) >= len(data):
        return None
    return packed


def parse_prologue(prologue: bytes, pack_name: str) -> tuple[int, bytes]:
    """Check a pack's first 40 bytes; return (key mode, salt)."""
    if len(prologue) != PROLOGUE_SIZE or prologue[:4] != PACK_MAGIC:
        raise IntegrityError(f"pack {pack_name} does not start with the pack magic")
    if prologue[4] != PACK_VERSION:
        raise UnsupportedFormatError(f"pack {pack_name} has format version {prologue[4]}")
    if prologue[5] not in (KEY_MODE_DATA, KEY_MODE_X25519):
        raise IntegrityError(f"pack {pack_name} has unknown key mode {prologue[5]}")
    return prologue[5], bytes(prologue[8:40])


def parse_trailer(trailer: bytes, pack_size: int, pack_name: str) -> int:
    """Check the last 8 bytes; return the sealed header's length, bounded by the pack size."""
    if len(trailer) != TRAILER_SIZE or trailer[4:] != PACK_END_MAGIC:
        raise IntegrityError(f"pack {pack_name} does not end with the pack trailer")
    (header_size,) = struct.unpack("<I", trailer[:4])
    limit = pack_size - PROLOGUE_SIZE - TRAILER_SIZE
    if header_size < TAG_SIZE or header_size > limit or header_size > MAX_HEADER_SIZE:
        raise IntegrityError(
            f"pack {pack_name} claims a header of {header_size} bytes in a pack of {pack_size}"
        )
    return int(header_size)


def decode_header(
    keys: MasterKeys, pack_id: bytes, prologue: bytes, sealed: bytes, blob_area_end: int
) -> PackHeader:
    """Authenticate and parse a pack header; every entry must lie inside the blob area."""
    name = pack_id.hex()
    key_mode, salt = parse_prologue(prologue, name)
    key = pack_header_key(keys.index_key, salt, pack_id)
    try:
        plain = AESGCM(key).decrypt(counter_nonce(0), sealed, prologue)
    except InvalidTag:
        raise IntegrityError(f"header of pack {name} failed authentication") from None
    raw_entries = unpack_msgpack(plain, f"header of pack {name}", MAX_HEADER_SIZE)
    if not isinstance(raw_entries, list):
        raise IntegrityError(f"header of pack {name} is not a list")
    entries = tuple(
        parse_entry(item, number, blob_area_end, name) for number, item in enumerate(raw_entries)
    )
    return PackHeader(pack_id, key_mode, salt, entries, blob_area_end)


def parse_entry(item: object, number: int, blob_area_end: int, name: str) -> PackEntry:
    if not isinstance(item, list) or len(item) != _ENTRY_FIELDS:
        raise IntegrityError(f"header entry {number} of pack {name} is malformed")
    blob_id, blob_type, codec, filt, offset, stored_size, raw_size = item
    ints = (blob_type, codec, filt, offset, stored_size, raw_size)
    if not isinstance(blob_id, bytes) or len(blob_id) != ID_SIZE:
        raise IntegrityError(f"header entry {number} of pack {name} has a bad blob id")
    if not all(isinstance(value, int) and value >= 0 for value in ints):
        raise IntegrityError(f"header entry {number} of pack {name} has a bad field")
    if blob_type not in (0, 1):
        raise IntegrityError(f"header entry {number} of pack {name} has unknown type {blob_type}")
    check_codec_and_filter(codec, filt, f"header entry {number} of pack {name}")
    if offset < PROLOGUE_SIZE or offset + stored_size > blob_area_end or stored_size < TAG_SIZE:
        raise IntegrityError(f"header entry {number} of pack {name} lies outside the pack")
    if raw_size > MAX_BLOB_RAW_SIZE:
        raise IntegrityError(f"header entry {number} of pack {name} claims {raw_size} raw bytes")
    # A blob is stored raw or compressed only when that shrinks it, plus the tag.
    if stored_size > raw_size + TAG_SIZE:
        raise IntegrityError(f"header entry {number} of pack {name} is larger than its blob")
    return PackEntry(
        blob_id, BlobType(blob_type), Codec(codec), filt, offset, stored_size, raw_size
    )


class BlobOpener:
    """Decrypts, decompresses and verifies blobs of one pack; one instance per thread."""

    def __init__(self, keys: MasterKeys, pack_id: bytes, key_mode: int, salt: bytes) -> None:
        if keys.data_key is None:
            raise WriteOnlyKeyError.for_action("read chunks or trees")
        if key_mode == KEY_MODE_DATA:
            blob_key = pack_data_key(keys.data_key, salt, pack_id)
        elif key_mode == KEY_MODE_X25519:
            blob_key = pack_x25519_key(keys, salt, pack_id)
        else:
            raise UnsupportedFormatError(f"pack {pack_id.hex()} uses key mode {key_mode}")
        self.keys = keys
        self.pack_id = pack_id
        self._aead = AESGCM(blob_key)

    def open(
        self,
        blob_id: bytes,
        blob_type: int,
        codec: int,
        filt: int,
        raw_size: int,
        offset: int,
        stored: bytes | bytearray | memoryview,
        out: bytearray | memoryview | None = None,
    ) -> bytes | memoryview:
        """Return a blob's verified plaintext; raise `IntegrityError` on any mismatch.

        With ``out``, a blob stored as plaintext is decrypted into that buffer,
        and a filtered blob is unfiltered into it, and a view of it is returned,
        valid until the buffer is reused. Raises `UnsupportedFormatError` for a
        codec or filter this version does not know.
        """
        where = f"blob {blob_id.hex()} in pack {self.pack_id.hex()}"
        if raw_size > MAX_BLOB_RAW_SIZE or len(stored) < TAG_SIZE:
            raise IntegrityError(f"{where} has impossible sizes")
        ad = blob_associated_data(blob_type, codec, filt, raw_size, blob_id)
        nonce = counter_nonce(offset)
        plain: bytes | memoryview
        # Only a blob stored as plaintext is decrypted straight into ``out``;
        # a filtered blob is unfiltered into it below.
        direct = codec == Codec.NONE and filt == FILTER_NONE
        try:
            if out is not None and direct and len(out) >= len(stored) - TAG_SIZE:
                plain = memoryview(out)[: len(stored) - TAG_SIZE]
                self._aead.decrypt_into(nonce, stored, ad, plain)
                payload: bytes | memoryview = plain
            else:
                payload = self._aead.decrypt(nonce, stored, ad)
        except InvalidTag:
            raise IntegrityError(f"{where} failed authentication (damaged or moved)") from None
        plain = decode_payload(payload, codec, filt, raw_size, where, out)
        if self.keys.blob_id(plain) != blob_id:
            raise IntegrityError(f"{where} does not match its id")
        return plain
