"""Phase 1 of a checkout: walk the snapshot's trees and build the target's skeleton.

The planner creates folders (mode 0700 until the end), symlinks, special
files and empty new files, and lists every (chunk id, file, offset) that the
content phase must write. Into a target that is not empty it decides per
entry. An entry of another type is removed, and a symlink or special file
that differs is replaced. An existing file that `cas.target.is_trusted`
accepts is kept. Any other existing file gets a temporary file beside it,
which the content phase fills. Nothing here writes file content.
"""

from __future__ import annotations

import logging
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field

from cas.errors import CasError
from cas.paths import Selection
from cas.repository import Repository
from cas.streamrestore import STREAM_MIN_SIZE
from cas.target import (
    SafeTree,
    apply_entry_metadata,
    clear_way,
    create_temp,
    is_trusted,
    matches_special,
    remove_entry,
)
from cas.tree import Node

log = logging.getLogger(__name__)


@dataclass
class FileJob:
    """One file path to restore, and what happened to it."""

    rel: tuple[bytes, ...]
    node: Node
    error: str = ""
    # Set when the content digest was checked while writing (the streaming path).
    verified: bool = False
    # Whether an entry of that name was in the target before the checkout.
    existed: bool = False
    # Set when the existing file already has the content and is left alone.
    kept: bool = False
    # Set on a later path of a hard-linked file, which is linked, not written.
    link: bool = False
    # Temporary name in the same folder while a rewritten file is being written.
    temp: bytes = b""

    @property
    def write_name(self) -> bytes:
        """Return the name that content is written to: the temporary one, if any."""
        return self.temp or self.rel[-1]


@dataclass
class DirJob:
    """One folder whose recorded metadata is restored at the end."""

    rel: tuple[bytes, ...]
    node: Node | None


