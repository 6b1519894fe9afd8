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
import random
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
        # NOTE: `refreshed` is the holder's clock and `now` the reader's, so this rule
        # assumes the two clocks differ by much less than STALE_AFTER. A holder whose
        # clock is behind by more than that looks stale while alive. `RepositoryLock`
        # also tracks how long a lock's refresh time stays unchanged on its own
        # monotonic clock, which needs no clock agreement but only works while waiting.
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
        unique_operation: bool = False,
    ) -> None:
        self.backend = backend
        self.keys = keys
        self.exclusive = exclusive
        self.operation = operation
        # With unique_operation, a lock of the same operation conflicts even when
        # both are shared, so that two gc runs never overlap.
        self.unique_operation = unique_operation
        self.name = LOCK_PREFIX + os.urandom(16).hex()
        self._started = datetime.now().astimezone().isoformat()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost = False
        self._write_lock = threading.Lock()
        # Lock name -> (refresh time read, monotonic time it was first read).
        self._observed: dict[str, tuple[float, float]] = {}
        self._acquire(wait)

    def _write(self) -> None:
        with self._write_lock:
            self._write_body()

    def _write_body(self) -> None:
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
            if lock.name == self.name:
                continue
            same_operation = self.unique_operation and lock.operation == self.operation
            if not (self.exclusive or lock.exclusive or same_operation):
                continue
            if lock.is_stale() or self._unchanged_too_long(lock):
                log.warning("removing stale %s", lock.describe())
                with contextlib.suppress(NotFoundError):
                    self.backend.delete(lock.name)
                continue
            conflicts.append(lock)
        return conflicts

    def _unchanged_too_long(self, lock: LockInfo) -> bool:
        """Return whether this process has seen the same refresh time for over STALE_AFTER."""
        now = time.monotonic()
        seen = self._observed.get(lock.name)
        if seen is None or seen[0] != lock.refreshed:
            self._observed[lock.name] = (lock.refreshed, now)
            return False
        return now - seen[1] > STALE_AFTER

    def _locked_error(self, conflicts: list[LockInfo]) -> LockedError:
        holders = "; ".join(lock.describe() for lock in conflicts)
        return LockedError(
            f"repository {self.backend.url} is locked: {holders}. Pass --wait DURATION to "
            f"wait for that operation to end. If its process is gone, `cas unlock` removes "
            f"the lock, and any lock is treated as stale after {STALE_AFTER:.0f} s without "
            f"a refresh"
        )

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
                raise self._locked_error(conflicts)
            # Jitter keeps two waiting processes from retrying in lockstep.
            time.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(delay * 2, 10.0)
        self._thread = threading.Thread(target=self._refresh_loop, name="cas-lock", daemon=True)
        self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_INTERVAL):
            try:
                # A lock that another process removed (as stale, or with cas unlock)
                # must not be written again: this operation may no longer commit.
                if not self.backend.exists(self.name):
                    self._lost = True
                    log.error("lock %s was removed by another process", self.name)
                    return
                self._write()
            except CasError as exc:
                log.warning("failed to refresh lock %s: %s", self.name, exc)

    def upgrade(self, wait: float = 0.0) -> None:
        """Turn this held shared lock into an exclusive one, without releasing it first.

        Waits up to ``wait`` seconds for the other locks to go. Between attempts
        the lock is shared again, so running writers can finish; on timeout it
        stays shared and `LockedError` is raised.
        """
        deadline = time.monotonic() + wait
        delay = 0.5
        while True:
            self.exclusive = True
            self._write()
            conflicts = self._conflicts()
            if not conflicts:
                return
            self.exclusive = False
            self._write()
            if time.monotonic() + delay > deadline:
                raise self._locked_error(conflicts)
            time.sleep(delay * random.uniform(0.75, 1.0))
            delay = min(delay * 2, 10.0)

    def check_held(self) -> None:
        """Raise `LockedError` if another process removed this lock.

        Call it before publishing or deleting anything: once the lock is gone, a
        gc may have deleted packs this operation relies on.

        NOTE: a process paused between this check and its next write is not
        covered; the window is one backend request long.
        """
        if self._lost or not self.backend.exists(self.name):
            self._lost = True
            raise LockedError(
                f"lock {self.name} of this {self.operation} was removed by another process "
                f"(taken for stale, or removed with cas unlock); stopping before anything "
                f"more is published or deleted. Run the {self.operation} again"
            )

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
        if exc is None:
            self.release()
            return
        # The operation already failed: report its error, not a failed release
        # (the storage that made it fail often fails the release too).
        try:
            self.release()
        except CasError as release_error:
            log.warning("failed to release lock %s: %s", self.name, release_error)
