"""`cas check`: pack headers against the index, unreferenced packs, data subsets, one read per pack.

Each case builds a real repository with real packs and LMDB cache, changes one object the
way damage or a crashed writer would, and checks what the checker reports. Flipped and
truncated packs are covered in test_damage.py; the cases here are the ones only the
comparison of pack headers with index objects can find.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cas.archiver import Archiver, SnapshotOptions
from cas.backend import Backend
from cas.checker import CheckReport, DataSubset, check_repository, parse_subset
from cas.errors import UsageError
from cas.index import INDEX_PREFIX, pack_name
from cas.objects import ObjectKind, encode_object
from cas.pack import BlobType, Codec, PackEntry, PackWriter
from cas.repository import Repository

KIB = 1 << 10
PackList = list[tuple[bytes, list[PackEntry]]]


def write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return folder


def take_snapshot(repo: Repository, folder: Path) -> str:
    result = Archiver(repo, SnapshotOptions(threads=1)).run([str(folder)])
    return result.snapshot.snapshot_hex


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def read_all_index_packs(repo: Repository) -> PackList:
    packs: PackList = []
    for info in repo.backend.list(INDEX_PREFIX):
        found, _ = repo.index.read_index_object(info.name)
        packs.extend(found)
    return packs


def replace_index(repo: Repository, edit: Callable[[PackList], PackList]) -> None:
    """Replace every index object by one holding ``edit`` of their packs, then resync."""
    packs = edit(read_all_index_packs(repo))
    old = [info.name for info in repo.backend.list(INDEX_PREFIX)]
    name = INDEX_PREFIX + os.urandom(32).hex()
    body = {
        "v": 1,
        "packs": [[pack_id, [entry.to_list() for entry in entries]] for pack_id, entries in packs],
        "supersedes": [],
    }
    repo.backend.put(name, encode_object(repo.keys, ObjectKind.INDEX, name, body))
    for old_name in old:
        repo.backend.delete(old_name)
    repo.index.sync()


def kinds(report: CheckReport) -> list[str]:
    return sorted(finding.kind for finding in report.findings)


@pytest.fixture
def two_files(repo: Repository, tmp_path: Path) -> str:
    source = write_tree(
        tmp_path / "src",
        {"a.bin": random_bytes(300 * KIB, 1), "sub/b.bin": random_bytes(300 * KIB, 2)},
    )
    return take_snapshot(repo, source)


def chunk_pack(repo: Repository) -> bytes:
    """Return the id of the one data pack of the repository."""
    packs = {pid for pid, entries in read_all_index_packs(repo) if entries[0].blob_type == 0}
    assert len(packs) == 1
    return packs.pop()


# Clean repositories


def test_clean_repository(repo, two_files):
    report = check_repository(repo, read_data=True)

    assert report.findings == []
    assert report.snapshots == 1
    assert report.packs == 2
    assert report.packs_read == 2
    assert report.index_objects == 1
    assert report.blobs_read == repo.index.cache.count()


def test_clean_repository_cli(cli_repo, run_cas, tmp_path):
    source = write_tree(tmp_path / "src", {"x.bin": random_bytes(100 * KIB, 3)})
    run_cas("snapshot", source, "--quiet")

    output = json.loads(run_cas("check", "--read-data", "--json").stdout)

    assert output["ok"] is True
    assert output["errors"] == 0
    assert output["warnings"] == 0
    assert output["packs_read"] == output["packs"] == 2


# Packs and the index disagree


def test_unreferenced_pack_is_warning(repo, two_files):
    writer = PackWriter(repo.keys, 1 << 20, 64 * KIB)
    content = random_bytes(5000, 9)
    writer.add(BlobType.CHUNK, repo.keys.blob_id(content), content, Codec.NONE, len(content))
    repo.backend.put(pack_name(writer.pack_id), writer.finish())

    report = check_repository(repo)

    assert report.ok
    assert kinds(report) == ["unreferenced-pack"]
    assert report.findings[0].severity == "warning"
    assert report.findings[0].pack_hex == writer.pack_id.hex()


def test_unreferenced_pack_cli_exit_code(cli_repo, run_cas, tmp_path):
    source = write_tree(tmp_path / "src", {"x.bin": random_bytes(10 * KIB, 3)})
    run_cas("snapshot", source, "--quiet")
    with Repository.open(
        str(cli_repo.repo), cli_repo.password.encode(), cache_dir=tmp_path / "c"
    ) as repo:
        writer = PackWriter(repo.keys, 1 << 20, 64 * KIB)
        writer.add(BlobType.CHUNK, repo.keys.blob_id(b"z" * 100), b"z" * 100, Codec.NONE, 100)
        repo.backend.put(pack_name(writer.pack_id), writer.finish())

    result = run_cas("check", expect=1)

    assert "warning: unreferenced-pack" in result.stderr


def test_index_entry_differs_from_header(repo, two_files):
    data_pack = chunk_pack(repo)
    moved: list[bytes] = []

    def shift_first_entry(packs: PackList) -> PackList:
        edited = []
        for pack_id, entries in packs:
            if pack_id == data_pack:
                first = entries[0]
                moved.append(first.blob_id)
                entries = [replace(first, raw_size=first.raw_size + 1), *entries[1:]]
            edited.append((pack_id, entries))
        return edited

    replace_index(repo, shift_first_entry)
    report = check_repository(repo, read_data=True)

    assert kinds(report) == ["damaged-blob", "index-mismatch"]
    mismatch = next(f for f in report.findings if f.kind == "index-mismatch")
    assert mismatch.blob_hex == moved[0].hex()
    assert mismatch.pack_hex == data_pack.hex()
    assert mismatch.paths == ("/a.bin",)
    assert mismatch.snapshots == (two_files,)


def test_index_entry_beyond_pack_end(repo, two_files):
    data_pack = chunk_pack(repo)
    size = repo.backend.size(pack_name(data_pack))

    def move_last_entry(packs: PackList) -> PackList:
        edited = []
        for pack_id, entries in packs:
            if pack_id == data_pack:
                last = entries[-1]
                entries = [*entries[:-1], replace(last, offset=size)]
            edited.append((pack_id, entries))
        return edited

    replace_index(repo, move_last_entry)
    report = check_repository(repo)

    assert kinds(report) == ["truncated-pack"]
    assert report.findings[0].paths == ("/sub/b.bin",)


def test_blob_missing_from_index(repo, two_files):
    data_pack = chunk_pack(repo)

    def drop_first_entry(packs: PackList) -> PackList:
        return [
            (pack_id, entries[1:] if pack_id == data_pack else entries)
            for pack_id, entries in packs
        ]

    replace_index(repo, drop_first_entry)
    report = check_repository(repo)

    assert kinds(report) == ["missing-blob", "unindexed-blob"]
    unindexed = next(f for f in report.findings if f.kind == "unindexed-blob")
    assert unindexed.severity == "warning"
    missing = next(f for f in report.findings if f.kind == "missing-blob")
    assert missing.severity == "error"
    assert missing.paths == ("/a.bin",)


def test_damaged_unused_blob_is_warning(repo, tmp_path):
    """A blob that no snapshot uses any more loses nothing when it is damaged."""
    source = write_tree(tmp_path / "src", {"a.bin": random_bytes(50 * KIB, 4)})
    snapshot_hex = take_snapshot(repo, source)
    repo.backend.delete("snapshots/" + snapshot_hex)
    pack = chunk_pack(repo)
    path = Path(repo.backend.url) / pack_name(pack)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))

    report = check_repository(repo, read_data=True)

    assert report.ok
    assert kinds(report) == ["damaged-blob"]
    assert report.findings[0].severity == "warning"


def test_lost_subtree_names_folder(repo, two_files):
    snapshot = repo.load_snapshot(two_files)
    sub = next(node for node in repo.load_tree(snapshot.tree_id) if node.name == b"sub")

    def drop_subtree(packs: PackList) -> PackList:
        return [
            (pack_id, [entry for entry in entries if entry.blob_id != sub.subtree])
            for pack_id, entries in packs
        ]

    replace_index(repo, drop_subtree)
    repo._trees.clear()
    report = check_repository(repo)

    tree_findings = [f for f in report.findings if f.kind == "tree"]
    assert len(tree_findings) == 1
    assert tree_findings[0].paths == ("/sub",)
    assert tree_findings[0].blob_hex == sub.subtree.hex()


# Reading data: subsets and one request per pack


class CountingBackend(Backend):
    """Passes every call to a real backend and counts reads per object name."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.url = inner.url
        self.reads: Counter[str] = Counter()

    def put(self, name, data, *, overwrite=False):
        self.inner.put(name, data, overwrite=overwrite)

    def get(self, name, offset=0, length=None):
        self.reads[name] += 1
        return self.inner.get(name, offset, length)

    def read_into(self, name, offset, view):
        self.reads[name] += 1
        self.inner.read_into(name, offset, view)

    def size(self, name):
        return self.inner.size(name)

    def list(self, prefix):
        return self.inner.list(prefix)

    def delete(self, name):
        self.inner.delete(name)


