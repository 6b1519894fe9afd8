"""The local folder backend, also used for NFS mounts.

Objects are files below the repository folder; a name's "/" separators are
sub-folders. Each put writes a temporary file in the target folder, fsyncs
it, then publishes it with ``link`` (which fails if the name exists, so a
writer never replaces another's object) or ``rename`` (for overwrites), and
fsyncs the folder so the new name survives a power loss.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import secrets
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from cas.backend.base import Backend, ObjectInfo, validate_name
from cas.errors import AlreadyExistsError, BackendError, NoSpaceError, NotFoundError

_TMP_PREFIX = ".tmp-"
_DIRECT_ALIGNMENT = 4096
# Below this size the page cache costs little and O_DIRECT gains nothing.
_DIRECT_MIN_SIZE = 1 << 20


class LocalBackend(Backend):
    """Objects as files below a folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)
        self._made_dirs: set[str] = set()
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.root / validate_name(name)

    def location_exists(self) -> bool:
        """Return whether the repository folder exists."""
        return self.root.is_dir()

    def create_location(self) -> None:
        """Create the repository folder and its parents."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _translate(exc, str(self.root)) from exc

    def _ensure_dir(self, folder: Path) -> None:
        key = str(folder)
        with self._lock:
            if key in self._made_dirs:
                return
        if not folder.is_dir():
            # Create one level at a time and fsync each parent, so every new
            # folder entry down from the repository root survives a power loss.
            missing = []
            probe = folder
            while not probe.is_dir():
                missing.append(probe)
                probe = probe.parent
            for created in reversed(missing):
                created.mkdir(exist_ok=True)
                _fsync_dir(created.parent)
        with self._lock:
            self._made_dirs.add(key)

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False
    ) -> None:
        """Write ``data`` to a temporary file, fsync it, and publish it under ``name``."""
        path = self._path(name)
        tmp = path.parent / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
        try:
            self._ensure_dir(path.parent)
            _write_file(tmp, memoryview(data).cast("B"))
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)
                finally:
                    os.unlink(tmp)
            _fsync_dir(path.parent)
        except FileExistsError as exc:
            raise AlreadyExistsError(f"object {name} already exists in {self.url}") from exc
        except OSError as exc:
            _unlink_quietly(tmp)
            raise _translate(exc, name) from exc

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Read an object or a byte range of it; a short read raises `BackendError`."""
        path = self._path(name)
        try:
            with open(path, "rb") as file:
                if offset:
                    file.seek(offset)
                data = file.read() if length is None else file.read(length)
        except OSError as exc:
            raise _translate(exc, name) from exc
        if length is not None and len(data) != length:
            raise BackendError(
                f"short read of {name}: wanted {length} bytes at offset {offset}, got {len(data)}"
            )
        return data

    def read_into(self, name: str, offset: int, view: memoryview) -> None:
        """Read into ``view`` with positioned reads, avoiding a new buffer per call."""
        try:
            fd = os.open(self._path(name), os.O_RDONLY)
        except OSError as exc:
            raise _translate(exc, name) from exc
        try:
            done = 0
            while done < len(view):
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    raise BackendError(
                        f"short read of {name}: wanted {len(view)} bytes at offset {offset}, "
                        f"got {done}"
                    )
                done += count
        except OSError as exc:
            raise _translate(exc, name) from exc
        finally:
            os.close(fd)

    def read_span(self, name: str, offset: int, length: int, buffer: mmap.mmap) -> memoryview:
        """Read a byte range with O_DIRECT into an aligned buffer where the file system allows.

        Packs are written with O_DIRECT and so are not in the page cache; a
        buffered read would allocate a page-cache page for every byte (about
        0.6 s of kernel CPU per GiB on the machines measured, against 0.05 s
        for a direct read). The aligned range read may start up to 4095 bytes
        before ``offset``; the returned view covers exactly the requested bytes.
        """
        start = offset - offset % _DIRECT_ALIGNMENT
        end = -(-(offset + length) // _DIRECT_ALIGNMENT) * _DIRECT_ALIGNMENT
        view = memoryview(buffer)
        if not hasattr(os, "O_DIRECT") or end - start > len(view) or length < _DIRECT_MIN_SIZE:
            return super().read_span(name, offset, length, buffer)
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return super().read_span(name, offset, length, buffer)
            raise _translate(exc, name) from exc
        try:
            done = 0
            while start + done < offset + length:
                count = os.preadv(fd, [view[done : end - start]], start + done)
                if count == 0:
                    raise BackendError(
                        f"short read of {name}: wanted {length} bytes at offset {offset}, "
                        f"the object ends at {start + done}"
                    )
                done += count
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return super().read_span(name, offset, length, buffer)
            raise _translate(exc, name) from exc
        finally:
            os.close(fd)
        return view[offset - start : offset - start + length]

    def size(self, name: str) -> int:
        """Return the object's size in bytes; a folder of that name is not an object."""
        try:
            st = self._path(name).stat()
        except OSError as exc:
            raise _translate(exc, name) from exc
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"object {name} not found")
        return st.st_size

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield objects below the folder part of ``prefix`` whose names start with it."""
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = os.path.relpath(dirpath, self.root)
            for filename in sorted(filenames):
                if filename.startswith(_TMP_PREFIX):
                    continue
                name = filename if rel == "." else f"{rel}/{filename}"
                if not name.startswith(prefix):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, filename)).st_size
                except FileNotFoundError:
                    continue
                yield ObjectInfo(name, size)

    def delete(self, name: str) -> None:
        """Remove an object's file and fsync its folder."""
        path = self._path(name)
        try:
            path.unlink()
            _fsync_dir(path.parent)
        except OSError as exc:
            raise _translate(exc, name) from exc

    def remove_temporary_files(self) -> int:
        """Delete leftover temporary files of interrupted puts; return how many."""
        count = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for filename in filenames:
                if filename.startswith(_TMP_PREFIX):
                    _unlink_quietly(Path(dirpath) / filename)
                    count += 1
        return count


def _write_file(path: Path, view: memoryview) -> None:
    """Create ``path`` with the bytes of ``view`` and fsync it.

    Page-aligned buffers whose length is a multiple of 4096 (packs are built
    that way) are written with O_DIRECT: on the virtual machines measured,
    buffered writes of fresh pages cost about 2.5 s of kernel CPU per GiB and
    direct writes about 0.03 s. File systems that reject O_DIRECT (tmpfs,
    some network file systems) get an ordinary buffered write.
    """
    if _direct_io_possible(view):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            try:
                _write_all(fd, view)
                os.fsync(fd)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            finally:
                os.close(fd)
            os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, view)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _direct_io_possible(view: memoryview) -> bool:
    if not hasattr(os, "O_DIRECT") or view.readonly or len(view) % _DIRECT_ALIGNMENT:
        return False
    if len(view) < _DIRECT_MIN_SIZE:
        return False
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return address % _DIRECT_ALIGNMENT == 0


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _translate(exc: OSError, name: str) -> Exception:
    if exc.errno == errno.ENOENT:
        return NotFoundError(f"object {name} not found")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpaceError(f"no space left on the device while writing {name}: {exc.strerror}")
    return BackendError(f"failed to access {name}: {exc}")
