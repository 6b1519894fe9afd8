"""An open repository: backend, keys, config, index, snapshots and blobs.

Layout of a repository on its backend:

    config                 sealed config object (chunker parameters, pack size)
    keys/<hex>             one key object per password (see `cas.keys`)
    data/<xx>/<pack hex>   packs (see `cas.pack`)
    index/<hex>            index objects (see `cas.index`)
    snapshots/<hex>        snapshot objects (see `cas.snapshot`)
    locks/<hex>            lock objects (see `cas.locks`)

Writers publish in the order packs, index objects, snapshot object, so a
crash leaves at most packs that nothing references yet.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cas.backend import Backend, open_backend
from cas.chunker import DEFAULT_PARAMS, ChunkerParams
from cas.codecs import (
    BYTE_GROUP_AUTO,
    BYTE_GROUP_OFF,
    CODEC_NAMES,
    DEFAULT_COMPRESSION,
    LEGACY_COMPRESSION,
    MAX_ZSTD_LEVEL,
    Codec,
    Compression,
)
from cas.crypto import KdfParams, MasterKeys, pack_msgpack, unpack_msgpack
from cas.errors import (
    AlreadyExistsError,
    AmbiguousNameError,
    IntegrityError,
    NotFoundError,
    UnsupportedFormatError,
    UsageError,
)
from cas.index import Index, IndexCache, pack_name
from cas.keys import unlock, write_key
from cas.objects import (
    MAX_OBJECT_SIZE,
    ObjectKind,
    encode_object,
    open_object,
    read_object,
    seal_object,
)
from cas.pack import MAX_BLOB_RAW_SIZE, PROLOGUE_SIZE, BlobOpener, parse_prologue
from cas.snapshot import SNAPSHOT_PREFIX, Snapshot, is_hex_prefix, snapshot_from_body
from cas.tree import Node, decode_tree

log = logging.getLogger(__name__)

CONFIG_NAME = "config"
# Version 2 adds the zstd codec, the byte-grouping filters and the config's
# `compression` and `byte_group` fields. Version 1 repositories stay readable,
# and writers store only lz4 or raw blobs in them.
REPOSITORY_VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_PACK_SIZE = 32 << 20
MIN_PREFIX_LENGTH = 8


@dataclass(frozen=True)
class RepoConfig:
    """The repository's fixed settings, stored sealed under ``config``."""

    repo_id: bytes
    chunker: ChunkerParams
    pack_size: int
    created: str
    version: int = REPOSITORY_VERSION
    # The default encoding of new blobs; `cas snapshot --compression` overrides it.
    compression: Compression = LEGACY_COMPRESSION

    def to_body(self) -> dict[str, Any]:
        """Return the stored body."""
        body: dict[str, Any] = {
            "v": self.version,
            "repo_id": self.repo_id,
            "chunker": {
                "algorithm": "fastcdc2020",
                "min_size": self.chunker.min_size,
                "avg_size": self.chunker.avg_size,
                "max_size": self.chunker.max_size,
                "normalization": self.chunker.normalization,
            },
            "pack_size": self.pack_size,
            "created": self.created,
        }
        if self.version >= 2:
            body["compression"] = {
                "codec": CODEC_NAMES[self.compression.codec],
                "level": self.compression.level,
            }
            body["byte_group"] = self.compression.byte_group
        return body

    def check_writable(self, compression: Compression) -> None:
        """Raise `UsageError` when this repository's version cannot store ``compression``."""
        if self.version >= 2:
            return
        if compression.codec == Codec.ZSTD or compression.byte_group != BYTE_GROUP_OFF:
            raise UsageError(
                f"compression {compression} with --byte-group {compression.byte_group} needs "
                f"repository format version 2, and this repository has version {self.version}: "
                "use --compression lz4 --byte-group off here, or cas init a new repository "
                "and cas copy the snapshots into it"
            )

    @classmethod
    def from_body(cls, body: Any) -> RepoConfig:
        """Validate a decoded config body."""
        if not isinstance(body, dict):
            raise IntegrityError("config is not a map")
        version = body.get("v")
        if version not in READABLE_VERSIONS:
            raise UnsupportedFormatError(
                f"repository format version {version} is not supported by this cas, "
                f"which reads versions 1 and {REPOSITORY_VERSION}"
            )
        chunker = body.get("chunker")
        if not isinstance(chunker, dict) or chunker.get("algorithm") != "fastcdc2020":
            raise IntegrityError("config has no fastcdc2020 chunker parameters")
        try:
            params = ChunkerParams(
                min_size=int(chunker["min_size"]),
                avg_size=int(chunker["avg_size"]),
                max_size=int(chunker["max_size"]),
                normalization=int(chunker["normalization"]),
            )
            params.validate()
        except (KeyError, TypeError, ValueError, UsageError) as exc:
            raise IntegrityError(f"config has invalid chunker parameters: {exc}") from None
        repo_id, pack_size = body.get("repo_id"), body.get("pack_size")
        if not isinstance(repo_id, bytes) or len(repo_id) != 32:
            raise IntegrityError("config has a malformed repository id")
        if not isinstance(pack_size, int) or not 1 << 20 <= pack_size <= 1 << 30:
            raise IntegrityError(f"config has an invalid pack size {pack_size!r}")
        compression = _compression_from_body(body) if version >= 2 else LEGACY_COMPRESSION
        return cls(repo_id, params, pack_size, str(body.get("created", "")), version, compression)


