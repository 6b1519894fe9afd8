"""The rules of the snapshot walk: which paths it leaves out and which symlinks it follows.

`WalkRules` keeps the state that the archiver's recursive walk needs for
``--exclude`` and ``--dereference``: the folders from the root down to the
current one, as names for the exclude patterns and as (device, inode) pairs
that reveal a symlink loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterator

from cas.excludes import ExcludeMatcher

log = logging.getLogger(__name__)


class WalkRules:
    """Exclude patterns and symlink following for one snapshot walk."""

    def __init__(self, patterns: list[str], dereference: bool, warn: Callable[[str], None]) -> None:
        self.excludes = ExcludeMatcher(patterns)
        self.dereference = dereference
        self.excluded_count = 0
        self._warn = warn
        self._rel_dirs: list[str] = []
        self._ancestors: set[tuple[int, int]] = set()

    def stat(self, path: str, follow: bool) -> tuple[os.stat_result, bool]:
        """Return the stat to store for ``path`` and whether it is of a followed link.

        ``follow`` follows a symlink given as a source path; ``dereference``
        follows every symlink. A link whose target is missing, or is a folder
        being walked (a loop), is stored as the link itself, with a warning.
        """
        link_st = os.lstat(path)
        if not stat.S_ISLNK(link_st.st_mode) or not (follow or self.dereference):
            return link_st, False
        try:
            st = os.stat(path)
        except OSError as exc:
            self._warn(f"cannot follow symlink {path}: {exc.strerror}; stored the link")
            return link_st, False
        if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) in self._ancestors:
            self._warn(f"symlink {path} points to a folder that contains it; stored the link")
            return link_st, False
        return st, True

    def excluded(self, name: bytes, st: os.stat_result) -> bool:
        """Return whether the entry ``name`` of the current folder is excluded."""
        if not self.excludes:
            return False
        rel_path = "/".join([*self._rel_dirs, os.fsdecode(name)])
        if self.excludes.excluded(rel_path, stat.S_ISDIR(st.st_mode)):
            log.debug("excluded %s", rel_path)
            self.excluded_count += 1
            return True
        return False

    @contextlib.contextmanager
    def enter(self, name: bytes, st: os.stat_result) -> Iterator[None]:
        """Walk into the folder ``name`` (empty for the root) with stat ``st``."""
        if name:
            self._rel_dirs.append(os.fsdecode(name))
        key = (st.st_dev, st.st_ino)
        added = key not in self._ancestors
        self._ancestors.add(key)
        try:
            yield
        finally:
            if added:
                self._ancestors.discard(key)
            if name:
                self._rel_dirs.pop()
