"""Nodes from `os.stat` results: the metadata a snapshot records for each entry."""

from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import stat

from cas.tree import Node


def regular_file_size(path: str) -> int:
    """Return the summed size of the regular files at or below ``path``, without symlinks."""
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    total = 0
    if stat.S_ISDIR(st.st_mode):
        for folder, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    entry = os.lstat(os.path.join(folder, name))
                    total += entry.st_size if stat.S_ISREG(entry.st_mode) else 0
    return total


def unchanged(parent: Node, st: os.stat_result) -> bool:
    """Return whether a parent snapshot's node still describes the file ``st`` describes.

    Size, mtime, ctime, inode and device must all match. A file rewritten in place changes
    its ctime even when its mtime is put back, and a file replaced by rename its inode.
    """
    return (
        parent.type == "file"
        and parent.size == st.st_size
        and parent.mtime_ns == st.st_mtime_ns
        and parent.ctime_ns == st.st_ctime_ns
        and parent.inode == st.st_ino
        and parent.device == st.st_dev
    )


def special_kind(mode: int) -> str | None:
    """Return the node type of a FIFO, socket or device node, or None for other types."""
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "chardev"
    if stat.S_ISBLK(mode):
        return "blockdev"
    return None


def meta_node(name: bytes, kind: str, st: os.stat_result, **extra: object) -> Node:
    """Return a node of ``kind`` with the metadata of ``st``; ``extra`` sets further fields."""
    values: dict[str, object] = {
        "name": name,
        "type": kind,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "user": user_of(st.st_uid),
        "group": group_of(st.st_gid),
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "inode": st.st_ino,
        "device": st.st_dev,
        "nlink": st.st_nlink,
        "size": st.st_size if kind == "file" else 0,
    }
    values.update(extra)
    return Node(**values)  # type: ignore[arg-type]


@functools.cache
def user_of(uid: int) -> str:
    """Return the name of a user id, or "" when the system has none (a tar reader falls back)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return ""


@functools.cache
def group_of(gid: int) -> str:
    """Return the name of a group id, or "" when the system has none."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return ""
