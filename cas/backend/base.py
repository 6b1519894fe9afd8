"""The backend interface: named immutable objects on some storage.

A backend does not depend on encryption or formats. It stores byte strings
under names such as ``data/3f/3f9a...`` and returns them, whole or by byte
range. Every repository operation goes through this interface, so the local
folder backend, the S3 backend and the fault-injecting test wrappers are
interchangeable.
"""

from __future__ import annotations

import mmap
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

from cas.errors import IntegrityError, NotFoundError, UsageError

# Object names: lowercase ASCII words and hex, separated by "/". The rules keep
# names portable to every file system and object store, and keep a crafted name
# from escaping the repository folder of the local backend.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}(/[a-z0-9][a-z0-9._-]{0,127}){0,3}$")


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid object name, else raise `UsageError`.

    A valid name has one to four parts separated by "/", each part starting
    with a lowercase letter or digit (so no part is "." or ".." and no name is
    absolute), and only lowercase letters, digits, ".", "_" and "-" after that.
    """
    if not _NAME_RE.match(name):
        raise UsageError(f"invalid object name {name!r}")
    return name


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its name and its size in bytes."""

    name: str
    size: int


class Backend(ABC):
    """Named immutable objects: put, get with a byte range, list, delete.

    Contract for every implementation:

    - ``put`` publishes an object atomically: a reader sees the whole object or
      nothing. Without ``overwrite`` it raises `AlreadyExistsError` when the
      name exists, so no writer replaces another's object.
    - ``get`` returns exactly the requested bytes or raises; a short read is a
      `BackendError`, a missing object `NotFoundError`.
    - Methods are safe to call from several threads at once.
    """

    url: str

    @abstractmethod
    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False
    ) -> None:
        """Store ``data`` under ``name`` atomically and durably."""

    @abstractmethod
    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes of the object from ``offset`` (all when None)."""

    def get_bounded(self, name: str, limit: int) -> bytes:
        """Return a whole object, raising `IntegrityError` before reading it if over ``limit``."""
        size = self.size(name)
        if size > limit:
            raise IntegrityError(f"object {name} is {size} bytes, over the limit of {limit}")
        return self.get(name, 0, size)

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the object's bytes from ``offset``; a short read raises."""
        view[:] = self.get(name, offset, len(view))

    def read_span(self, name: str, offset: int, length: int, buffer: mmap.mmap) -> memoryview:
        """Read ``length`` bytes from ``offset`` into ``buffer``; return a view of them.

        ``buffer`` is page-aligned and at least ``length + 8192`` bytes, so a
        backend may read a larger aligned range (the local backend does, to
        use O_DIRECT) and return the requested part of it.
        """
        view = memoryview(buffer)[:length]
        self.read_into(name, offset, view)
        return view

    @abstractmethod
    def size(self, name: str) -> int:
        """Return the size of an object in bytes."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield the objects whose names start with ``prefix``, in no fixed order."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Delete an object; deleting a missing object raises `NotFoundError`."""

    def exists(self, name: str) -> bool:
        """Return whether an object exists."""
        try:
            self.size(name)
        except NotFoundError:
            return False
        return True

    def close(self) -> None:
        """Release connections and threads; the default has nothing to release."""

    def location_exists(self) -> bool:
        """Return whether the folder or bucket that contains the repository exists."""
        return True

    def create_location(self) -> None:
        """Create the folder or bucket for a new repository."""