@pytest.fixture
def many_packs(repo: Repository, tmp_path: Path) -> str:
    """A snapshot whose chunks fill about six 1 MiB data packs."""
    source = write_tree(tmp_path / "src", {f"f{i}.bin": random_bytes(1 << 20, i) for i in range(6)})
    return take_snapshot(repo, source)


def data_packs(repo: Repository) -> set[str]:
    """Return the names of the packs that hold chunks; the walk of the trees reads tree packs."""
    return {
        pack_name(pid)
        for pid, entries in read_all_index_packs(repo)
        if entries[0].blob_type == BlobType.CHUNK
    }


def test_read_data_one_request_per_pack(repo, many_packs):
    counting = CountingBackend(repo.backend)
    repo.backend = counting

    report = check_repository(repo, read_data=True)

    chunk_packs = data_packs(repo)
    pack_reads = {name: count for name, count in counting.reads.items() if name in chunk_packs}
    assert report.ok
    assert set(pack_reads) == chunk_packs
    assert set(pack_reads.values()) == {1}
    assert report.blobs_read == repo.index.cache.count()


def test_structure_check_reads_headers_only(repo, many_packs):
    counting = CountingBackend(repo.backend)
    repo.backend = counting

    report = check_repository(repo)

    chunk_packs = data_packs(repo)
    pack_reads = {name: count for name, count in counting.reads.items() if name in chunk_packs}
    assert report.ok
    assert report.blobs_read == 0
    assert set(pack_reads) == chunk_packs
    # prologue, trailer, header
    assert set(pack_reads.values()) == {3}


