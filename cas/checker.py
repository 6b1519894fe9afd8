"""Checking a repository: structure, pack headers, and with ``read_data`` every blob's bytes.

Phases, each a function below:

1. Index objects: every ``index/`` object authenticates and parses.
2. Snapshots and trees: every snapshot loads, every tree it reaches loads, and
   every chunk a file names is in the index.
3. Packs: every pack that the index names exists, every index entry lies
   inside its pack, and the pack's own header lists the same entries. Packs
   that no index entry names are reported as warnings.
4. Data (``read_data``): every indexed blob of the selected packs is read,
   authenticated, decompressed and matched to its id. Each pack is read with
   one request.

Findings are collected, not raised, so one run reports every problem. A
finding of severity ``warning`` loses no data of any snapshot: an unreferenced
pack, an unindexed blob, or a damaged blob that no snapshot uses.
`CheckReport.ok` looks at errors only.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from cas.crypto import TAG_SIZE
from cas.errors import CasError, IntegrityError, UsageError, WriteOnlyKeyError
from cas.index import INDEX_PREFIX, BlobLocation, decode_index_body, pack_name
from cas.objects import ObjectKind, read_object
from cas.pack import (
    MAX_BLOB_RAW_SIZE,
    MAX_HEADER_SIZE,
    MAX_PACK_SIZE,
    PACK_ALIGNMENT,
    PROLOGUE_SIZE,
    TRAILER_SIZE,
    BlobOpener,
    PackHeader,
    decode_header,
    parse_prologue,
    parse_trailer,
)
from cas.repository import Repository

log = logging.getLogger(__name__)

# The blob-area target of tree packs, as `cas.blobstore.BlobWriter` sets it.
TREE_PACK_TARGET_SIZE = 4 << 20

ERROR = "error"
WARNING = "warning"
# Each blob remembers at most this many (snapshot, path) users for findings.
_MAX_USERS_PER_BLOB = 20
# Upward steps when naming a blob's users; bounds the work for trees shared many times.
_MAX_DESCRIBE_STEPS = 10_000
_PACK_PREFIX = "data/"

PackBlobs = list[tuple[bytes, BlobLocation]]


@dataclass(frozen=True)
class Finding:
    """One problem: what kind, where, and which snapshots and paths it affects."""

    kind: str
    message: str
    pack_hex: str = ""
    blob_hex: str = ""
    snapshots: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    severity: str = ERROR


@dataclass
class CheckReport:
    """The result of a check."""

    snapshots: int = 0
    trees: int = 0
    index_objects: int = 0
    packs: int = 0
    packs_read: int = 0
    blobs_referenced: int = 0
    blobs_read: int = 0
    bytes_read: int = 0
    # Snapshot objects that a tag change replaced and that still exist, hidden from
    # readers until the next `cas tag` or `cas prune` deletes them. They are checked
    # like any snapshot and are no finding.
    replaced_snapshots: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        """Findings that mean data is damaged or missing."""
        return [finding for finding in self.findings if finding.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        """Findings that waste space or need a repair but lose no data."""
        return [finding for finding in self.findings if finding.severity == WARNING]

    @property
    def ok(self) -> bool:
        """Whether no error was found; warnings do not count."""
        return not self.errors


@dataclass
class _Usage:
    """Links from each blob up to the snapshots that use it, so shared trees cost nothing extra.

    Each blob records the trees that contain it (by name), and each root tree
    the snapshots that start at it. The paths of a blob are found by walking
    these links up, which reaches every snapshot that shares an unchanged tree
    even though the checker reads that tree only once.
    """

    parents: dict[bytes, set[tuple[bytes, str]]] = field(default_factory=lambda: defaultdict(set))
    roots: dict[bytes, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add_root(self, tree_id: bytes, snapshot_hex: str) -> None:
        self.roots[tree_id].add(snapshot_hex)

    def add_child(self, blob_id: bytes, tree_id: bytes, name: str) -> None:
        parents = self.parents[blob_id]
        if len(parents) < _MAX_USERS_PER_BLOB:
            parents.add((tree_id, name))

    def describe(self, blob_id: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Return the snapshots and paths that use a blob, at most 20 of each."""
        pairs: set[tuple[str, str]] = set()
        frontier: list[tuple[bytes, str]] = [(blob_id, "")]
        steps = 0
        while frontier and len(pairs) < _MAX_USERS_PER_BLOB and steps < _MAX_DESCRIBE_STEPS:
            steps += 1
            current, suffix = frontier.pop()
            for snapshot_hex in self.roots.get(current, ()):
                pairs.add((snapshot_hex, "/" + suffix))
            for parent, name in self.parents.get(current, ()):
                frontier.append((parent, f"{name}/{suffix}" if suffix else name))
        return tuple(sorted({s for s, _ in pairs})), tuple(sorted({p for _, p in pairs}))

    def describe_many(self, blob_ids: list[bytes]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        snapshots: set[str] = set()
        paths: set[str] = set()
        for blob_id in blob_ids:
            more_snapshots, more_paths = self.describe(blob_id)
            snapshots.update(more_snapshots)
            paths.update(more_paths)
        return tuple(sorted(snapshots)), tuple(sorted(paths))


@dataclass(frozen=True)
class DataSubset:
    """A selection of packs for `--read-data-subset`: part ``part`` of ``parts``, or a share."""

    part: int = 1
    parts: int = 1
    percent: float | None = None

    def select(self, pack_ids: list[bytes], rng: random.Random | None = None) -> set[bytes]:
        """Return the selected pack ids.

        ``N/M`` splits the 256-bit id space into M equal ranges and keeps range
        N, so running parts 1 to M reads every pack exactly once. ``P%`` draws
        that share of the packs at random, at least one when P > 0.
        """
        if self.percent is not None:
            count = round(len(pack_ids) * self.percent / 100)
            if self.percent > 0 and pack_ids:
                count = max(1, count)
            return set((rng or random.Random()).sample(sorted(pack_ids), count))
        return {
            pack_id
            for pack_id in pack_ids
            if (int.from_bytes(pack_id, "big") * self.parts) >> (8 * len(pack_id)) == self.part - 1
        }


def parse_subset(text: str) -> DataSubset:
    """Parse ``N/M`` (1 <= N <= M) or ``P%`` (0 < P <= 100); raise `UsageError` otherwise."""
    try:
        if text.endswith("%"):
            percent = float(text[:-1])
            if not 0 < percent <= 100:
                raise ValueError(text)
            return DataSubset(percent=percent)
        part_text, _, parts_text = text.partition("/")
        part, parts = int(part_text), int(parts_text)
        if not 1 <= part <= parts:
            raise ValueError(text)
        return DataSubset(part=part, parts=parts)
    except ValueError:
        raise UsageError(
            f"invalid data subset {text!r}: write N/M with 1 <= N <= M (for example 2/5), "
            f"or P% with 0 < P <= 100 (for example 10%)"
        ) from None


def check_repository(
    repo: Repository,
    read_data: bool = False,
    progress: Callable[[int, int], None] | None = None,
    subset: DataSubset | None = None,
) -> CheckReport:
    """Check ``repo``; see the module docstring for what each phase verifies.

    With ``subset``, data is read for the selected packs only (``read_data`` is
    implied); the structure and pack headers are still checked for every pack.
    """
    if repo.keys.write_only:
        raise WriteOnlyKeyError.for_action("check the repository, which reads snapshots and trees")
    report = CheckReport()
    usage = _Usage()
    _check_index_objects(repo, report)
    try:
        repo.index.cache.count()
    except CasError as exc:
        report.findings.append(Finding("index", f"the index cannot be loaded: {exc}"))
        return report
    _check_structure(repo, report, usage)
    read_data = read_data or subset is not None
    _check_packs(repo, report, usage, read_data, subset or DataSubset(), progress)
    log.info("check done: %d errors, %d warnings", len(report.errors), len(report.warnings))
    return report


# Phase 1: index objects


def _check_index_objects(repo: Repository, report: CheckReport) -> None:
    # The cache may hold a copy of an object that was damaged after it was
    # merged, so every object is read and authenticated again here.
    for info in sorted(repo.backend.list(INDEX_PREFIX), key=lambda item: item.name):
        report.index_objects += 1
        try:
            body = read_object(repo.backend, repo.keys, ObjectKind.INDEX, info.name)
            decode_index_body(body, info.name)
        except CasError as exc:
            report.findings.append(Finding("index", f"index object {info.name}: {exc}"))


# Phase 2: snapshots and trees


def _check_structure(repo: Repository, report: CheckReport, usage: _Usage) -> None:
    """Walk every snapshot; report lost trees and chunks once each, naming all their users."""
    seen_trees: set[bytes] = set()
    lost_trees: dict[bytes, str] = {}
    missing_chunks: set[bytes] = set()
    names = repo.snapshot_names()
    replaced: set[str] = set()
    for snapshot_hex in names:
        try:
            snapshot = repo.load_snapshot(snapshot_hex)
        except CasError as exc:
            report.findings.append(Finding("snapshot", str(exc), snapshots=(snapshot_hex,)))
            continue
        report.snapshots += 1
        replaced.update(old_id.hex() for old_id in snapshot.replaces)
        usage.add_root(snapshot.tree_id, snapshot_hex)
        _walk(repo, snapshot.tree_id, report, usage, seen_trees, lost_trees, missing_chunks)
    report.replaced_snapshots = len(replaced.intersection(names))
    for tree_id, message in lost_trees.items():
        snapshots, paths = usage.describe(tree_id)
        report.findings.append(Finding("tree", message, "", tree_id.hex(), snapshots, paths))
    for chunk_id in sorted(missing_chunks):
        snapshots, paths = usage.describe(chunk_id)
        where = f" of {paths[0]}" if paths else ""
        message = f"chunk {chunk_id.hex()}{where} is not in the index"
        report.findings.append(
            Finding("missing-blob", message, "", chunk_id.hex(), snapshots, paths)
        )


def _walk(
    repo: Repository,
    root_id: bytes,
    report: CheckReport,
    usage: _Usage,
    seen: set[bytes],
    lost_trees: dict[bytes, str],
    missing_chunks: set[bytes],
) -> None:
    """Read every tree below ``root_id`` not read before, with a stack: trees may nest deeply."""
    stack = [root_id]
    while stack:
        tree_id = stack.pop()
        if tree_id in seen:
            continue
        seen.add(tree_id)
        try:
            nodes = repo.load_tree(tree_id)
        except CasError as exc:
            lost_trees[tree_id] = str(exc)
            continue
        report.trees += 1
        for node in nodes:
            name = node.name.decode(errors="backslashreplace")
            if node.type == "dir":
                usage.add_child(node.subtree, tree_id, name)
                stack.append(node.subtree)
                continue
            for chunk_id in node.chunk_ids:
                usage.add_child(chunk_id, tree_id, name)
                report.blobs_referenced += 1
                if repo.index.lookup(chunk_id) is None:
                    missing_chunks.add(chunk_id)


# Phase 3 and 4: packs, their headers, and their data


def _check_packs(
    repo: Repository,
    report: CheckReport,
    usage: _Usage,
    read_data: bool,
    subset: DataSubset,
    progress: Callable[[int, int], None] | None,
) -> None:
    by_pack: dict[bytes, PackBlobs] = defaultdict(list)
    for blob_id, location in repo.index.cache.items():
        by_pack[location.pack_id].append((blob_id, location))
    stored = _list_packs(repo)
    for pack_id in sorted(set(stored) - set(by_pack)):
        report.findings.append(
            Finding(
                "unreferenced-pack",
                f"pack {pack_id.hex()} is in no index object (left by an interrupted run; "
                f"`cas repair index` adds it, gc removes it)",
                pack_id.hex(),
                severity=WARNING,
            )
        )
    selected = subset.select(list(by_pack)) if read_data else set()
    # Progress counts the indexed bytes of the packs read, or of every pack whose
    # header alone is checked when no data is read.
    measured = selected if read_data else set(by_pack)
    total = sum(loc.stored_size for pid in measured for _, loc in by_pack[pid])
    done = 0
    for pack_id, blobs in sorted(by_pack.items()):
        report.packs += 1
        blobs.sort(key=lambda item: item[1].offset)
        checker = _PackChecker(repo, report, usage, pack_id, blobs)
        checker.run(stored.get(pack_id), pack_id in selected)
        if progress and pack_id in measured:
            done += sum(location.stored_size for _, location in blobs)
            progress(done, total)


def _max_pack_size(repo: Repository) -> int:
    """Return the largest pack a writer can make with this config; larger ones are not read.

    A writer stops adding blobs once the blob area reaches its target (the
    config's pack size, or 4 MiB for tree packs), so a pack contains at most the
    target, one more blob, the padding and the header.
    """
    target = max(repo.config.pack_size, TREE_PACK_TARGET_SIZE)
    return min(
        MAX_PACK_SIZE,
        PROLOGUE_SIZE + target + MAX_BLOB_RAW_SIZE + TAG_SIZE + PACK_ALIGNMENT + MAX_HEADER_SIZE,
    )


def _severity(snapshots: tuple[str, ...]) -> str:
    """Damage to blobs that no snapshot uses loses nothing; gc removes them."""
    return ERROR if snapshots else WARNING


def _list_packs(repo: Repository) -> dict[bytes, int]:
    """Return pack id -> size for every object under ``data/`` with a well-formed name."""
    packs: dict[bytes, int] = {}
    for info in repo.backend.list(_PACK_PREFIX):
        pack_hex = info.name.rsplit("/", 1)[-1]
        try:
            pack_id = bytes.fromhex(pack_hex)
        except ValueError:
            log.warning("ignoring %s: not a pack name", info.name)
            continue
        if len(pack_id) == 32 and info.name == pack_name(pack_id):
            packs[pack_id] = info.size
        else:
            log.warning("ignoring %s: not a pack name", info.name)
    return packs


class _PackChecker:
    """Checks one pack against the index entries that name it."""

    def __init__(
        self,
        repo: Repository,
        report: CheckReport,
        usage: _Usage,
        pack_id: bytes,
        blobs: PackBlobs,
    ) -> None:
        self.repo = repo
        self.report = report
        self.usage = usage
        self.pack_id = pack_id
        self.blobs = blobs
        self.name = pack_name(pack_id)

    def run(self, size: int | None, read_data: bool) -> None:
        """Check existence, bounds and header; with ``read_data`` also every blob."""
        if size is None:
            self._whole_pack_finding(f"pack {self.pack_id.hex()} is missing")
            return
        data: bytes | None = None
        try:
            if read_data:
                limit = _max_pack_size(self.repo)
                if size > limit:
                    raise IntegrityError(f"pack is {size} bytes, over the limit of {limit}")
                data = self.repo.backend.get(self.name, 0, size)
                self.report.packs_read += 1
            prologue = data[:PROLOGUE_SIZE] if data is not None else self._get(0, PROLOGUE_SIZE)
            key_mode, salt = parse_prologue(prologue, self.name)
        except CasError as exc:
            self._whole_pack_finding(f"pack {self.pack_id.hex()} is unreadable: {exc}")
            return
        inside = self._check_bounds(size)
        if len(inside) == len(self.blobs):
            self._check_header(size, prologue, data)
        if read_data and data is not None:
            self._check_blobs(inside, key_mode, salt, data)

    def _get(self, offset: int, length: int) -> bytes:
        return self.repo.backend.get(self.name, offset, length)

    def _whole_pack_finding(self, message: str, kind: str = "missing-pack") -> None:
        snapshots, paths = self.usage.describe_many([blob_id for blob_id, _ in self.blobs])
        self.report.findings.append(
            Finding(kind, message, self.pack_id.hex(), "", snapshots, paths, _severity(snapshots))
        )

    def _blob_finding(self, kind: str, blob_id: bytes, message: str) -> None:
        snapshots, paths = self.usage.describe(blob_id)
        self.report.findings.append(
            Finding(
                kind,
                message,
                self.pack_id.hex(),
                blob_id.hex(),
                snapshots,
                paths,
                _severity(snapshots),
            )
        )

    def _check_bounds(self, size: int) -> PackBlobs:
        """Report index entries that end past the pack's end; return the others.

        The header sits after the blobs, so a pack cut short has also lost its
        header, and such a pack gets these findings only.
        """
        inside: PackBlobs = []
        for blob_id, loc in self.blobs:
            if loc.offset + loc.stored_size > size:
                message = (
                    f"blob {blob_id.hex()} lies beyond the end of pack {self.pack_id.hex()} "
                    f"({size} bytes)"
                )
                self._blob_finding("truncated-pack", blob_id, message)
            else:
                inside.append((blob_id, loc))
        return inside

    def _read_header(self, size: int, prologue: bytes, data: bytes | None) -> PackHeader:
        trailer = data[-TRAILER_SIZE:] if data is not None else self._get(size - TRAILER_SIZE, 8)
        header_size = parse_trailer(trailer, size, self.name)
        start = size - TRAILER_SIZE - header_size
        sealed = (
            data[start : size - TRAILER_SIZE] if data is not None else self._get(start, header_size)
        )
        return decode_header(self.repo.keys, self.pack_id, prologue, sealed, start)

    def _check_header(self, size: int, prologue: bytes, data: bytes | None) -> None:
        """Compare the pack's own header with the index entries that name this pack."""
        try:
            header = self._read_header(size, prologue, data)
        except CasError as exc:
            message = f"header of pack {self.pack_id.hex()} is unreadable: {exc}"
            self._whole_pack_finding(message, "bad-pack-header")
            return
        listed = {
            entry.blob_id: BlobLocation.of_entry(self.pack_id, entry) for entry in header.entries
        }
        for blob_id, loc in self.blobs:
            if listed.get(blob_id) != loc:
                message = (
                    f"index entry of blob {blob_id.hex()} does not match the header of "
                    f"pack {self.pack_id.hex()}"
                )
                self._blob_finding("index-mismatch", blob_id, message)
        indexed = {blob_id for blob_id, _ in self.blobs}
        for blob_id in listed.keys() - indexed:
            if self.repo.index.lookup(blob_id) is None:
                message = (
                    f"blob {blob_id.hex()} of pack {self.pack_id.hex()} is in no index object; "
                    f"`cas repair index` adds it"
                )
                self.report.findings.append(
                    Finding(
                        "unindexed-blob",
                        message,
                        self.pack_id.hex(),
                        blob_id.hex(),
                        severity=WARNING,
                    )
                )

    def _check_blobs(self, blobs: PackBlobs, key_mode: int, salt: bytes, data: bytes) -> None:
        try:
            opener = BlobOpener(self.repo.keys, self.pack_id, key_mode, salt)
        except CasError as exc:
            self._whole_pack_finding(f"pack {self.pack_id.hex()} cannot be opened: {exc}")
            return
        view = memoryview(data)
        for blob_id, loc in blobs:
            stored = view[loc.offset : loc.offset + loc.stored_size]
            try:
                opener.open(
                    blob_id, loc.blob_type, loc.codec, loc.filter, loc.raw_size, loc.offset, stored
                )
            except CasError as exc:
                self._blob_finding("damaged-blob", blob_id, str(exc))
                continue
            self.report.blobs_read += 1
            self.report.bytes_read += loc.stored_size
