"""Key management: add, list, remove and re-password key objects; export and import master keys.

Every change to ``keys/`` runs under a shared lock of the operation ``key`` taken
with ``unique_operation``, so two key changes never overlap (two removals could
otherwise each see the other's key as the remaining full key), while snapshots
go on. An exclusive lock (prune, gc, repair) also stops a key change.

Rules:

- The last full key (one that contains the data key) cannot be removed, so the
  repository stays readable. The key in use may be removed while another full
  key exists; the current process keeps working, but its password no longer
  opens the repository.
- A password change writes the new key object first and deletes the old one
  second. An interruption between the two leaves both passwords working.
- Only a full key can add keys, remove keys or change a password, so a stolen
  write-only key cannot lock the owner out or widen its own rights.

Export format (`export_keys`), a text block safe to print or store offline:

    -----BEGIN CAS MASTER KEYS-----
    Version: 1
    Repository: <repository id, 64 hex digits>
    Write-Only: no
    Checksum: sha256:<SHA-256 of the payload, 64 hex digits>

    <base64 of the payload, 64 characters per line>
    -----END CAS MASTER KEYS-----

The payload is the MessagePack map ``{"v": 1, "repo_id": bin 32, "keys": map}``
whose ``keys`` contains the master keys as in a key object's sealed map.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cas.backend import Backend
from cas.crypto import KdfParams, MasterKeys, pack_msgpack, unpack_msgpack
from cas.errors import (
    AmbiguousNameError,
    IntegrityError,
    NotFoundError,
    UnsupportedFormatError,
    UsageError,
    WriteOnlyKeyError,
)
from cas.keys import KEY_PREFIX, KeyInfo, key_info, list_key_names, write_key
from cas.locks import RepositoryLock
from cas.objects import ObjectKind, read_object
from cas.repository import CONFIG_NAME, RepoConfig, Repository

log = logging.getLogger(__name__)

KEY_LOCK_OPERATION = "key"
EXPORT_VERSION = 1
EXPORT_BEGIN = "-----BEGIN CAS MASTER KEYS-----"
EXPORT_END = "-----END CAS MASTER KEYS-----"
# An export of 32-byte keys is under 1 KiB; the bound stops a wrong file early.
MAX_EXPORT_SIZE = 64 << 10
_BASE64_LINE = 64


@dataclass(frozen=True)
class KeyEntry:
    """One key object as `list_keys` reports it; ``info`` is None when it is unreadable."""

    name: str
    info: KeyInfo | None
    in_use: bool
    problem: str = ""

    @property
    def key_hex(self) -> str:
        """The key id: the hex part of the object name."""
        return self.name[len(KEY_PREFIX) :]


def key_lock(backend: Backend, keys: MasterKeys, wait: float = 0.0) -> RepositoryLock:
    """Take the lock that every change to ``keys/`` holds."""
    return RepositoryLock(
        backend,
        keys,
        exclusive=False,
        operation=KEY_LOCK_OPERATION,
        wait=wait,
        unique_operation=True,
    )


def require_full_key(repo: Repository, action: str) -> None:
    """Raise `WriteOnlyKeyError` unless the repository was opened with a full key."""
    if repo.keys.write_only:
        raise WriteOnlyKeyError.for_action(action)


def list_keys(repo: Repository) -> list[KeyEntry]:
    """Return every key object, in name order, marking the one that opened ``repo``."""
    entries = []
    for name in list_key_names(repo.backend):
        in_use = name == repo.key_name
        try:
            entries.append(KeyEntry(name, key_info(repo.backend, name), in_use))
        except (IntegrityError, UnsupportedFormatError, NotFoundError) as exc:
            entries.append(KeyEntry(name, None, in_use, problem=str(exc)))
    return entries


def resolve_key(backend: Backend, key_id: str) -> str:
    """Return the name of the one key object whose id starts with ``key_id``."""
    prefix = key_id.lower().removeprefix(KEY_PREFIX)
    if not prefix or any(char not in "0123456789abcdef" for char in prefix):
        raise UsageError(f"invalid key id {key_id!r}: give hex digits as `cas key list` shows")
    matches = [
        name for name in list_key_names(backend) if name[len(KEY_PREFIX) :].startswith(prefix)
    ]
    if not matches:
        raise NotFoundError(f"no key matches {key_id!r}; `cas key list` lists them")
    if len(matches) > 1:
        raise AmbiguousNameError(f"key id {key_id!r} matches {len(matches)} keys; give more digits")
    return matches[0]


def add_key(
    repo: Repository,
    password: bytes,
    *,
    write_only: bool = False,
    user: str | None = None,
    host: str | None = None,
    kdf: KdfParams | None = None,
    wait: float = 0.0,
) -> KeyInfo:
    """Store a new key object for the repository's key set; only a full key may do so.

    With ``write_only``, the new key object contains the key set without the data
    key and the X25519 private key (see `MasterKeys.write_only_copy`).
    """
    require_full_key(repo, "add keys")
    keys = repo.keys.write_only_copy() if write_only else repo.keys
    with key_lock(repo.backend, repo.keys, wait):
        info = write_key(repo.backend, keys, password, kdf, user=user, host=host)
    log.info("added %s key %s", "write-only" if write_only else "full", info.key_hex)
    return info


def remove_key(repo: Repository, key_id: str, wait: float = 0.0) -> KeyInfo:
    """Delete one key object, unless it is the last full key; return what was removed."""
    require_full_key(repo, "remove keys")
    with key_lock(repo.backend, repo.keys, wait):
        name = resolve_key(repo.backend, key_id)
        return _remove_locked(repo.backend, name)


def _remove_locked(backend: Backend, name: str) -> KeyInfo:
    target = key_info(backend, name)
    if not target.write_only and not _other_full_keys(backend, name):
        raise UsageError(
            f"key {target.key_hex[:16]} is the last full key of {backend.url}: removing it "
            f"would leave no key that can read the repository; add another full key first "
            f"with `cas key add`"
        )
    backend.delete(name)
    log.info("removed key %s", target.key_hex)
    return target


def _other_full_keys(backend: Backend, name: str) -> list[str]:
    """Return the names of readable full key objects other than ``name``."""
    # NOTE: the write_only flag is read without a password. A key object whose flag
    # was changed on the storage no longer opens (the flag is in its associated
    # data), but it still counts here as a full key.
    others = []
    for other in list_key_names(backend):
        if other == name:
            continue
        try:
            if not key_info(backend, other).write_only:
                others.append(other)
        except (IntegrityError, UnsupportedFormatError, NotFoundError) as exc:
            log.warning("not counting key object %s as a full key: %s", other, exc)
    return others


def change_password(
    repo: Repository, new_password: bytes, *, kdf: KdfParams | None = None, wait: float = 0.0
) -> KeyInfo:
    """Replace the key in use by a new key object with ``new_password``; return the new one.

    The new key object is stored before the old one is deleted, so an
    interruption leaves the old password working (and maybe the new one too).
    """
    require_full_key(repo, "change passwords")
    if repo.key_name is None:
        raise UsageError("the repository was not opened with a password, so no key is in use")
    with key_lock(repo.backend, repo.keys, wait):
        old = key_info(repo.backend, repo.key_name)
        new = write_key(repo.backend, repo.keys, new_password, kdf, user=old.user, host=old.host)
        repo.backend.delete(old.name)
    repo.key_name = new.name
    log.info("replaced key %s by key %s", old.key_hex, new.key_hex)
    return new


def export_keys(repo: Repository) -> str:
    """Return the master keys as the armored text block of the module docstring."""
    payload = pack_msgpack(
        {"v": EXPORT_VERSION, "repo_id": repo.config.repo_id, "keys": repo.keys.to_dict()}
    )
    encoded = base64.b64encode(payload).decode()
    lines = [
        EXPORT_BEGIN,
        f"Version: {EXPORT_VERSION}",
        f"Repository: {repo.config.repo_id.hex()}",
        f"Write-Only: {'yes' if repo.keys.write_only else 'no'}",
        f"Checksum: sha256:{hashlib.sha256(payload).hexdigest()}",
        "",
        *(encoded[i : i + _BASE64_LINE] for i in range(0, len(encoded), _BASE64_LINE)),
        EXPORT_END,
    ]
    return "\n".join(lines) + "\n"


def parse_export(text: str, source: str) -> tuple[bytes, MasterKeys]:
    """Parse an export of `export_keys`; return (repository id, master keys).

    Raises `UsageError` naming ``source`` when the text is not an export, is
    damaged (checksum mismatch) or contains malformed key material.
    """
    if len(text) > MAX_EXPORT_SIZE:
        raise UsageError(f"invalid key export {source}: {len(text)} bytes, not an export")
    lines = [line.strip() for line in text.splitlines()]
    try:
        begin, end = lines.index(EXPORT_BEGIN), lines.index(EXPORT_END)
    except ValueError:
        raise UsageError(
            f"invalid key export {source}: no {EXPORT_BEGIN} ... {EXPORT_END} block; "
            f"give a file that `cas key export` wrote"
        ) from None
    block = lines[begin + 1 : end]
    if "" not in block:
        raise UsageError(f"invalid key export {source}: no blank line after the headers")
    blank = block.index("")
    headers = dict(line.partition(": ")[::2] for line in block[:blank])
    if headers.get("Version") != str(EXPORT_VERSION):
        raise UsageError(
            f"invalid key export {source}: version {headers.get('Version')!r}; this cas "
            f"reads version {EXPORT_VERSION}"
        )
    try:
        payload = base64.b64decode("".join(block[blank + 1 :]), validate=True)
    except binascii.Error:
        raise UsageError(f"invalid key export {source}: the key block is not base64") from None
    if headers.get("Checksum") != f"sha256:{hashlib.sha256(payload).hexdigest()}":
        raise UsageError(
            f"invalid key export {source}: checksum mismatch, the file is damaged; "
            f"use another copy of the export"
        )
    return _decode_payload(payload, headers.get("Repository", ""), source)


def _decode_payload(payload: bytes, repository_hex: str, source: str) -> tuple[bytes, MasterKeys]:
    try:
        body = unpack_msgpack(payload, f"key export {source}", MAX_EXPORT_SIZE)
        if not isinstance(body, dict) or body.get("v") != EXPORT_VERSION:
            raise IntegrityError("the payload is not a version 1 map")
        repo_id = body.get("repo_id")
        if not isinstance(repo_id, bytes) or len(repo_id) != 32:
            raise IntegrityError("the payload has no repository id")
        keys = MasterKeys.from_dict(body.get("keys"))
        _check_key_pair(keys)
    except IntegrityError as exc:
        raise UsageError(f"invalid key export {source}: {exc}") from None
    if repo_id.hex() != repository_hex:
        raise UsageError(
            f"invalid key export {source}: the Repository header differs from the payload"
        )
    return repo_id, keys


def _check_key_pair(keys: MasterKeys) -> None:
    """Raise `IntegrityError` if the X25519 private key does not match the public key."""
    if keys.x25519_private is None:
        return
    public = X25519PrivateKey.from_private_bytes(keys.x25519_private).public_key()
    if public.public_bytes(Encoding.Raw, PublicFormat.Raw) != keys.x25519_public:
        raise IntegrityError("the X25519 private key does not match the public key")


def import_keys(
    backend: Backend,
    text: str,
    source: str,
    new_password: bytes,
    *,
    user: str | None = None,
    host: str | None = None,
    kdf: KdfParams | None = None,
    wait: float = 0.0,
) -> KeyInfo:
    """Store a new key object with ``new_password`` for exported key material.

    No existing password is needed. The material must open the repository's
    config and name the same repository id, or `UsageError` is raised and
    nothing is written.
    """
    repo_id, keys = parse_export(text, source)
    try:
        config = RepoConfig.from_body(read_object(backend, keys, ObjectKind.CONFIG, CONFIG_NAME))
    except NotFoundError:
        raise NotFoundError(f"no repository at {backend.url}: check the -r/--repo value") from None
    except IntegrityError:
        raise UsageError(
            f"key export {source} does not belong to the repository at {backend.url}: its "
            f"index key cannot open the config"
        ) from None
    if config.repo_id != repo_id:
        raise UsageError(
            f"key export {source} is of repository {repo_id.hex()[:16]}, but {backend.url} "
            f"is repository {config.repo_id.hex()[:16]}"
        )
    with key_lock(backend, keys, wait):
        info = write_key(backend, keys, new_password, kdf, user=user, host=host)
    log.info("imported key material of repository %s as key %s", repo_id.hex(), info.key_hex)
    return info
