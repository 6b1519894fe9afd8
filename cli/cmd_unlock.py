"""`cas unlock`: remove stale locks, or with --remove-all every lock; and the --wait option."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from cas.errors import LockedError, NotFoundError, UsageError
from cas.locks import LockInfo, read_locks, remove_stale_locks
from cas.prune import parse_duration

from .context import info, open_repository, print_json

log = logging.getLogger(__name__)
T = TypeVar("T")


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "unlock", parents=[parent], help="remove stale locks (or every lock with --remove-all)"
    )
    parser.add_argument(
        "--remove-all",
        action="store_true",
        help="remove every lock, also those of running operations; only when none runs",
    )
    parser.set_defaults(run=run)


def add_wait_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--wait DURATION`` to a command that takes a lock."""
    parser.add_argument(
        "--wait",
        type=wait_seconds,
        default=0.0,
        metavar="DURATION",
        help="wait up to DURATION (such as 30s, 10m, 1h) for a conflicting lock to go, "
        "instead of failing at once with exit code 5",
    )


def wait_seconds(text: str) -> float:
    """Parse a --wait value into seconds, for argparse."""
    try:
        return parse_duration(text).total_seconds()
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def retry_while_locked(operation: Callable[[], T], wait: float) -> T:
    """Run ``operation``, again after a pause while it raises `LockedError`, for ``wait`` s.

    For operations that take their lock before writing anything, so that an
    attempt that failed on the lock can simply be repeated.
    """
    deadline = time.monotonic() + wait
    delay = 0.5
    while True:
        try:
            return operation()
        except LockedError as exc:
            if time.monotonic() + delay > deadline:
                raise
            log.info("waiting for the lock: %s", exc)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


def _describe(lock: LockInfo) -> dict[str, object]:
    return {
        "name": lock.name,
        "exclusive": lock.exclusive,
        "operation": lock.operation,
        "host": lock.host,
        "pid": lock.pid,
        "user": lock.user,
        "started": lock.started,
        "refreshed": datetime.fromtimestamp(lock.refreshed, UTC).astimezone().isoformat(),
    }


def _alive_here(lock: LockInfo) -> bool:
    return lock.host == socket.gethostname() and not lock.is_stale()


def run(args: argparse.Namespace) -> int:
    """Remove locks and report which."""
    with open_repository(args) as repo:
        if args.remove_all:
            # A lock of a live process on this host is never removed: that
            # operation would go on without protection and could commit data
            # that a gc deletes. End the process first.
            live = [lock for lock in read_locks(repo.backend, repo.keys) if _alive_here(lock)]
            removed = [lock for lock in read_locks(repo.backend, repo.keys) if lock not in live]
            for lock in live:
                print(
                    f"warning: keeping the {lock.describe()}: that process is still running "
                    f"on this host; end it first",
                    file=sys.stderr,
                )
            if removed:
                print(
                    f"warning: removing all {len(removed)} locks; an operation still running "
                    f"loses its protection against gc and prune",
                    file=sys.stderr,
                )
            for lock in removed:
                with contextlib.suppress(NotFoundError):
                    repo.backend.delete(lock.name)
        else:
            removed = remove_stale_locks(repo.backend, repo.keys)
        remaining = read_locks(repo.backend, repo.keys)
    if args.json:
        print_json(
            {
                "removed": [_describe(lock) for lock in removed],
                "remaining": [_describe(lock) for lock in remaining],
            }
        )
    for lock in removed:
        info(args, f"removed {lock.describe()}")
    for lock in remaining:
        info(args, f"kept {lock.describe()}")
    if not removed:
        info(args, "no lock removed")
    return 0