def _compression_from_body(body: dict[Any, Any]) -> Compression:
    """Validate the config's `compression` and `byte_group` fields."""
    codec_map, byte_group = body.get("compression"), body.get("byte_group")
    if not isinstance(codec_map, dict) or not isinstance(byte_group, str):
        raise IntegrityError("config has no valid compression and byte_group fields")
    name, level = codec_map.get("codec"), codec_map.get("level")
    codecs = {text: codec for codec, text in CODEC_NAMES.items()}
    if name not in codecs:
        raise UnsupportedFormatError(f"config names unknown codec {name!r}")
    if not isinstance(level, int) or not 0 <= level <= MAX_ZSTD_LEVEL:
        raise IntegrityError(f"config has an invalid compression level {level!r}")
    if byte_group not in (BYTE_GROUP_AUTO, BYTE_GROUP_OFF):
        raise UnsupportedFormatError(f"config names unknown byte_group {byte_group!r}")
    return Compression(codecs[name], level, byte_group)


def default_cache_dir() -> Path:
    """Return ``$XDG_CACHE_HOME/cas``, else ``~/.cache/cas``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cas"


class Repository:
    """An open, unlocked repository. Not thread-safe unless a method's docstring states it."""

    def __init__(
        self, backend: Backend, keys: MasterKeys, config: RepoConfig, cache_dir: Path
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.config = config
        self.cache_dir = cache_dir / config.repo_id.hex()
        self._index: Index | None = None
        self._trees: OrderedDict[bytes, list[Node]] = OrderedDict()
        self._openers: OrderedDict[bytes, BlobOpener] = OrderedDict()
        # Hex ids of the snapshot objects the last `list_snapshots` could not load.
        self.skipped_snapshots: list[str] = []
        # Name of the key object that the password opened; None when opened otherwise.
        self.key_name: str | None = None
        # Hex id of each snapshot object that the last `list_snapshots` hid because a
        # readable snapshot replaces it -> hex id of that replacing snapshot.
        self.replaced_snapshots: dict[str, str] = {}

    # Opening and creating

    @classmethod
    def init(
        cls,
        url: str,
        password: bytes,
        *,
        cache_dir: Path | None = None,
        chunker: ChunkerParams | None = None,
        pack_size: int = DEFAULT_PACK_SIZE,
        kdf: KdfParams | None = None,
        backend: Backend | None = None,
        keys: MasterKeys | None = None,
        compression: Compression = DEFAULT_COMPRESSION,
    ) -> Repository:
        """Create a repository at ``url`` and return it open.

        ``backend``, when given, is used in place of the one ``url`` names, such as
        a test wrapper that injects faults. ``keys``, when given, replaces the new
        random master keys (see `cas.copy.keys_sharing_ids`). ``compression`` is
        the repository's default encoding of new blobs.
        """
        backend = backend or open_backend(url)
        if not backend.location_exists():
            backend.create_location()
        if backend.exists(CONFIG_NAME) or any(True for _ in backend.list("keys/")):
            raise AlreadyExistsError(f"a repository already exists at {backend.url}")
        params = chunker or DEFAULT_PARAMS
        params.validate()
        keys = keys or MasterKeys.generate()
        config = RepoConfig(
            repo_id=os.urandom(32),
            chunker=params,
            pack_size=pack_size,
            created=datetime.now().astimezone().isoformat(),
            compression=compression,
        )
        # Config first: an init interrupted before the key leaves a config that
        # `open` reports as a repository without keys, and `init` refuses to reuse.
        data = encode_object(keys, ObjectKind.CONFIG, CONFIG_NAME, config.to_body())
        backend.put(CONFIG_NAME, data)
        key = write_key(backend, keys, password, kdf)
        log.info("created repository %s", backend.url)
        repo = cls(backend, keys, config, cache_dir or default_cache_dir())
        repo.key_name = key.name
        return repo

    @classmethod
    def open(
        cls,
        url: str,
        password: bytes,
        *,
        cache_dir: Path | None = None,
        backend: Backend | None = None,
    ) -> Repository:
        """Open the repository at ``url``; raise `WrongPasswordError` on a wrong password.

        ``backend``, when given, is used in place of the one ``url`` names.
        """
        backend = backend or open_backend(url)
        if not backend.exists(CONFIG_NAME):
            if any(True for _ in backend.list("keys/")):
                raise IntegrityError(
                    f"repository {backend.url} has key objects but no config object: the "
                    f"config was deleted or an init was interrupted; restore it from a copy"
                )
            raise NotFoundError(
                f"no repository at {backend.url}: run `cas init` there first, "
                f"or check the -r/--repo value"
            )
        keys, key_name = unlock(backend, password)
        body = read_object(backend, keys, ObjectKind.CONFIG, CONFIG_NAME)
        config = RepoConfig.from_body(body)
        repo = cls(backend, keys, config, cache_dir or default_cache_dir())
        repo.key_name = key_name
        return repo

    def close(self) -> None:
        """Close the index cache and the backend."""
        if self._index is not None:
            self._index.cache.close()
            self._index = None
        self.backend.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Index

    @property
    def index(self) -> Index:
        """Return the index, syncing the local cache with the repository on first use."""
        if self._index is None:
            cache = IndexCache(self.cache_dir / "index")
            self._index = Index(self.backend, self.keys, cache)
            self._index.sync()
        return self._index

    # Snapshots

    def snapshot_names(self) -> list[str]:
        """Return the hex ids of every snapshot object."""
        names = (info.name for info in self.backend.list(SNAPSHOT_PREFIX))
        return sorted(name[len(SNAPSHOT_PREFIX) :] for name in names)

    def load_snapshot(self, snapshot_hex: str) -> Snapshot:
        """Read, authenticate and validate one snapshot by full hex id."""
        name = SNAPSHOT_PREFIX + snapshot_hex
        data = self.backend.get_bounded(name, MAX_OBJECT_SIZE)
        plain = open_object(self.keys, ObjectKind.SNAPSHOT, name, data)
        # The id is the keyed hash of the body bytes as stored, so fields that a
        # later version adds do not change how older snapshots verify.
        if self.keys.blob_id(plain).hex() != snapshot_hex:
            raise IntegrityError(f"snapshot {snapshot_hex} does not match its id")
        body = unpack_msgpack(plain, f"snapshot {snapshot_hex}", MAX_OBJECT_SIZE)
        return snapshot_from_body(bytes.fromhex(snapshot_hex), body, name)

    def list_snapshots(self, include_replaced: bool = False) -> list[Snapshot]:
        """Return every readable snapshot, oldest first.

        A snapshot that fails to load is logged and left out, so one damaged
        object does not stop `cas log` or the parent search; `cas check`
        reports it. A snapshot that another readable snapshot names in its
        ``replaces`` field (left by an interrupted `cas tag`) is left out too,
        unless ``include_replaced``; `replaced_snapshots` maps it to its replacement.
        """
        snapshots = []
        self.skipped_snapshots = []
        for name in self.snapshot_names():
            try:
                snapshots.append(self.load_snapshot(name))
            except (IntegrityError, UnsupportedFormatError, NotFoundError) as exc:
                log.warning("skipping snapshot %s: %s", name, exc)
                self.skipped_snapshots.append(name)
        self.replaced_snapshots = {
            old_id.hex(): snap.snapshot_hex for snap in snapshots for old_id in snap.replaces
        }
        if not include_replaced:
            snapshots = [s for s in snapshots if s.snapshot_hex not in self.replaced_snapshots]
        return sorted(snapshots, key=lambda snap: (snap.datetime, snap.snapshot_hex))

    def resolve_snapshot(self, name: str) -> Snapshot:
        """Find a snapshot by full hex id, unique prefix of 8+ hex digits, or ``latest``."""
        if name == "latest":
            snapshots = self.list_snapshots()
            if not snapshots:
                raise NotFoundError(f"repository {self.backend.url} has no snapshots yet")
            return snapshots[-1]
        lowered = name.lower()
        if not is_hex_prefix(lowered) or len(lowered) < MIN_PREFIX_LENGTH:
            raise UsageError(
                f"invalid snapshot name {name!r}: give a full id, a prefix of at least "
                f"{MIN_PREFIX_LENGTH} hex digits, or 'latest'"
            )
        matches = [hex_id for hex_id in self.snapshot_names() if hex_id.startswith(lowered)]
        if not matches:
            raise NotFoundError(f"no snapshot matches {name!r}; `cas log` lists them")
        if len(matches) > 1:
            listed = ", ".join(match[:16] for match in matches[:5])
            raise AmbiguousNameError(
                f"snapshot prefix {name!r} matches {len(matches)} snapshots ({listed}); "
                f"give more digits"
            )
        return self.load_snapshot(matches[0])

    def write_snapshot(self, snapshot: Snapshot) -> tuple[Snapshot, int]:
        """Store a snapshot object; return it with its id set, and the bytes written."""
        body_bytes = pack_msgpack(snapshot.to_body())
        snapshot_id = self.keys.blob_id(body_bytes)
        stored = Snapshot(**{**snapshot.__dict__, "snapshot_id": snapshot_id})
        name = SNAPSHOT_PREFIX + snapshot_id.hex()
        data = seal_object(self.keys, ObjectKind.SNAPSHOT, name, body_bytes)
        self.backend.put(name, data)
        return stored, len(data)

    # Blobs and trees

    def read_blob(self, blob_id: bytes) -> bytes:
        """Read one blob by id: look it up, fetch its bytes, authenticate, decompress, verify."""
        location = self.index.lookup(blob_id)
        if location is None:
            raise NotFoundError(f"blob {blob_id.hex()} is not in the index")
        if location.raw_size > MAX_BLOB_RAW_SIZE or location.offset < PROLOGUE_SIZE:
            raise IntegrityError(f"index entry of blob {blob_id.hex()} is out of bounds")
        name = pack_name(location.pack_id)
        stored = self.backend.get(name, location.offset, location.stored_size)
        plain = self._opener(location.pack_id).open(
            blob_id,
            location.blob_type,
            location.codec,
            location.filter,
            location.raw_size,
            location.offset,
            stored,
        )
        return plain if isinstance(plain, bytes) else bytes(plain)

    def _opener(self, pack_id: bytes) -> BlobOpener:
        """Return the blob opener of a pack, reading its prologue once per 64 packs used."""
        opener = self._openers.get(pack_id)
        if opener is not None:
            self._openers.move_to_end(pack_id)
            return opener
        name = pack_name(pack_id)
        key_mode, salt = parse_prologue(self.backend.get(name, 0, PROLOGUE_SIZE), name)
        opener = self._openers[pack_id] = BlobOpener(self.keys, pack_id, key_mode, salt)
        if len(self._openers) > 64:
            self._openers.popitem(last=False)
        return opener

    def load_tree(self, tree_id: bytes) -> list[Node]:
        """Return a tree's nodes; keeps the last 256 trees in memory."""
        cached = self._trees.get(tree_id)
        if cached is not None:
            self._trees.move_to_end(tree_id)
            return cached
        nodes = decode_tree(self.read_blob(tree_id), f"tree {tree_id.hex()}")
        self._trees[tree_id] = nodes
        if len(self._trees) > 256:
            self._trees.popitem(last=False)
        return nodes
