"""Key objects: the master keys wrapped by a key derived from a password.

A key object ``keys/<key_hex>`` is a msgpack map, parsed only after its size
is bounded:

    v            1
    kdf          "argon2id"
    salt         16 random bytes
    iterations, lanes, memory_kib   Argon2id parameters
    sealed       nonce || AES-256-GCM(KEK, msgpack master keys) || tag, where
                 KEK = Argon2id(password) and the associated data is
                 b"cas key v1 " + the object's name + msgpack of
                 [salt, iterations, lanes, memory_kib, created, host, user,
                 write_only], so every public field is authenticated too
    created      ISO 8601 time with UTC offset
    host, user   who created it
    write_only   whether the wrapped keys lack the data key

One key object exists per password, so a password change rewrites one small
object and no data.
"""

from __future__ import annotations

import getpass
import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cas.backend import Backend
from cas.crypto import KdfParams, MasterKeys, open_sealed, pack_msgpack, seal, unpack_msgpack
from cas.errors import IntegrityError, NotFoundError, UnsupportedFormatError, WrongPasswordError

log = logging.getLogger(__name__)

KEY_PREFIX = "keys/"
MAX_KEY_OBJECT_SIZE = 64 << 10
_AD_PREFIX = b"cas key v1 "


@dataclass(frozen=True)
class KeyInfo:
    """A key object's public fields, readable without its password."""

    name: str
    created: str
    host: str
    user: str
    write_only: bool

    @property
    def key_hex(self) -> str:
        """The key id: the hex part of the object name."""
        return self.name[len(KEY_PREFIX) :]


def local_user() -> str:
    """Return the login name of the current user, or the uid when there is none."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def write_key(
    backend: Backend,
    keys: MasterKeys,
    password: bytes,
    kdf: KdfParams | None = None,
    *,
    user: str | None = None,
    host: str | None = None,
) -> KeyInfo:
    """Wrap ``keys`` with ``password`` into a new key object and store it.

    ``user`` and ``host`` label the key object; they default to this process's
    login name and host name.
    """
    params = kdf or KdfParams(salt=os.urandom(16))
    key_hex = os.urandom(32).hex()
    name = KEY_PREFIX + key_hex
    info = KeyInfo(
        name=name,
        created=datetime.now().astimezone().isoformat(),
        host=socket.gethostname() if host is None else host,
        user=local_user() if user is None else user,
        write_only=keys.write_only,
    )
    public = _public_fields(params, info.created, info.host, info.user, info.write_only)
    body = {
        "v": 1,
        "kdf": "argon2id",
        "salt": params.salt,
        "iterations": params.iterations,
        "lanes": params.lanes,
        "memory_kib": params.memory_kib,
        "sealed": seal(
            params.derive(password), pack_msgpack(keys.to_dict()), _associated_data(name, public)
        ),
        "created": info.created,
        "host": info.host,
        "user": info.user,
        "write_only": info.write_only,
    }
    backend.put(name, pack_msgpack(body))
    return info


def _public_fields(
    params: KdfParams, created: object, host: object, user: object, write_only: object
) -> list[object]:
    return [
        params.salt,
        params.iterations,
        params.lanes,
        params.memory_kib,
        created,
        host,
        user,
        write_only,
    ]


def _associated_data(name: str, public: list[object]) -> bytes:
    return _AD_PREFIX + name.encode() + pack_msgpack(public)


def _read_key_object(backend: Backend, name: str) -> dict[str, Any]:
    data = backend.get_bounded(name, MAX_KEY_OBJECT_SIZE)
    body = unpack_msgpack(data, f"key object {name}", MAX_KEY_OBJECT_SIZE)
    if not isinstance(body, dict):
        raise IntegrityError(f"key object {name} is not a map")
    if body.get("v") != 1 or body.get("kdf") != "argon2id":
        raise UnsupportedFormatError(f"key object {name} has an unknown version or KDF")
    return body


def _kdf_of(body: dict[str, Any], name: str) -> KdfParams:
    salt, iterations = body.get("salt"), body.get("iterations")
    lanes, memory = body.get("lanes"), body.get("memory_kib")
    if not isinstance(salt, bytes) or not 8 <= len(salt) <= 64:
        raise IntegrityError(f"key object {name} has a malformed salt")
    # Bounds keep a forged key object from making the KDF run for minutes or
    # allocate more than 1 GiB; Argon2id itself needs memory >= 8 KiB per lane.
    for value, low, high in ((iterations, 1, 16), (lanes, 1, 16), (memory, 8, 1 << 20)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise IntegrityError(f"key object {name} has out-of-range KDF parameters")
    assert isinstance(iterations, int)
    assert isinstance(lanes, int)
    assert isinstance(memory, int)
    if memory < 8 * lanes:
        raise IntegrityError(f"key object {name} has less KDF memory than its lanes need")
    return KdfParams(salt=salt, iterations=iterations, lanes=lanes, memory_kib=memory)


def key_info(backend: Backend, name: str) -> KeyInfo:
    """Return the public fields of one key object."""
    body = _read_key_object(backend, name)
    return KeyInfo(
        name=name,
        created=str(body.get("created", "")),
        host=str(body.get("host", "")),
        user=str(body.get("user", "")),
        write_only=bool(body.get("write_only", False)),
    )


def list_key_names(backend: Backend) -> list[str]:
    """Return the names of every key object."""
    return sorted(info.name for info in backend.list(KEY_PREFIX))


def unlock(backend: Backend, password: bytes) -> tuple[MasterKeys, str]:
    """Try every key object with ``password``; return the keys and the key object's name."""
    names = list_key_names(backend)
    if not names:
        raise NotFoundError(f"repository {backend.url} has no key objects")
    # Derive once per distinct KDF setting: key objects made by one `cas` share them.
    derived: dict[KdfParams, bytes] = {}
    damaged: list[str] = []
    for name in names:
        # A damaged or foreign key object must not lock out the holders of the others.
        try:
            body = _read_key_object(backend, name)
            params = _kdf_of(body, name)
            sealed = body.get("sealed")
            if not isinstance(sealed, bytes):
                raise IntegrityError(f"key object {name} has no sealed key material")
        except (IntegrityError, UnsupportedFormatError, NotFoundError) as exc:
            log.warning("skipping key object %s: %s", name, exc)
            damaged.append(name)
            continue
        if params not in derived:
            derived[params] = params.derive(password)
        public = _public_fields(
            params, body.get("created"), body.get("host"), body.get("user"), body.get("write_only")
        )
        try:
            plain = open_sealed(derived[params], sealed, _associated_data(name, public), name)
        except IntegrityError:
            continue
        material = unpack_msgpack(plain, f"key material of {name}", MAX_KEY_OBJECT_SIZE)
        return MasterKeys.from_dict(material), name
    if len(damaged) == len(names):
        raise IntegrityError(
            f"every key object of {backend.url} is damaged or unreadable "
            f"({', '.join(damaged)}); restore the keys/ folder from a copy of the repository"
        )
    raise WrongPasswordError(
        f"wrong password: none of the {len(names) - len(damaged)} readable keys of "
        f"{backend.url} opens with it"
    )
