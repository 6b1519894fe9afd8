"""The index: blob id -> location in a pack.

The repository's index objects (``index/<hex>``) are the truth; a local LMDB
database is a cache of them that `Index.sync` brings up to date. Deleting the
cache folder loses nothing. Index object body (msgpack, sealed with the index
key as described in `cas.objects`):

    v           1
    packs       [[pack_id, [entry, ...]], ...], entry as in a pack header:
                [blob_id, type, codec, filter, offset, stored_size, raw_size]
    supersedes  names of index objects whose entries this one repeats, so a
                reader may drop them (written by gc)

LMDB layout: database ``blobs`` maps the 32-byte blob id to a packed
`BlobLocation` (see `_LOCATION`); database ``indexes`` contains the name of each
index object already merged. Memory use does not grow with the number of
blobs: lookups go to the memory-mapped database.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb

from cas.backend import Backend
from cas.crypto import ID_SIZE, MasterKeys
from cas.errors import IntegrityError, NotFoundError, UnsupportedFormatError, UsageError
from cas.objects import ObjectKind, encode_object, read_object
from cas.pack import PackEntry, parse_entry

log = logging.getLogger(__name__)

INDEX_PREFIX = "index/"
# pack id, offset, stored size, raw size, blob type, codec, filter
_LOCATION = struct.Struct("<32sQIIBBB")
# Virtual address space reserved for the cache; LMDB grows the file as needed.
_MAP_SIZE = 1 << 38


@dataclass(frozen=True)
class BlobLocation:
    """Location of a blob: ``offset + stored_size`` is inside pack ``pack_id``."""

    pack_id: bytes
    offset: int
    stored_size: int
    raw_size: int
    blob_type: int
    codec: int
    filter: int

    def pack(self) -> bytes:
        """Return the LMDB value for this location."""
        return _LOCATION.pack(
            self.pack_id,
            self.offset,
            self.stored_size,
            self.raw_size,
            self.blob_type,
            self.codec,
            self.filter,
        )

    @classmethod
    def unpack(cls, value: bytes) -> BlobLocation:
        """Parse an LMDB value."""
        return cls(*_LOCATION.unpack(value))

    @classmethod
    def of_entry(cls, pack_id: bytes, entry: PackEntry) -> BlobLocation:
        """Return the location of a pack header entry."""
        return cls(
            pack_id,
            entry.offset,
            entry.stored_size,
            entry.raw_size,
            int(entry.blob_type),
            int(entry.codec),
            entry.filter,
        )


def pack_name(pack_id: bytes) -> str:
    """Return the backend name of a pack: ``data/<first two hex digits>/<pack hex>``."""
    pack_hex = pack_id.hex()
    return f"data/{pack_hex[:2]}/{pack_hex}"


def entries_to_list(entries: Iterable[PackEntry]) -> list[list[object]]:
    """Return header entries in their stored form."""
    return [entry.to_list() for entry in entries]


def decode_index_body(
    body: object, name: str
) -> tuple[list[tuple[bytes, list[PackEntry]]], list[str]]:
    """Validate an index object's body; return its packs with entries and its supersedes list."""
    if not isinstance(body, dict):
        raise IntegrityError(f"index object {name} is not a map")
    if body.get("v") != 1:
        raise UnsupportedFormatError(f"index object {name} has layout version {body.get('v')!r}")
    raw_packs, supersedes = body.get("packs"), body.get("supersedes", [])
    if not isinstance(raw_packs, list) or not isinstance(supersedes, list):
        raise IntegrityError(f"index object {name} is malformed")
    packs: list[tuple[bytes, list[PackEntry]]] = []
    for item in raw_packs:
        if not isinstance(item, list) or len(item) != 2:
            raise IntegrityError(f"index object {name} has a malformed pack record")
        pack_id, raw_entries = item
        if not isinstance(pack_id, bytes) or len(pack_id) != ID_SIZE:
            raise IntegrityError(f"index object {name} has a malformed pack id")
        if not isinstance(raw_entries, list):
            raise IntegrityError(f"index object {name} has a malformed entry list")
        # The pack size is unknown here; the pack reader bounds entries again.
        entries = [
            parse_entry(entry, number, 1 << 62, f"{pack_id.hex()} (index {name})")
            for number, entry in enumerate(raw_entries)
        ]
        packs.append((pack_id, entries))
    if not all(isinstance(item, str) for item in supersedes):
        raise IntegrityError(f"index object {name} has a malformed supersedes list")
    return packs, [str(item) for item in supersedes]


