"""Checking a repository: structure, and with ``read_data`` every blob's bytes.

Structure: every snapshot loads, every tree it reaches loads, and every blob
a tree names is in the index. With ``read_data``, every indexed blob is read,
authenticated, decompressed and matched to its id, one pack at a time.
Findings are collected, not raised, so one run reports every problem.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from cas.errors import CasError
from cas.index import BlobLocation, pack_name
from cas.pack import PROLOGUE_SIZE, BlobOpener, parse_prologue
from cas.repository import Repository

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finding:
    """One problem: what kind, where, and which snapshots and paths it affects."""

    kind: str
    message: str
    pack_hex: str = ""
    blob_hex: str = ""
    snapshots: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()


@dataclass
class CheckReport:
    """The result of a check."""

    snapshots: int = 0
    trees: int = 0
    blobs_referenced: int = 0
    blobs_read: int = 0
    bytes_read: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no problem was found."""
        return not self.findings


@dataclass
class _Usage:
    """Which snapshots and paths reference each blob, for naming affected files."""

    users: dict[bytes, set[tuple[str, str]]] = field(default_factory=lambda: defaultdict(set))

    def add(self, blob_id: bytes, snapshot_hex: str, path: str) -> None:
        if len(self.users[blob_id]) < 20:
            self.users[blob_id].add((snapshot_hex, path))

    def describe(self, blob_id: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
        pairs = sorted(self.users.get(blob_id, ()))
        return tuple(sorted({s for s, _ in pairs})), tuple(sorted({p for _, p in pairs}))


def check_repository(
    repo: Repository,
    read_data: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Check ``repo``; see the module docstring for what each level verifies."""
    report = CheckReport()
    usage = _Usage()
    _check_structure(repo, report, usage)
    if read_data:
        _check_data(repo, report, usage, progress)
    log.info("check done: %d findings", len(report.findings))
    return report


def _check_structure(repo: Repository, report: CheckReport, usage: _Usage) -> None:
    seen_trees: set[bytes] = set()
    for snapshot_hex in repo.snapshot_names():
        try:
            snapshot = repo.load_snapshot(snapshot_hex)
        except CasError as exc:
            report.findings.append(Finding("snapshot", str(exc), snapshots=(snapshot_hex,)))
            continue
        report.snapshots += 1
        _walk(repo, snapshot.tree_id, "/", snapshot_hex, report, usage, seen_trees)


def _walk(
    repo: Repository,
    tree_id: bytes,
    path: str,
    snapshot_hex: str,
    report: CheckReport,
    usage: _Usage,
    seen: set[bytes],
) -> None:
    usage.add(tree_id, snapshot_hex, path)
    if tree_id in seen:
        return
    seen.add(tree_id)
    try:
        nodes = repo.load_tree(tree_id)
    except CasError as exc:
        report.findings.append(
            Finding(
                "tree", str(exc), blob_hex=tree_id.hex(), snapshots=(snapshot_hex,), paths=(path,)
            )
        )
        return
    report.trees += 1
    for node in nodes:
        child = path.rstrip("/") + "/" + node.name.decode(errors="backslashreplace")
        if node.type == "dir":
            _walk(repo, node.subtree, child, snapshot_hex, report, usage, seen)
            continue
        for chunk_id in node.chunk_ids:
            usage.add(chunk_id, snapshot_hex, child)
            report.blobs_referenced += 1
            if repo.index.lookup(chunk_id) is None:
                report.findings.append(
                    Finding(
                        "missing-blob",
                        f"chunk {chunk_id.hex()} of {child} is not in the index",
                        blob_hex=chunk_id.hex(),
                        snapshots=(snapshot_hex,),
                        paths=(child,),
                    )
                )


def _check_data(
    repo: Repository,
    report: CheckReport,
    usage: _Usage,
    progress: Callable[[int, int], None] | None,
) -> None:
    by_pack: dict[bytes, list[tuple[bytes, BlobLocation]]] = defaultdict(list)
    for blob_id, location in repo.index.cache.items():
        by_pack[location.pack_id].append((blob_id, location))
    total = sum(loc.stored_size for blobs in by_pack.values() for _, loc in blobs)
    for pack_id, blobs in sorted(by_pack.items()):
        _check_pack(repo, pack_id, blobs, report, usage)
        if progress:
            progress(report.bytes_read, total)


def _check_pack(
    repo: Repository,
    pack_id: bytes,
    blobs: list[tuple[bytes, BlobLocation]],
    report: CheckReport,
    usage: _Usage,
) -> None:
    name = pack_name(pack_id)
    try:
        size = repo.backend.size(name)
        key_mode, salt = parse_prologue(repo.backend.get(name, 0, PROLOGUE_SIZE), name)
        opener = BlobOpener(repo.keys, pack_id, key_mode, salt)
    except CasError as exc:
        _pack_finding(report, usage, pack_id, blobs, f"pack {pack_id.hex()} is unreadable: {exc}")
        return
    for blob_id, loc in sorted(blobs, key=lambda item: item[1].offset):
        snapshots, paths = usage.describe(blob_id)
        if loc.offset + loc.stored_size > size:
            message = (
                f"blob {blob_id.hex()} lies beyond the end of pack {pack_id.hex()} ({size} bytes)"
            )
            report.findings.append(
                Finding("truncated-pack", message, pack_id.hex(), blob_id.hex(), snapshots, paths)
            )
            continue
        try:
            stored = repo.backend.get(name, loc.offset, loc.stored_size)
            opener.open(
                blob_id, loc.blob_type, loc.codec, loc.filter, loc.raw_size, loc.offset, stored
            )
        except CasError as exc:
            report.findings.append(
                Finding("damaged-blob", str(exc), pack_id.hex(), blob_id.hex(), snapshots, paths)
            )
            continue
        report.blobs_read += 1
        report.bytes_read += loc.stored_size


def _pack_finding(
    report: CheckReport,
    usage: _Usage,
    pack_id: bytes,
    blobs: list[tuple[bytes, BlobLocation]],
    message: str,
) -> None:
    snapshots: set[str] = set()
    paths: set[str] = set()
    for blob_id, _ in blobs:
        more_snapshots, more_paths = usage.describe(blob_id)
        snapshots.update(more_snapshots)
        paths.update(more_paths)
    report.findings.append(
        Finding(
            "missing-pack",
            message,
            pack_id.hex(),
            "",
            tuple(sorted(snapshots)),
            tuple(sorted(paths)),
        )
    )
