"""Watching a folder and taking a snapshot when a checkpoint in it is complete.

Two ways to tell that a checkpoint is complete, both by polling (no inotify):

- **settle**: every file under the folder has kept its size and mtime for
  ``settle`` seconds, and something differs from the last snapshot. Then the
  folder is snapshotted.
- **marker**: a file named ``marker`` appears (or is rewritten) somewhere under
  the folder, which the trainer writes when a checkpoint is complete. Then the
  marker's folder is snapshotted. Other files are not looked at.

Paths that the exclude patterns leave out are not looked at either, so a log
file that keeps growing does not stop the folder from settling.

At the start, a folder (or marker folder) whose newest snapshot from this host
is newer than its newest file (or its marker) counts as snapshotted, so a
restarted watcher does not take the same checkpoint again. A failed snapshot is
logged and reported as an event; it is tried again when the files change, or
after ``retry_after`` seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from cas.archiver import Archiver, SnapshotOptions, SnapshotResult
from cas.errors import CasError, UsageError
from cas.excludes import ExcludeMatcher
from cas.parts import part_name
from cas.repository import Repository
from cas.writeonly import visible_snapshots

log = logging.getLogger(__name__)

# Relative path -> (size, mtime_ns) of each file (or symlink) under the watched folder.
FileState = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class WatchOptions:
    """When `Watcher` takes a snapshot; times in seconds."""

    settle: float = 5.0
    # Non-empty: snapshot a folder when a file of this name appears in it, and ignore `settle`.
    marker: str = ""
    interval: float = 1.0
    once: bool = False
    retry_after: float = 60.0

    def validate(self) -> None:
        """Raise `UsageError` for a negative time or a marker name with a ``/``."""
        if self.settle < 0 or self.retry_after < 0:
            raise UsageError("invalid --settle or --retry-after: use 0 or more seconds")
        if not self.interval > 0:
            raise UsageError(f"invalid --interval {self.interval}: use more than 0 seconds")
        if self.marker and ("/" in self.marker or self.marker in (".", "..")):
            raise UsageError(
                f"invalid --marker {self.marker!r}: give a file name such as DONE, not a path"
            )


@dataclass(frozen=True)
class WatchEvent:
    """Something the watcher did: ``kind`` is start, snapshot, error or stop."""

    kind: str
    time: str
    path: str
    result: SnapshotResult | None = None
    error: Exception | None = None
    snapshot_count: int = 0


class Watcher:
    """Polls a folder and snapshots it, or its marker folders, when complete.

    `run` returns when ``stop`` is set, checking it between polls and after each
    snapshot, so a snapshot that has started is finished first.
    """

    def __init__(
        self,
        repo: Repository,
        root: str,
        options: WatchOptions,
        snapshot_options: SnapshotOptions,
        on_event: Callable[[WatchEvent], None],
        stop: threading.Event | None = None,
    ) -> None:
        options.validate()
        self.repo = repo
        self.root = os.path.abspath(root)
        if not os.path.isdir(self.root):
            raise UsageError(f"invalid watch folder {root}: not a folder; give an existing folder")
        _check_outside(self.root, repo)
        self.options = options
        self.snapshot_options = snapshot_options
        self.host = snapshot_options.host or socket.gethostname()
        self.excludes = ExcludeMatcher(snapshot_options.exclude)
        self.on_event = on_event
        self.stop = stop or threading.Event()
        self.snapshot_count = 0
        # Paths whose last snapshot failed -> (state then, monotonic time of the failure).
        self._failed: dict[str, tuple[object, float]] = {}

    def run(self) -> int:
        """Watch until stopped (or, with ``once``, one snapshot); return the snapshot count.

        With ``once``, a failed snapshot raises its error instead of being retried.
        """
        self._emit("start", self.root)
        try:
            if self.options.marker:
                self._watch_markers()
            else:
                self._watch_settle()
        finally:
            self._emit("stop", self.root)
        return self.snapshot_count

    # Settle mode

    def _watch_settle(self) -> None:
        state = self._scan()
        changed_at = time.monotonic()
        covered = not self.options.once and self._covered(self.root, state, self._newest())
        baseline = state if covered else None
        while not self.stop.is_set():
            settled = time.monotonic() - changed_at >= self.options.settle
            pending = bool(state) and state != baseline and self._may_try(self.root, state)
            if settled and pending and self._snapshot(self.root, state):
                baseline = state
                if self.options.once:
                    return
            if self.stop.wait(self.options.interval):
                return
            scanned = self._scan()
            if scanned != state:
                state, changed_at = scanned, time.monotonic()

    # Marker mode

    def _watch_markers(self) -> None:
        markers = self._scan_markers()
        newest = self._newest() if not self.options.once else {}
        done = {
            folder: signature
            for folder, signature in markers.items()
            if self._covered(folder, {"": signature}, newest)
        }
        while not self.stop.is_set():
            for folder, signature in sorted(markers.items()):
                if self.stop.is_set():
                    return
                if done.get(folder) == signature or not self._may_try(folder, signature):
                    continue
                if self._snapshot(folder, signature):
                    done[folder] = signature
                    if self.options.once:
                        return
            if self.stop.wait(self.options.interval):
                return
            markers = self._scan_markers()

    # Shared steps

    def _snapshot(self, path: str, state: object) -> bool:
        """Snapshot ``path``; on failure log it, remember ``state`` and return False."""
        try:
            result = Archiver(self.repo, replace(self.snapshot_options)).run([path])
        except (CasError, OSError) as exc:
            if self.options.once:
                raise
            log.error(
                "snapshot of %s failed: %s; trying again when its files change or in %g s",
                path,
                exc,
                self.options.retry_after,
            )
            self._failed[path] = (state, time.monotonic())
            self._emit("error", path, error=exc)
            return False
        self._failed.pop(path, None)
        self.snapshot_count += 1
        self._emit("snapshot", path, result=result)
        return True

    def _may_try(self, path: str, state: object) -> bool:
        """Return whether to try ``path`` now: it never failed, changed since, or waited enough."""
        failed = self._failed.get(path)
        if failed is None:
            return True
        failed_state, failed_at = failed
        waited = time.monotonic() - failed_at >= self.options.retry_after
        return state != failed_state or waited

    def _newest(self) -> dict[str, datetime]:
        """Return source folder -> time of its newest snapshot from this host (not parts)."""
        newest: dict[str, datetime] = {}
        for snap in visible_snapshots(self.repo):
            if snap.host == self.host and len(snap.paths) == 1 and part_name(snap) is None:
                newest[os.fsdecode(snap.paths[0])] = snap.datetime
        return newest

    @staticmethod
    def _covered(path: str, state: FileState, newest: dict[str, datetime]) -> bool:
        """Return whether the newest snapshot of ``path`` is newer than every file of ``state``."""
        taken = newest.get(path)
        if taken is None or not state:
            return False
        newest_ns = max(mtime_ns for _size, mtime_ns in state.values())
        return taken.timestamp() * 1e9 >= newest_ns

    def _emit(
        self,
        kind: str,
        path: str,
        result: SnapshotResult | None = None,
        error: Exception | None = None,
    ) -> None:
        now = datetime.now().astimezone().isoformat()
        self.on_event(WatchEvent(kind, now, path, result, error, self.snapshot_count))

    # Scanning

    def _scan(self) -> FileState:
        state: FileState = {}
        for rel_path, st in self._walk():
            state[rel_path] = (st.st_size, st.st_mtime_ns)
        return state

    def _scan_markers(self) -> dict[str, tuple[int, int]]:
        """Return marker folder (absolute) -> (size, mtime_ns) of its marker file."""
        markers: dict[str, tuple[int, int]] = {}
        for rel_path, st in self._walk():
            folder, _, name = rel_path.rpartition("/")
            if name == self.options.marker:
                absolute = os.path.join(self.root, folder) if folder else self.root
                markers[absolute] = (st.st_size, st.st_mtime_ns)
        return markers

    def _walk(self) -> list[tuple[str, os.stat_result]]:
        """Return (relative path, stat) of every file and symlink not excluded.

        Symlinked folders are not entered, so a link loop cannot make the walk
        endless; with ``dereference`` a link's stat is its target's.
        """
        found: list[tuple[str, os.stat_result]] = []
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            try:
                entries = list(os.scandir(os.path.join(self.root, rel_dir)))
            except OSError as exc:
                log.debug("cannot list %s: %s", rel_dir or self.root, exc)
                continue
            for entry in entries:
                rel_path = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                try:
                    st = entry.stat(follow_symlinks=self.snapshot_options.dereference)
                except OSError:
                    # Removed, or a dangling link: the next poll finds the change.
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                if self.excludes and self.excludes.excluded(rel_path, is_dir):
                    continue
                if is_dir and not entry.is_symlink():
                    stack.append(rel_path)
                elif not is_dir:
                    found.append((rel_path, st))
        return found


def _check_outside(root: str, repo: Repository) -> None:
    """Reject a watched folder that contains the repository or its cache.

    Each snapshot writes there, so the folder would never settle, or be stored into itself.
    """
    backend_root = getattr(repo.backend, "root", None)
    places = [("repository", backend_root), ("cache", repo.cache_dir)]
    for kind, place in places:
        if place is None:
            continue
        inside = os.path.commonpath([root, os.path.abspath(place)]) == root
        if inside:
            raise UsageError(
                f"invalid watch folder {root}: it contains the {kind} {place}; "
                f"watch a folder outside it"
            )
