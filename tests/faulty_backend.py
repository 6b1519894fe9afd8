"""A backend wrapper that fails or slows down writes, for crash and concurrency tests.

`FaultyBackend` counts every ``put`` and ``delete`` outside ``locks/`` and raises
`BackendError` from the ``fail_at``-th such call on, for every later one too, as
if the process had died there: nothing it tries afterwards reaches the storage.
Lock objects are exempt, so that the lock of the failed run is released as it
would be by a dead process's stale lock being removed.

Run as a script, it runs the `cas` command line with every repository it opens
wrapped in a slow `FaultyBackend`:

    python tests/faulty_backend.py --put-delay 0.3 --delete-delay 0.5 -- gc --json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator

from cas_cli.main import main as cas_main

import cas.repository
from cas.backend import Backend, ObjectInfo
from cas.errors import BackendError

LOCK_PREFIX = "locks/"


class FaultyBackend(Backend):
    """Wraps a backend; fails from the ``fail_at``-th write on and delays writes and reads."""

    def __init__(
        self,
        inner: Backend,
        fail_at: int | None = None,
        put_delay: float = 0.0,
        delete_delay: float = 0.0,
        get_delay: float = 0.0,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.fail_at = fail_at
        self.put_delay = put_delay
        self.delete_delay = delete_delay
        self.get_delay = get_delay
        self.writes = 0
        self.log: list[str] = []

    def _step(self, operation: str, name: str, delay: float) -> None:
        if name.startswith(LOCK_PREFIX):
            return
        self.writes += 1
        self.log.append(f"{operation} {name}")
        if self.fail_at is not None and self.writes >= self.fail_at:
            raise BackendError(f"injected failure at write {self.writes}: {operation} {name}")
        time.sleep(delay)

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False
    ) -> None:
        self._step("put", name, self.put_delay)
        self.inner.put(name, data, overwrite=overwrite)

    def delete(self, name: str) -> None:
        self._step("delete", name, self.delete_delay)
        self.inner.delete(name)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        if name.startswith("data/"):
            time.sleep(self.get_delay)
        return self.inner.get(name, offset, length)

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        if name.startswith("data/"):
            time.sleep(self.get_delay)
        self.inner.read_into(name, offset, view)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def close(self) -> None:
        self.inner.close()

    def location_exists(self) -> bool:
        return self.inner.location_exists()

    def create_location(self) -> None:
        self.inner.create_location()


def main(argv: list[str]) -> int:
    """Run the `cas` command line with slowed repositories; arguments after ``--`` go to it."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--put-delay", type=float, default=0.0)
    parser.add_argument("--delete-delay", type=float, default=0.0)
    parser.add_argument("--get-delay", type=float, default=0.0)
    parser.add_argument("cas_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cas_args = args.cas_args[1:] if args.cas_args[:1] == ["--"] else args.cas_args

    plain_open = cas.repository.open_backend

    def open_slow(url: str) -> Backend:
        return FaultyBackend(
            plain_open(url),
            put_delay=args.put_delay,
            delete_delay=args.delete_delay,
            get_delay=args.get_delay,
        )

    cas.repository.open_backend = open_slow
    return cas_main(cas_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