class IndexCache:
    """The LMDB cache of one repository's index; safe across threads and processes."""

    def __init__(self, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot use cache folder {path}: {exc.strerror}; pass --cache-dir with a "
                f"writable folder"
            ) from None
        self.path = path
        try:
            self._open()
        except lmdb.Error as exc:
            # The cache contains nothing that the repository lacks, so start it afresh.
            log.warning("index cache %s is unreadable (%s); rebuilding it", path, exc)
            for name in ("data.mdb", "lock.mdb"):
                (path / name).unlink(missing_ok=True)
            self._open()

    def _open(self) -> None:
        self._env = lmdb.open(
            str(self.path), map_size=_MAP_SIZE, max_dbs=4, subdir=True, metasync=False, sync=False
        )
        self._blobs = self._env.open_db(b"blobs")
        self._indexes = self._env.open_db(b"indexes")

    def close(self) -> None:
        """Close the database."""
        self._env.close()

    def get(self, blob_id: bytes) -> BlobLocation | None:
        """Return a blob's location, or None when the cache lacks it."""
        with self._env.begin(db=self._blobs) as txn:
            value = txn.get(blob_id)
        return None if value is None else BlobLocation.unpack(value)

    def merged_indexes(self) -> set[str]:
        """Return the names of the index objects already merged into the cache."""
        with self._env.begin(db=self._indexes) as txn:
            return {bytes(key).decode() for key, _ in txn.cursor()}

    def merge(self, name: str, packs: list[tuple[bytes, list[PackEntry]]]) -> None:
        """Add one index object's entries and remember its name, in one transaction."""
        with self._env.begin(write=True) as txn:
            for pack_id, entries in packs:
                for entry in entries:
                    location = BlobLocation.of_entry(pack_id, entry)
                    txn.put(entry.blob_id, location.pack(), db=self._blobs)
            txn.put(name.encode(), b"", db=self._indexes)
        self._env.sync(True)

    def clear(self) -> None:
        """Drop every entry, before a rebuild."""
        with self._env.begin(write=True) as txn:
            txn.drop(self._blobs, delete=False)
            txn.drop(self._indexes, delete=False)

    def items(self) -> Iterator[tuple[bytes, BlobLocation]]:
        """Yield every (blob id, location) pair in blob id order."""
        with self._env.begin(db=self._blobs) as txn:
            for key, value in txn.cursor():
                yield bytes(key), BlobLocation.unpack(bytes(value))

    def count(self) -> int:
        """Return the number of blobs in the cache."""
        with self._env.begin(db=self._blobs) as txn:
            return int(txn.stat(self._blobs)["entries"])


class Index:
    """Index lookups for one open repository: the cache plus this process's new packs.

    Blobs written by this process live in ``_pending`` until their index
    object is published; only then are they merged into the cache, so the
    cache never names a pack that no index object lists.
    """

    def __init__(self, backend: Backend, keys: MasterKeys, cache: IndexCache) -> None:
        self.backend = backend
        self.keys = keys
        self.cache = cache
        self._pending: dict[bytes, BlobLocation] = {}
        self._pending_packs: list[tuple[bytes, list[PackEntry]]] = []
        self._lock = threading.Lock()
        self.written_names: list[str] = []
        self.bytes_written = 0

    def sync(self) -> None:
        """Bring the cache up to date with the repository's index objects.

        New index objects are merged; if an index object the cache merged is
        gone (gc replaced it), the cache is rebuilt from scratch.
        """
        names = {info.name for info in self.backend.list(INDEX_PREFIX)}
        merged = self.cache.merged_indexes()
        if merged - names:
            log.info(
                "index cache is stale (%d index objects removed); rebuilding", len(merged - names)
            )
            self.cache.clear()
            merged = set()
        for name in sorted(names - merged):
            try:
                packs, _ = self.read_index_object(name)
            except NotFoundError:
                continue  # deleted by a concurrent gc after the listing
            self.cache.merge(name, packs)
        log.debug(
            "index cache contains %d blobs from %d index objects", self.cache.count(), len(names)
        )

    def read_index_object(self, name: str) -> tuple[list[tuple[bytes, list[PackEntry]]], list[str]]:
        """Read, authenticate and validate one index object."""
        body = read_object(self.backend, self.keys, ObjectKind.INDEX, name)
        return decode_index_body(body, name)

    def lookup(self, blob_id: bytes) -> BlobLocation | None:
        """Return the location of a blob, or None when no pack contains it."""
        with self._lock:
            location = self._pending.get(blob_id)
        if location is not None:
            return location
        return self.cache.get(blob_id)

    def has(self, blob_id: bytes) -> bool:
        """Return whether some pack, published or pending, contains the blob."""
        return self.lookup(blob_id) is not None

    def add_pack(self, pack_id: bytes, entries: list[PackEntry]) -> None:
        """Record a pack that has been uploaded but not yet indexed."""
        with self._lock:
            for entry in entries:
                self._pending[entry.blob_id] = BlobLocation.of_entry(pack_id, entry)
            self._pending_packs.append((pack_id, entries))

    @property
    def pending_pack_count(self) -> int:
        """Number of uploaded packs that no published index object lists yet."""
        with self._lock:
            return len(self._pending_packs)

    def flush(self, supersedes: list[str] | None = None) -> str | None:
        """Publish an index object for the pending packs; return its name (None if none)."""
        with self._lock:
            packs = self._pending_packs
            self._pending_packs = []
        if not packs and not supersedes:
            return None
        body = {
            "v": 1,
            "packs": [[pack_id, entries_to_list(entries)] for pack_id, entries in packs],
            "supersedes": supersedes or [],
        }
        name = INDEX_PREFIX + _random_hex()
        data = encode_object(self.keys, ObjectKind.INDEX, name, body)
        self.backend.put(name, data)
        self.bytes_written += len(data)
        self.written_names.append(name)
        self.cache.merge(name, packs)
        with self._lock:
            for _pack_id, entries in packs:
                for entry in entries:
                    self._pending.pop(entry.blob_id, None)
        log.debug("published %s with %d packs", name, len(packs))
        return name


def _random_hex() -> str:
    return os.urandom(32).hex()
