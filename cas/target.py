"""File-system work on a checkout target: safe opens, replacing entries, metadata, digests.

Every function here works relative to a folder descriptor and never follows
a symlink. Folders are opened step by step with ``O_NOFOLLOW`` and entries
are examined with ``lstat``. Removal goes through `shutil.rmtree` with a
``dir_fd``, which on Linux walks by descriptor and unlinks a symlink rather
than entering it (``shutil.rmtree.avoids_symlink_attacks``). So neither a
crafted tree nor a symlink that already exists in the target can make a
checkout touch anything outside it.

A rollback (a checkout into a folder that is not empty) keeps an existing
file only when it is trusted. A trusted file is a regular file whose size
and mtime in nanoseconds equal the node's. Its BLAKE3 digest, read from the
disk during the checkout, must also equal the node's digest. When the size
or mtime differs, the file is rewritten without being read, because a
checkpoint rewritten in place usually keeps its size and always gets a new
mtime.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import stat
import threading

import blake3

from cas.tree import Node

log = logging.getLogger(__name__)

# Temporary names of rewritten files start with this prefix and have a fixed
# length, so a long entry name never makes the temporary name too long.
TEMP_PREFIX = b".cas-tmp-"
_FORMATS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "chardev": stat.S_IFCHR,
    "blockdev": stat.S_IFBLK,
    "socket": stat.S_IFSOCK,
}


class SafeTree:
    """Opens paths below the target folder without following any symlink."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        """Close the descriptor of the target folder."""
        os.close(self.root_fd)

    def open_dir(self, rel: tuple[bytes, ...]) -> int:
        """Open a folder below the root, refusing symlinks at every step."""
        fd = os.dup(self.root_fd)
        for part in rel:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            finally:
                os.close(fd)
            fd = child
        return fd

    def display(self, rel: tuple[bytes, ...]) -> str:
        """Return the path of an entry below the root, for messages."""
        return os.path.join(self.root, *(os.fsdecode(part) for part in rel))


def lstat_entry(name: bytes, dir_fd: int) -> os.stat_result | None:
    """Return an entry's own status (a symlink is not followed), or None when it is absent."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_entry(name: bytes, dir_fd: int) -> None:
    """Remove a file, symlink, special file or whole folder; never follows a symlink."""
    st = lstat_entry(name, dir_fd)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


def clear_way(name: bytes, dir_fd: int, node: Node) -> tuple[os.stat_result | None, bool]:
    """Return (status of an existing entry of the node's type, whether any entry was there).

    An entry of another type is removed, so that the caller can create the
    node's entry. A folder where a file goes is removed with all its content,
    and a symlink or file where a folder goes is unlinked.
    """
    st = lstat_entry(name, dir_fd)
    if st is None or stat.S_IFMT(st.st_mode) == _FORMATS[node.type]:
        return st, st is not None
    remove_entry(name, dir_fd)
    return None, True


def matches_special(name: bytes, dir_fd: int, node: Node, st: os.stat_result) -> bool:
    """Return whether an existing symlink or special file already equals the node."""
    if node.type == "symlink":
        return os.readlink(name, dir_fd=dir_fd) == node.target
    if node.type in ("chardev", "blockdev"):
        return st.st_rdev == node.rdev
    return True


def is_trusted(name: bytes, dir_fd: int, node: Node, threads: int) -> bool:
    """Return whether an existing regular file already has the node's content.

    Only a file whose size and mtime match is read; see the module docstring.
    """
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False
        if st.st_size != node.size or st.st_mtime_ns != node.mtime_ns:
            return False
        return digest_fd(fd, node.size, threads) == node.digest
    finally:
        os.close(fd)


def create_temp(dir_fd: int) -> bytes:
    """Create an empty file with a new temporary name in a folder; return the name."""
    while True:
        name = TEMP_PREFIX + secrets.token_hex(8).encode()
        try:
            fd = os.open(
                name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
            )
        except FileExistsError:
            continue
        os.close(fd)
        return name


# A file that failed verification in a fresh checkout is renamed to NAME + this suffix.
DAMAGED_SUFFIX = b".cas-damaged"


def free_name(name: bytes, dir_fd: int) -> bytes:
    """Return ``name``, or ``name`` with ``.1``, ``.2`` ... appended, whichever is unused."""
    candidate = name
    number = 0
    while lstat_entry(candidate, dir_fd) is not None:
        number += 1
        candidate = name + b".%d" % number
    return candidate


_DIGEST_BLOCK = 8 << 20
_digest_buffers = threading.local()
# Below this size a file is hashed on one thread, because each multithreaded BLAKE3
# hasher pays for waking its worker threads. On a 2-core VM (blake3 1.0), one thread
# hashed 2 KiB in 2.5 us and two threads took 110 us. Two threads were slower up to 1 MiB
# and faster from 4 MiB on. Checkouts of many small files (configs, tokenizers) had spent
# most of their CPU time there.
PARALLEL_DIGEST_MIN_SIZE = 4 << 20


def digest_threads(size: int, threads: int) -> int:
    """Return the BLAKE3 thread count for hashing ``size`` bytes with up to ``threads``."""
    return threads if size >= PARALLEL_DIGEST_MIN_SIZE else 1


def digest_fd(fd: int, size: int, threads: int) -> bytes:
    """Return the BLAKE3 of a file's first ``size`` bytes, read through a reused buffer.

    Reading into one buffer per thread, rather than mapping the file, keeps the
    resident set flat for files of any size.
    """
    buffer = getattr(_digest_buffers, "buffer", None)
    if buffer is None:
        buffer = _digest_buffers.buffer = bytearray(_DIGEST_BLOCK)
    view = memoryview(buffer)
    hasher = blake3.blake3(max_threads=digest_threads(size, threads))
    offset = 0
    while offset < size:
        count = os.preadv(fd, [view[: min(_DIGEST_BLOCK, size - offset)]], offset)
        if count == 0:
            break
        hasher.update(view[:count])
        offset += count
    view.release()
    return hasher.digest()


def apply_metadata(fd: int, node: Node) -> None:
    """Set the owner (as root), extended attributes, mode and times of an open file or folder."""
    if os.geteuid() == 0:
        try:
            os.fchown(fd, node.uid, node.gid)
        except OSError as exc:
            log.warning("cannot restore owner of %r: %s", node.name, exc)
    _apply_xattrs(fd, node)
    os.fchmod(fd, node.mode)
    os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))


def apply_entry_metadata(name: bytes, dir_fd: int, node: Node) -> None:
    """Set the owner (as root) and times of a symlink or special file, never following it."""
    try:
        if os.geteuid() == 0:
            os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
        os.utime(name, ns=(node.mtime_ns, node.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        log.warning("cannot restore owner or times of %r: %s", node.name, exc.strerror)


def _apply_xattrs(fd: int, node: Node) -> None:
    """Set the node's extended attributes; a file system without them gets a warning."""
    for key, value in node.xattrs.items():
        try:
            os.setxattr(fd, key, value)
        except OSError as exc:
            log.warning(
                "cannot restore extended attribute %r of %r: %s", key, node.name, exc.strerror
            )