def test_subset_parts_cover_every_pack_once(repo, many_packs):
    all_packs = data_packs(repo)
    assert len(all_packs) >= 5, "the test needs packs in several parts of the id space"
    seen: list[str] = []
    for part in range(1, 4):
        counting = CountingBackend(repo.backend)
        repo.backend = counting
        check_repository(repo, subset=parse_subset(f"{part}/3"))
        # A data read fetches the whole pack in one request; a header check takes three.
        seen.extend(
            name for name, count in counting.reads.items() if count == 1 and name in all_packs
        )
        repo.backend = counting.inner

    assert sorted(seen) == sorted(all_packs)


def test_subset_by_id_range():
    low, high = bytes(32), b"\xff" * 32
    middle = b"\x80" + bytes(31)

    assert DataSubset(1, 2).select([low, middle, high]) == {low}
    assert DataSubset(2, 2).select([low, middle, high]) == {middle, high}
    assert DataSubset(1, 1).select([low, middle, high]) == {low, middle, high}


def test_subset_percent_reads_share(repo, many_packs):
    some = check_repository(repo, subset=parse_subset("1%"))
    every = check_repository(repo, subset=parse_subset("100%"))

    assert some.packs_read == 1
    assert every.packs_read == every.packs == len(data_packs(repo)) + 1


@pytest.mark.parametrize("text", ["0/3", "4/3", "x/3", "1/0", "0%", "101%", "abc", "1/"])
def test_subset_invalid(text):
    with pytest.raises(UsageError, match="invalid data subset"):
        parse_subset(text)


def test_subset_invalid_cli_exit_code(cli_repo, run_cas):
    result = run_cas("check", "--read-data-subset", "5/4", expect=2)

    assert "invalid data subset" in result.stderr


def test_subset_cli_damage_found_in_its_part(cli_repo, run_cas, tmp_path):
    source = write_tree(tmp_path / "src", {"x.bin": random_bytes(100 * KIB, 3)})
    run_cas("snapshot", source, "--quiet")
    with Repository.open(
        str(cli_repo.repo), cli_repo.password.encode(), cache_dir=tmp_path / "c"
    ) as repo:
        pack = chunk_pack(repo)
    path = cli_repo.repo / pack_name(pack)
    data = bytearray(path.read_bytes())
    data[200] ^= 1
    path.write_bytes(bytes(data))
    part = (int.from_bytes(pack, "big") * 4 >> 256) + 1
    other = part % 4 + 1

    found = json.loads(
        run_cas("check", "--read-data-subset", f"{part}/4", "--json", expect=3).stdout
    )
    missed = json.loads(run_cas("check", "--read-data-subset", f"{other}/4", "--json").stdout)

    assert [f["kind"] for f in found["findings"]] == ["damaged-blob"]
    assert found["findings"][0]["paths"] == ["/x.bin"]
    assert missed["findings"] == []


def test_finding_names_every_snapshot(repo, tmp_path):
    """Two snapshots share an unchanged folder; damage in it names both and both paths."""
    source = write_tree(tmp_path / "src", {"same/a.bin": random_bytes(50 * KIB, 5)})
    first = take_snapshot(repo, source)
    (source / "other.bin").write_bytes(b"new file")
    second = Archiver(repo, SnapshotOptions(threads=1, parent=first)).run([str(source)])
    pack = chunk_pack_of(repo, "same/a.bin", first)
    path = Path(repo.backend.url) / pack_name(pack)
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))

    report = check_repository(repo, read_data=True)

    [finding] = report.findings
    assert finding.kind == "damaged-blob"
    assert finding.snapshots == tuple(sorted([first, second.snapshot.snapshot_hex]))
    assert finding.paths == ("/same/a.bin",)


def chunk_pack_of(repo: Repository, path: str, snapshot_hex: str) -> bytes:
    tree_id = repo.load_snapshot(snapshot_hex).tree_id
    *folders, name = path.split("/")
    for folder in folders:
        tree_id = next(n for n in repo.load_tree(tree_id) if n.name == folder.encode()).subtree
    node = next(n for n in repo.load_tree(tree_id) if n.name == name.encode())
    location = repo.index.lookup(node.chunk_ids[0])
    assert location is not None
    return location.pack_id
