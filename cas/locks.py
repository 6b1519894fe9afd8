"""Repository locks: shared for writers, exclusive for gc and prune.

A lock is a sealed object ``locks/<hex>`` (see `cas.objects`) with body
``{"v": 1, "exclusive": bool, "host", "pid", "user", "operation",
"started": ISO time, "refreshed": epoch seconds}``. A holder rewrites its
lock every `REFRESH_INTERVAL` seconds from a background thread.

A lock is stale, and removed with a warning, when its refresh is older than
`STALE_AFTER`, or when it names this host and its process no longer exists.
Acquiring writes the lock first and then lists the others, so two processes
that start at once both see each other and at least one backs off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

from cas.backend import Backend
from cas.crypto import MasterKeys
from cas.errors import CasError, IntegrityError, LockedError, NotFoundError
from cas.keys import local_user
from cas.objects import ObjectKind, encode_object, read_object

log = logging.getLogger(__name__)

LOCK_PREFIX = "locks/"
REFRESH_INTERVAL = 60.0
# A holder refreshes every minute; ten missed refreshes mean it is gone.
STALE_AFTER = 600.0


@dataclass(frozen=True)
class LockInfo:
    """One lock object's fields."""

    name: str
    exclusive: bool
    host: str
    pid: int
    user: str
    operation: str
    started: str
    refreshed: float

    def describe(self) -> str:
        """Return who holds the lock, for error messages."""
        kind = "exclusive" if self.exclusive else "shared"
        age = max(0.0, time.time() - self.refreshed)
        return (
            f"{kind} lock by {self.operation} (pid {self.pid} on {self.host}, user {self.user}, "
            f"started {self.started}, refreshed {age:.0f} s ago)"
        )

    def is_stale(self, now: float | None = None) -> bool:
        """Return whether the holder is gone: refresh too old, or dead process on this host."""
        now = time.time() if now is None else now
        if now - self.refreshed > STALE_AFTER:
            return True
        return self.host == socket.gethostname() and not _process_exists(self.pid)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_locks(backend: Backend, keys: MasterKeys) -> list[LockInfo]:
    """Return every readable lock; an unreadable lock object is logged and skipped."""
    locks = []
    for info in backend.list(LOCK_PREFIX):
        try:
            body = read_object(backend, keys, ObjectKind.LOCK, info.name)
            locks.append(_lock_from_body(info.name, body))
        except NotFoundError:
            continue
        except IntegrityError as exc:
            log.warning("ignoring unreadable lock %s: %s", info.name, exc)
    return locks


def _lock_from_body(name: str, body: Any) -> LockInfo:
    if not isinstance(body, dict) or body.get("v") != 1:
        raise IntegrityError(f"lock {name} is malformed or of an unknown version")
    pid, refreshed = body.get("pid", 0), body.get("refreshed", 0.0)
    if not isinstance(pid, int) or not isinstance(refreshed, (int, float)):
        raise IntegrityError(f"lock {name} has a malformed pid or refresh time")
    return LockInfo(
        name=name,
        exclusive=bool(body.get("exclusive")),
        host=str(body.get("host", "")),
        pid=pid,
        user=str(body.get("user", "")),
        operation=str(body.get("operation", "")),
        started=str(body.get("started", "")),
        refreshed=float(refreshed),
    )


def remove_stale_locks(backend: Backend, keys: MasterKeys) -> list[LockInfo]:
    """Delete every stale lock; return those removed."""
    removed = []
    for lock in read_locks(backend, keys):
        if lock.is_stale():
            log.warning("removing stale %s", lock.describe())
            with contextlib.suppress(NotFoundError):
                backend.delete(lock.name)
            removed.append(lock)
    return removed


class RepositoryLock:
    """A held lock, refreshed in the background until `release`; use as a context manager."""

    def __init__(
        self,
        backend: Backend,
        keys: MasterKeys,
        *,
        exclusive: bool,
        operation: str,
        wait: float = 0.0,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.exclusive = exclusive
        self.operation = operation
        self.name = LOCK_PREFIX + os.urandom(16).hex()
        self._started = datetime.now().astimezone().isoformat()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._acquire(wait)

    def _write(self) -> None:
        body = {
            "v": 1,
            "exclusive": self.exclusive,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "user": local_user(),
            "operation": self.operation,
            "started": self._started,
            "refreshed": time.time(),
        }
        data = encode_object(self.keys, ObjectKind.LOCK, self.name, body)
        self.backend.put(self.name, data, overwrite=True)

    def _conflicts(self) -> list[LockInfo]:
        conflicts = []
        for lock in read_locks(self.backend, self.keys):
            if lock.name == self.name or not (self.exclusive or lock.exclusive):
                continue
            if lock.is_stale():
                log.warning("removing stale %s", lock.describe())
                with contextlib.suppress(NotFoundError):
                    self.backend.delete(lock.name)
                continue
            conflicts.append(lock)
        return conflicts

    def _acquire(self, wait: float) -> None:
        deadline = time.monotonic() + wait
        delay = 0.5
        while True:
            self._write()
            conflicts = self._conflicts()
            if not conflicts:
                break
            self._delete_own()
            if time.monotonic() + delay > deadline:
                holders = "; ".join(lock.describe() for lock in conflicts)
                raise LockedError(
                    f"repository {self.backend.url} is locked: {holders}. Try again when that "
                    f"operation ends; a lock whose process is gone is removed automatically "
                    f"after {STALE_AFTER:.0f} s without refresh"
                )
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
        self._thread = threading.Thread(target=self._refresh_loop, name="cas-lock", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_INTERVAL):
            try:
                self._write()
            except CasError as exc:
                log.warning("failed to refresh lock %s: %s", self.name, exc)

    def _delete_own(self) -> None:
        with contextlib.suppress(NotFoundError):
            self.backend.delete(self.name)

    def release(self) -> None:
        """Stop refreshing and delete the lock object."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._delete_own()

    def __enter__(self) -> RepositoryLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
