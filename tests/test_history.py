"""Tag changes, snapshot filters, find and stats through the library, on real repositories.

Tag changes are interrupted with `FaultyBackend`, which fails every write from a chosen
one on, as if the process had died there.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import PASSWORD, fast_kdf
from faulty_backend import FaultyBackend

from cas.archiver import Archiver, SnapshotOptions
from cas.backend import open_backend
from cas.checker import check_repository
from cas.copy import Copier
from cas.errors import BackendError, UsageError
from cas.gc import GarbageCollector, GcOptions
from cas.history import PathFinder, TagChange, change_tags, delete_replaced, make_filter
from cas.locks import RepositoryLock
from cas.repair import repair_snapshots
from cas.repository import Repository
from cas.snapshot import SNAPSHOT_PREFIX, Snapshot, validate_labels
from cas.stats import repository_stats, snapshot_stats

KIB = 1 << 10


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def take(repo: Repository, source: Path, **options: object) -> Snapshot:
    return Archiver(repo, SnapshotOptions(**options)).run([str(source)]).snapshot  # type: ignore[arg-type]


def reopen(repo: Repository, cache: Path, fail_at: int | None = None) -> Repository:
    url = str(repo.backend.url)
    backend = FaultyBackend(open_backend(url), fail_at=fail_at)
    return Repository.open(url, PASSWORD.encode(), cache_dir=cache, backend=backend)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    write_files(root, {"model.bin": random_bytes(100 * KIB, 1), "cfg/config.json": b"{}\n"})
    return root


# Tag changes


def test_tag_add_remove_set(repo: Repository, source: Path) -> None:
    first = take(repo, source, tags=["run-7"])

    added = change_tags(repo, [first.snapshot_hex], TagChange(add=("best",)))
    new = added.changed[0][1]
    removed = change_tags(repo, [new.snapshot_hex], TagChange(remove=("run-7",)))
    newer = removed.changed[0][1]
    replaced = change_tags(repo, [newer.snapshot_hex], TagChange(set_tags=("a", "b")))
    newest = replaced.changed[0][1]

    assert new.tags == ("run-7", "best")
    assert newer.tags == ("best",)
    assert newest.tags == ("a", "b")
    assert [s.snapshot_hex for s in repo.list_snapshots()] == [newest.snapshot_hex]
    assert repo.snapshot_names() == [newest.snapshot_hex]
    assert newest.time == first.time
    assert newest.tree_id == first.tree_id


def test_tag_unchanged_writes_nothing(repo: Repository, source: Path) -> None:
    first = take(repo, source, tags=["best"])

    result = change_tags(repo, ["latest"], TagChange(add=("best",)))

    assert result.changed == []
    assert [s.snapshot_hex for s in result.unchanged] == [first.snapshot_hex]
    assert repo.snapshot_names() == [first.snapshot_hex]


def test_tag_old_id_follows_replacement(repo: Repository, source: Path) -> None:
    first = take(repo, source)
    change_tags(repo, [first.snapshot_hex], TagChange(add=("x",)))

    second = change_tags(repo, [first.snapshot_hex[:12]], TagChange(add=("y",)))

    assert second.changed[0][1].tags == ("x", "y")
    assert len(repo.list_snapshots()) == 1


@pytest.mark.parametrize(
    "change",
    [TagChange(), TagChange(add=("a b",)), TagChange(set_tags=("a",), add=("b",))],
    ids=["empty", "space", "set-and-add"],
)
def test_tag_change_invalid(repo: Repository, source: Path, change: TagChange) -> None:
    take(repo, source)

    with pytest.raises(UsageError):
        change_tags(repo, ["latest"], change)


def test_tag_interrupted_before_delete(repo: Repository, source: Path, tmp_path: Path) -> None:
    first = take(repo, source, tags=["run-7"])
    # Write 1 is the new snapshot object, write 2 the deletion of the old one.
    faulty = reopen(repo, tmp_path / "c1", fail_at=2)

    with faulty, pytest.raises(BackendError):
        change_tags(faulty, ["latest"], TagChange(add=("best",)))

    with reopen(repo, tmp_path / "c2") as fresh:
        visible = fresh.list_snapshots()
        objects = fresh.snapshot_names()
        replaced = dict(fresh.replaced_snapshots)
    assert len(objects) == 2
    assert [s.tags for s in visible] == [("run-7", "best")]
    assert replaced == {first.snapshot_hex: visible[0].snapshot_hex}


def test_tag_interrupted_before_write(repo: Repository, source: Path, tmp_path: Path) -> None:
    first = take(repo, source, tags=["run-7"])
    faulty = reopen(repo, tmp_path / "c1", fail_at=1)

    with faulty, pytest.raises(BackendError):
        change_tags(faulty, ["latest"], TagChange(add=("best",)))

    with reopen(repo, tmp_path / "c2") as fresh:
        visible = fresh.list_snapshots()
    assert [s.snapshot_hex for s in visible] == [first.snapshot_hex]
    assert visible[0].tags == ("run-7",)


def test_tag_leftover_removed_by_next_tag(repo: Repository, source: Path, tmp_path: Path) -> None:
    take(repo, source)
    with reopen(repo, tmp_path / "c1", fail_at=2) as faulty, pytest.raises(BackendError):
        change_tags(faulty, ["latest"], TagChange(add=("a",)))

    result = change_tags(repo, ["latest"], TagChange(add=("b",)))

    assert result.replaced_deleted == 2
    assert len(repo.snapshot_names()) == 1
    assert repo.list_snapshots()[0].tags == ("a", "b")


def test_tag_under_other_lock_leaves_hidden(repo: Repository, source: Path) -> None:
    first = take(repo, source)
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot"):
        result = change_tags(repo, ["latest"], TagChange(add=("a",)))

    assert result.replaced_left == 1
    assert first.snapshot_hex in repo.snapshot_names()
    assert [s.tags for s in repo.list_snapshots()] == [("a",)]


def test_tag_chain_keeps_earlier_hidden(repo: Repository, source: Path) -> None:
    first = take(repo, source)
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot"):
        change_tags(repo, ["latest"], TagChange(add=("a",)))
        result = change_tags(repo, ["latest"], TagChange(add=("b",)))
    newest = result.changed[0][1]
    # Deleting only the middle object must not bring the first back.
    middle = result.changed[0][0]
    repo.backend.delete(SNAPSHOT_PREFIX + middle.snapshot_hex)

    visible = repo.list_snapshots()

    assert first.snapshot_id in newest.replaces
    assert [s.snapshot_hex for s in visible] == [newest.snapshot_hex]


def test_part_tag_kept_on_set(repo: Repository, source: Path) -> None:
    take(repo, source, part="rank0")

    result = change_tags(repo, ["latest"], TagChange(set_tags=("best",)))

    assert result.changed[0][1].tags == ("part:rank0", "best")


def test_prune_leftover_stays_gone(repo: Repository, source: Path) -> None:
    first = take(repo, source)
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot"):
        change_tags(repo, ["latest"], TagChange(add=("a",)))
    repo.list_snapshots()
    with RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="prune"):
        deleted = delete_replaced(repo)

    assert deleted == 1
    assert first.snapshot_hex not in repo.snapshot_names()
    assert len(repo.list_snapshots()) == 1


def test_gc_keeps_data_of_replaced(repo: Repository, source: Path) -> None:
    take(repo, source)
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot"):
        change_tags(repo, ["latest"], TagChange(add=("a",)))

    result = GarbageCollector(repo, GcOptions(max_unused=0.0)).run()
    snapshot = repo.list_snapshots()[0]

    assert result.missing_blobs == 0
    assert result.packs_deleted == 0
    assert repo.load_tree(snapshot.tree_id)


def test_copy_takes_visible_only(repo: Repository, source: Path, tmp_path: Path) -> None:
    take(repo, source)
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot"):
        change_tags(repo, ["latest"], TagChange(add=("a",)))
    target = Repository.init(
        str(tmp_path / "target"), PASSWORD.encode(), cache_dir=tmp_path / "tc", kdf=fast_kdf()
    )

    with target:
        copier = Copier(repo, target)
        result = copier.run(copier.select([]))
        copied = target.list_snapshots()

    assert len(result.copied) == 1
    assert [s.tags for s in copied] == [("a",)]


# Labels


@pytest.mark.parametrize(
    ("tags", "message", "meta"),
    [
        (["a,b"], "", {}),
        (["x" * 129], "", {}),
        ([""], "", {}),
        ([], "m" * 65537, {}),
        ([], "", {"1abc": "v"}),
        ([], "", {"cas.part": "v"}),
        ([], "", {"lr": "v" * 4097}),
    ],
    ids=["comma", "long-tag", "empty-tag", "long-message", "key-digit", "reserved", "long-value"],
)
def test_labels_invalid(tags: list[str], message: str, meta: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        validate_labels(tags, message, meta)


def test_labels_valid() -> None:
    validate_labels(["run-7", "part:x", "v1.2+b@host"], "step 12000", {"lr": "3e-4", "git.sha": ""})


# Filters


def make_snapshot(host: str, tags: tuple[str, ...], meta: dict[str, str], paths=(b"/c",)):
    return Snapshot(
        bytes(32), "2026-01-01T00:00:00+00:00", host, "u", paths, bytes(32), tags, "", meta
    )


def test_filter_kinds_combine() -> None:
    wanted = make_filter(["best,run-7", "keep"], ["a", "b"], ["/c"], ["lr=3e-4"])
    match = make_snapshot("a", ("best", "run-7"), {"lr": "3e-4"})
    other_tag_set = make_snapshot("b", ("keep",), {"lr": "3e-4"})
    half_tags = make_snapshot("a", ("best",), {"lr": "3e-4"})
    wrong_host = make_snapshot("z", ("keep",), {"lr": "3e-4"})
    wrong_meta = make_snapshot("a", ("keep",), {"lr": "1e-3"})
    wrong_path = make_snapshot("a", ("keep",), {"lr": "3e-4"}, paths=(b"/d",))

    assert wanted.matches(match)
    assert wanted.matches(other_tag_set)
    assert not wanted.matches(half_tags)
    assert not wanted.matches(wrong_host)
    assert not wanted.matches(wrong_meta)
    assert not wanted.matches(wrong_path)


def test_filter_invalid_meta() -> None:
    with pytest.raises(UsageError, match="KEY=VALUE"):
        make_filter([], [], [], ["lr"])


# Find


def test_find_walks_each_tree_once(repo: Repository, source: Path) -> None:
    take(repo, source)
    take(repo, source, tags=["again"])
    finder = PathFinder(repo, "*.json")

    found = [finder.find(snapshot) for snapshot in repo.list_snapshots()]

    assert [[m.path for m in matches] for matches in found] == [["/cfg/config.json"]] * 2
    assert finder.trees_walked == 2


def test_find_full_path_pattern(repo: Repository, source: Path) -> None:
    snapshot = take(repo, source)

    anywhere = [m.path for m in PathFinder(repo, "cfg/*").find(snapshot)]
    rooted = [m.path for m in PathFinder(repo, "/model.*").find(snapshot)]
    folded = [m.path for m in PathFinder(repo, "MODEL.BIN", ignore_case=True).find(snapshot)]

    assert anywhere == ["/cfg/config.json"]
    assert rooted == ["/model.bin"]
    assert folded == ["/model.bin"]


# Stats


def test_stats_known_sizes(repo: Repository, tmp_path: Path) -> None:
    root = tmp_path / "s"
    write_files(root, {"a.bin": random_bytes(100 * KIB, 5)})
    first = take(repo, root)
    write_files(root, {"b.bin": random_bytes(50 * KIB, 6)})
    second = take(repo, root)
    snapshots = repo.list_snapshots()

    whole = repository_stats(repo, snapshots)
    single = snapshot_stats(repo, second, snapshots)
    b_chunks = next(n for n in repo.load_tree(second.tree_id) if n.name == b"b.bin").chunk_ids
    b_stored = sum(repo.index.lookup(c).stored_size for c in b_chunks)  # type: ignore[union-attr]
    tree_stored = repo.index.lookup(second.tree_id).stored_size  # type: ignore[union-attr]

    assert whole.logical_size == 250 * KIB
    assert whole.blobs.chunk_raw_size == 150 * KIB
    assert whole.dedup_ratio == round(250 / 150, 3)
    assert [s.logical_size for s in whole.snapshots] == [100 * KIB, 150 * KIB]
    assert whole.snapshots[0].snapshot == first
    assert single.logical_size == 150 * KIB
    assert single.file_count == 2
    assert single.unique_size == b_stored + tree_stored
    assert single.blobs is not None
    assert single.blobs.chunk_raw_size == 150 * KIB
    assert single.dedup_ratio == 1.0
    assert single.compression_ratio is not None
    assert 0.9 < single.compression_ratio <= 1.0


def test_repair_deletes_replaced_leftover(repo: Repository, source: Path) -> None:
    first = take(repo, source)
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot"):
        change_tags(repo, ["latest"], TagChange(add=("a",)))

    repairs = repair_snapshots(repo)

    assert repairs == []
    assert first.snapshot_hex not in repo.snapshot_names()
    assert [s.tags for s in repo.list_snapshots()] == [("a",)]


def test_check_counts_replaced_leftover(repo: Repository, source: Path) -> None:
    take(repo, source)
    with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot"):
        change_tags(repo, ["latest"], TagChange(add=("a",)))

    report = check_repository(repo)

    assert report.ok
    assert report.warnings == []
    assert report.snapshots == 2
    assert report.replaced_snapshots == 1