@dataclass
class Plan:
    """Everything a checkout does after the skeleton exists, and what it found."""

    files: list[FileJob] = field(default_factory=list)
    dirs: list[DirJob] = field(default_factory=list)
    symlinks: int = 0
    # chunk id -> [(file number, offset in file)]
    targets: dict[bytes, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    sizes: dict[bytes, int] = field(default_factory=dict)
    # Paths that could not be restored or deleted: (path below the target, reason).
    lost: list[tuple[tuple[bytes, ...], str]] = field(default_factory=list)
    # Entries that the snapshot lacks, removed at the end with ``delete``: (folder, name).
    extras: list[tuple[tuple[bytes, ...], bytes]] = field(default_factory=list)
    deleted: int = 0
    # (device, inode) at snapshot time -> number of the first file restored for it.
    link_sources: dict[tuple[int, int], int] = field(default_factory=dict)
    # (path of a later hard link, number of the file it links to)
    links: list[tuple[tuple[bytes, ...], int]] = field(default_factory=list)
    # Numbers of the large files restored in file order by `restore_stream`.
    streams: list[int] = field(default_factory=list)


class Planner:
    """Plans one checkout into the folder that ``safe`` opens.

    ``delete`` lists the entries of each folder checked out whole that the
    snapshot lacks; ``threads`` is the BLAKE3 thread count for trust checks.
    """

    def __init__(self, repo: Repository, safe: SafeTree, delete: bool, threads: int) -> None:
        self.repo = repo
        self.safe = safe
        self.delete = delete
        self.threads = threads

    def build(self, plan: Plan, root_id: bytes, selection: Selection | None) -> None:
        """Fill ``plan`` folder by folder, depth first, with a stack rather than recursion.

        A stored tree can nest deeper than Python's recursion limit allows. The
        caller owns ``plan``, so it can remove temporary files even when this fails.
        """
        stack: list[tuple[bytes, tuple[bytes, ...], Selection | None]] = [(root_id, (), selection)]
        while stack:
            tree_id, rel, chosen = stack.pop()
            children = self._plan_dir(tree_id, rel, chosen, plan)
            stack.extend(reversed(children))

    def _plan_dir(
        self, tree_id: bytes, rel: tuple[bytes, ...], chosen: Selection | None, plan: Plan
    ) -> list[tuple[bytes, tuple[bytes, ...], Selection | None]]:
        """Create one folder's selected entries; return its sub-folders to plan next.

        ``chosen`` is None when the whole folder is checked out. Otherwise only
        the entries it names are checked out, and the folder keeps the others.
        """
        # A tree that cannot be read loses its folder's content only; the
        # folders beside it are still restored.
        try:
            nodes = self.repo.load_tree(tree_id)
        except CasError as exc:
            reason = f"folder content lost: tree {tree_id.hex()} is unreadable: {exc}"
            log.error("%s: %s", self.safe.display(rel), reason)
            plan.lost.append((rel, reason))
            return []
        if chosen is not None:
            nodes = [node for node in nodes if node.name in chosen]
        dir_fd = self.safe.open_dir(rel)
        try:
            if chosen is None and self.delete:
                wanted = {node.name for node in nodes}
                for name in sorted(os.fsencode(entry) for entry in os.listdir(dir_fd)):
                    if name not in wanted:
                        plan.extras.append((rel, name))
            failed = {node.name for node in nodes if not self._try_node(node, rel, dir_fd, plan)}
        finally:
            os.close(dir_fd)
        children = []
        for node in nodes:
            if node.type == "dir" and node.name not in failed:
                plan.dirs.append(DirJob((*rel, node.name), node))
                below = None if chosen is None else chosen[node.name]
                children.append((node.subtree, (*rel, node.name), below))
        return children

    def _try_node(self, node: Node, rel: tuple[bytes, ...], dir_fd: int, plan: Plan) -> bool:
        """Plan one entry; record a file-system error for its path and return False."""
        path = (*rel, node.name)
        try:
            self._plan_node(node, rel, dir_fd, plan)
        except OSError as exc:
            reason = f"write failed: {exc.strerror or exc}"
            log.error("%s: %s", self.safe.display(path), reason)
            if plan.files and plan.files[-1].rel == path:
                plan.files[-1].error = reason
            else:
                plan.lost.append((path, reason))
            return False
        return True

    def _plan_node(self, node: Node, rel: tuple[bytes, ...], dir_fd: int, plan: Plan) -> None:
        name = node.name
        if node.damaged:
            log.warning("%s is marked damaged: %s", self.safe.display((*rel, name)), node.damaged)
        # An entry of another type is removed; one of the same type is reused or replaced.
        existing, present = clear_way(name, dir_fd, node)
        if node.type == "dir":
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            elif existing.st_mode & 0o700 != 0o700:
                _open_for_writing(name, dir_fd, existing.st_mode)
        elif node.type == "symlink":
            if existing is None or not matches_special(name, dir_fd, node, existing):
                remove_entry(name, dir_fd)
                os.symlink(node.target, name, dir_fd=dir_fd)
            apply_entry_metadata(name, dir_fd, node)
            plan.symlinks += 1
        elif node.type == "file":
            self._plan_file(node, (*rel, name), dir_fd, existing, present, plan)
        else:
            self._make_special(node, dir_fd, rel, existing)

    def _plan_file(
        self,
        node: Node,
        rel: tuple[bytes, ...],
        dir_fd: int,
        existing: os.stat_result | None,
        present: bool,
        plan: Plan,
    ) -> None:
        """Plan one file: keep a trusted existing file, else write it new or beside the old one.

        ``existing`` is the status of a regular file already at the path, and
        ``present`` is whether any entry was there before `clear_way`.
        """
        # A later path of a hard-linked file is linked in `_make_links`, which
        # also replaces whatever file is at that path now.
        if self._plan_link(node, rel, plan):
            return
        job = FileJob(rel, node, existed=present)
        number = len(plan.files)
        plan.files.append(job)
        if existing is not None and self._trusted(job, dir_fd):
            job.kept = True
            return
        if existing is not None:
            job.temp = create_temp(dir_fd)
        else:
            fd = os.open(
                rel[-1], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
            )
            os.close(fd)
        if node.size >= STREAM_MIN_SIZE:
            plan.streams.append(number)
            return
        offset = 0
        for chunk_id, size in zip(node.chunk_ids, node.sizes, strict=True):
            plan.targets[chunk_id].append((number, offset))
            plan.sizes[chunk_id] = size
            offset += size

    def _trusted(self, job: FileJob, dir_fd: int) -> bool:
        try:
            return is_trusted(job.rel[-1], dir_fd, job.node, self.threads)
        except OSError as exc:
            # An existing file that cannot be read is rewritten, not trusted.
            log.info("rewriting %s: %s", self.safe.display(job.rel), exc.strerror)
            return False

    def _plan_link(self, node: Node, rel: tuple[bytes, ...], plan: Plan) -> bool:
        """Return whether ``node`` is a later path of a hard-linked file already planned.

        Paths that shared an inode at snapshot time and still have the same
        content become hard links to the first restored path.
        """
        if node.nlink < 2 or not node.inode:
            return False
        key = (node.device, node.inode)
        first = plan.link_sources.get(key)
        if first is None:
            plan.link_sources[key] = len(plan.files)
            return False
        source = plan.files[first].node
        if (source.size, source.digest) != (node.size, node.digest):
            return False
        plan.links.append((rel, first))
        return True

    def _make_special(
        self, node: Node, dir_fd: int, rel: tuple[bytes, ...], existing: os.stat_result | None
    ) -> None:
        kinds = {"fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}
        if node.type not in kinds:
            log.warning(
                "not restoring %s of type %s", self.safe.display((*rel, node.name)), node.type
            )
            return
        if existing is not None and matches_special(node.name, dir_fd, node, existing):
            # lstat showed a fifo or device node, not a symlink, so chmod follows nothing.
            os.chmod(node.name, node.mode, dir_fd=dir_fd)
            apply_entry_metadata(node.name, dir_fd, node)
            return
        remove_entry(node.name, dir_fd)
        try:
            os.mknod(node.name, kinds[node.type] | node.mode, node.rdev, dir_fd=dir_fd)
        except PermissionError:
            log.warning("no permission to create device %s", self.safe.display((*rel, node.name)))
            return
        # mknod applies the umask; the entry was just created, so chmod follows no symlink.
        os.chmod(node.name, node.mode, dir_fd=dir_fd)
        apply_entry_metadata(node.name, dir_fd, node)


def _open_for_writing(name: bytes, dir_fd: int, mode: int) -> None:
    """Give the owner full access to an existing folder until its recorded mode is restored."""
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
    try:
        os.fchmod(fd, stat.S_IMODE(mode) | 0o700)
    finally:
        os.close(fd)
