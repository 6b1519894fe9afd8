"""Garbage collection against real repositories: what it deletes and repacks, duplicates,
snapshots that appear while it runs, and a failure injected at every write of gc and of a
snapshot."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import blake3
import pytest
from conftest import PASSWORD, SMALL_CHUNKER, fast_kdf
from faulty_backend import FaultyBackend

from cas.archiver import Archiver, SnapshotOptions
from cas.backend import LocalBackend
from cas.checker import check_repository
from cas.errors import CasError, LockedError
from cas.gc import GarbageCollector, GcOptions, measure_unused
from cas.index import INDEX_PREFIX, pack_name
from cas.locks import RepositoryLock
from cas.pack import BlobType, Codec, PackWriter
from cas.repository import Repository
from cas.restorer import CheckoutOptions, Restorer
from cas.snapshot import SNAPSHOT_PREFIX, Snapshot
from cas.tree import Node, encode_tree

KIB = 1 << 10
MIB = 1 << 20


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def init_repo(path: Path, cache: Path) -> Repository:
    return Repository.init(
        str(path),
        PASSWORD.encode(),
        cache_dir=cache,
        chunker=SMALL_CHUNKER,
        pack_size=MIB,
        kdf=fast_kdf(),
    )


def open_repo(path: Path, cache: Path, backend=None) -> Repository:
    return Repository.open(str(path), PASSWORD.encode(), cache_dir=cache, backend=backend)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    """Make ``root`` hold exactly ``files``."""
    if root.exists():
        shutil.rmtree(root)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def take(repo: Repository, source: Path, tags=()) -> Snapshot:
    options = SnapshotOptions(threads=1, tags=list(tags))
    return Archiver(repo, options).run([str(source)]).snapshot


def assert_restores(repo: Repository, snapshot: Snapshot, files: dict[str, bytes], dest: Path):
    """Check out ``snapshot`` into ``dest`` and compare every file byte for byte."""
    result = Restorer(repo, snapshot, str(dest), CheckoutOptions(threads=1)).run()
    assert result.failed == (), f"snapshot {snapshot.snapshot_hex[:12]}: {result.failed}"
    restored = {
        str(path.relative_to(dest)): path.read_bytes() for path in dest.rglob("*") if path.is_file()
    }
    assert sorted(restored) == sorted(files)
    for rel, content in files.items():
        assert restored[rel] == content, f"{rel} differs in {snapshot.snapshot_hex[:12]}"
    shutil.rmtree(dest)


def pack_hexes(repo_path: Path) -> set[str]:
    return {path.name for path in (repo_path / "data").glob("*/*") if len(path.name) == 64}


def reachable_blobs(repo: Repository) -> set[bytes]:
    """Walk every snapshot's trees, independently of cas.gc."""
    found: set[bytes] = set()
    for snapshot in repo.list_snapshots():
        pending = [snapshot.tree_id]
        while pending:
            tree_id = pending.pop()
            found.add(tree_id)
            for node in repo.load_tree(tree_id):
                if node.type == "dir":
                    pending.append(node.subtree)
                found.update(node.chunk_ids)
    return found


def indexed_packs(repo: Repository) -> dict[str, list[tuple[bytes, int]]]:
    """Return pack hex -> [(blob id, stored size)] over every index object."""
    packs: dict[str, list[tuple[bytes, int]]] = {}
    for info in repo.backend.list(INDEX_PREFIX):
        listed, _ = repo.index.read_index_object(info.name)
        for pack_id, entries in listed:
            rows = packs.setdefault(pack_id.hex(), [])
            rows.extend((entry.blob_id, entry.stored_size) for entry in entries)
    return packs


def delete_snapshot(repo: Repository, snapshot: Snapshot) -> None:
    repo.backend.delete(SNAPSHOT_PREFIX + snapshot.snapshot_hex)


def assert_clean(repo_path: Path, cache: Path) -> None:
    with open_repo(repo_path, cache) as repo:
        report = check_repository(repo, read_data=True)
    assert report.ok, [finding.message for finding in report.findings]


# Three versions of a checkpoint: the second changes the middle of the model and adds a file,
# the third changes another range and drops that file.
def versions() -> list[dict[str, bytes]]:
    model = bytearray(random_bytes(1536 * KIB, 1))
    first = {"model.bin": bytes(model), "opt/state.bin": random_bytes(512 * KIB, 2)}
    model[500 * KIB : 900 * KIB] = random_bytes(400 * KIB, 3)
    second = {**first, "model.bin": bytes(model), "extra.bin": random_bytes(512 * KIB, 4)}
    model[100 * KIB : 300 * KIB] = random_bytes(200 * KIB, 5)
    third = {"model.bin": bytes(model), "opt/state.bin": first["opt/state.bin"]}
    return [first, second, third]


def build_scenario(root: Path) -> tuple[Path, dict[str, dict[str, bytes]]]:
    """Create a repository with three snapshots, the first pruned; return it and the kept files."""
    repo_path, source = root / "repo", root / "src"
    kept: dict[str, dict[str, bytes]] = {}
    with init_repo(repo_path, root / "cache") as repo:
        snapshots = []
        for files in versions():
            write_files(source, files)
            snapshots.append(take(repo, source))
        delete_snapshot(repo, snapshots[0])
        for snapshot, files in zip(snapshots[1:], versions()[1:], strict=True):
            kept[snapshot.snapshot_hex] = files
    return repo_path, kept


def verify_kept(repo_path: Path, cache: Path, kept: dict[str, dict[str, bytes]], dest: Path):
    with open_repo(repo_path, cache) as repo:
        for snapshot_hex, files in kept.items():
            assert_restores(repo, repo.load_snapshot(snapshot_hex), files, dest)


# What gc deletes and repacks


def test_gc_deletes_exactly_unreachable_packs(tmp_path):
    repo_path, kept = build_scenario(tmp_path)
    with open_repo(repo_path, tmp_path / "c1") as repo:
        live = reachable_blobs(repo)
        packs = indexed_packs(repo)
        dead = {pack for pack, rows in packs.items() if not any(b in live for b, _ in rows)}
        before = pack_hexes(repo_path)
        result = GarbageCollector(repo, GcOptions(max_unused=1.0)).run()
    assert dead, "the scenario must leave packs with nothing live"
    assert before - pack_hexes(repo_path) == dead
    assert result.packs_deleted == len(dead)
    assert result.packs_repacked == 0
    verify_kept(repo_path, tmp_path / "c2", kept, tmp_path / "out")
    assert_clean(repo_path, tmp_path / "c3")


def test_gc_repacks_by_threshold(tmp_path):
    repo_path, kept = build_scenario(tmp_path)
    threshold = 0.10
    with open_repo(repo_path, tmp_path / "c1") as repo:
        live = reachable_blobs(repo)
        sizes = {info.name.rsplit("/", 1)[1]: info.size for info in repo.backend.list("data/")}
        above, below = set(), set()
        for pack, rows in indexed_packs(repo).items():
            live_bytes = sum(size for blob, size in rows if blob in live)
            unused = sum(size for _, size in rows) - live_bytes
            if live_bytes and unused > threshold * sizes[pack]:
                above.add(pack)
            elif live_bytes:
                below.add(pack)
        assert above and below, "the scenario must have packs on both sides of the threshold"
        result = GarbageCollector(repo, GcOptions(max_unused=threshold)).run()
    remaining = pack_hexes(repo_path)
    assert not above & remaining
    assert below <= remaining
    assert result.packs_repacked == len(above)
    assert result.packs_written >= 1
    verify_kept(repo_path, tmp_path / "c2", kept, tmp_path / "out")
    assert_clean(repo_path, tmp_path / "c3")
    with open_repo(repo_path, tmp_path / "c4") as repo:
        again = GarbageCollector(repo, GcOptions(max_unused=threshold)).run()
    assert (again.packs_deleted, again.packs_repacked) == (0, 0)


def test_gc_zero_threshold_leaves_no_unused(tmp_path):
    repo_path, kept = build_scenario(tmp_path)
    with open_repo(repo_path, tmp_path / "c1") as repo:
        assert measure_unused(repo).unused_bytes > 0
        GarbageCollector(repo, GcOptions(max_unused=0.0)).run()
    with open_repo(repo_path, tmp_path / "c2") as repo:
        plan = measure_unused(repo)
        assert plan.unused_bytes == 0
        assert {pack.hex() for pack in plan.packs} == pack_hexes(repo_path)
        assert len(list(repo.backend.list(INDEX_PREFIX))) == 1
    verify_kept(repo_path, tmp_path / "c3", kept, tmp_path / "out")


def test_gc_dry_run_changes_nothing(tmp_path):
    repo_path, _kept = build_scenario(tmp_path)
    listing = sorted(str(path) for path in repo_path.rglob("*") if path.is_file())
    with open_repo(repo_path, tmp_path / "c1") as repo:
        preview = GarbageCollector(repo, GcOptions(max_unused=0.0, dry_run=True)).run()
    assert sorted(str(path) for path in repo_path.rglob("*") if path.is_file()) == listing
    with open_repo(repo_path, tmp_path / "c2") as repo:
        result = GarbageCollector(repo, GcOptions(max_unused=0.0)).run()
    assert preview.packs_deleted == result.packs_deleted > 0
    assert preview.packs_repacked == result.packs_repacked > 0
    assert preview.bytes_deleted == result.bytes_deleted


def test_gc_shared_blobs_many_snapshots(tmp_path):
    files = {"weights.bin": random_bytes(MIB, 7)}
    with init_repo(tmp_path / "repo", tmp_path / "cache") as repo:
        write_files(tmp_path / "src", files)
        snapshots = [take(repo, tmp_path / "src", tags=[str(n)]) for n in range(4)]
        for snapshot in snapshots[:3]:
            delete_snapshot(repo, snapshot)
        before = pack_hexes(tmp_path / "repo")
        result = GarbageCollector(repo, GcOptions(max_unused=0.0)).run()
    assert pack_hexes(tmp_path / "repo") == before
    assert (result.packs_deleted, result.packs_repacked) == (0, 0)
    with open_repo(tmp_path / "repo", tmp_path / "c2") as repo:
        assert_restores(repo, snapshots[3], files, tmp_path / "out")


def add_duplicate_pack(repo: Repository, blob_id: bytes, plain: bytes, copies: int) -> str:
    """Publish a pack that contains ``blob_id`` ``copies`` times, and an index object for it."""
    writer = PackWriter(repo.keys, MIB, SMALL_CHUNKER.max_size)
    for _ in range(copies):
        writer.add(BlobType.CHUNK, blob_id, plain, Codec.NONE, len(plain))
    repo.backend.put(pack_name(writer.pack_id), writer.finish())
    repo.index.add_pack(writer.pack_id, list(writer.entries))
    repo.index.flush()
    return writer.pack_id.hex()


def test_gc_blob_stored_many_times(tmp_path):
    files = {"weights.bin": random_bytes(200 * KIB, 8)}
    with init_repo(tmp_path / "repo", tmp_path / "cache") as repo:
        write_files(tmp_path / "src", files)
        snapshot = take(repo, tmp_path / "src")
        node = repo.load_tree(snapshot.tree_id)[0]
        chunk_id, size = node.chunk_ids[0], node.sizes[0]
        duplicate = add_duplicate_pack(repo, chunk_id, files["weights.bin"][:size], copies=2)
        assert len([e for e in indexed_packs(repo)[duplicate] if e[0] == chunk_id]) == 2
        GarbageCollector(repo, GcOptions(max_unused=0.0)).run()
    with open_repo(tmp_path / "repo", tmp_path / "c2") as repo:
        copies = [
            pack
            for pack, rows in indexed_packs(repo).items()
            for blob, _ in rows
            if blob == chunk_id
        ]
        assert len(copies) == 1
        assert duplicate not in pack_hexes(tmp_path / "repo")
        assert measure_unused(repo).unused_bytes == 0
        assert_restores(repo, snapshot, files, tmp_path / "out")
    assert_clean(tmp_path / "repo", tmp_path / "c3")


def test_gc_blob_twice_in_only_pack(tmp_path):
    """A chunk whose only copies are three in one pack: gc keeps exactly one."""
    content = random_bytes(3000, 9)
    with init_repo(tmp_path / "repo", tmp_path / "cache") as repo:
        chunk_id = repo.keys.blob_id(content)
        duplicate = add_duplicate_pack(repo, chunk_id, content, copies=3)
        node = Node(
            name=b"w.bin",
            type="file",
            size=len(content),
            chunks=chunk_id,
            sizes=(len(content),),
            digest=blake3.blake3(content).digest(),
        )
        tree = encode_tree([node])
        tree_writer = PackWriter(repo.keys, MIB, len(tree) + 1)
        tree_writer.add(BlobType.TREE, repo.keys.blob_id(tree), tree, Codec.NONE, len(tree))
        repo.backend.put(pack_name(tree_writer.pack_id), tree_writer.finish())
        repo.index.add_pack(tree_writer.pack_id, list(tree_writer.entries))
        repo.index.flush()
        record = Snapshot(
            snapshot_id=b"",
            time="2026-12-01T10:00:00+01:00",
            host="h",
            user="u",
            paths=(b"/w",),
            tree_id=repo.keys.blob_id(tree),
        )
        snapshot, _size = repo.write_snapshot(record)
        assert measure_unused(repo).unused_bytes == 2 * (len(content) + 16)
        result = GarbageCollector(repo, GcOptions(max_unused=0.0)).run()
    assert result.packs_repacked == 1
    assert duplicate not in pack_hexes(tmp_path / "repo")
    with open_repo(tmp_path / "repo", tmp_path / "c2") as repo:
        copies = [blob for rows in indexed_packs(repo).values() for blob, _ in rows]
        assert copies.count(chunk_id) == 1
        assert measure_unused(repo).unused_bytes == 0
        assert_restores(repo, snapshot, {"w.bin": content}, tmp_path / "out")
    assert_clean(tmp_path / "repo", tmp_path / "c3")


def write_unindexed_pack(repo: Repository, seed: int) -> str:
    """Put a pack that no index object lists, as an interrupted snapshot leaves it."""
    plain = random_bytes(10 * KIB, seed)
    writer = PackWriter(repo.keys, MIB, SMALL_CHUNKER.max_size)
    writer.add(BlobType.CHUNK, repo.keys.blob_id(plain), plain, Codec.NONE, len(plain))
    repo.backend.put(pack_name(writer.pack_id), writer.finish())
    return writer.pack_id.hex()


def test_gc_deletes_unindexed_pack(tmp_path):
    repo_path, kept = build_scenario(tmp_path)
    with open_repo(repo_path, tmp_path / "c1") as repo:
        orphan = write_unindexed_pack(repo, 10)
        gc = GarbageCollector(repo, GcOptions(max_unused=1.0))
        plan = gc.plan()
        late = write_unindexed_pack(repo, 11)
        gc.commit(plan, gc.write(plan))
    remaining = pack_hexes(repo_path)
    assert orphan not in remaining
    # Written after gc listed the packs, as a running snapshot's pack would be: kept.
    assert late in remaining
    verify_kept(repo_path, tmp_path / "c2", kept, tmp_path / "out")


def test_gc_keeps_pack_indexed_after_start(tmp_path):
    repo_path, kept = build_scenario(tmp_path)
    with open_repo(repo_path, tmp_path / "c1") as repo:
        uploaded = write_unindexed_pack(repo, 12)
        gc = GarbageCollector(repo, GcOptions(max_unused=0.0))
        plan = gc.plan()
        assert plan.packs[bytes.fromhex(uploaded)].action == "delete"
        # The snapshot that uploaded the pack now publishes its index object.
        with open_repo(repo_path, tmp_path / "other") as other:
            entries = header_entries(other, uploaded)
            other.index.add_pack(bytes.fromhex(uploaded), entries)
            other.index.flush()
        result = gc.commit(plan, gc.write(plan))
    assert uploaded in pack_hexes(repo_path)
    assert result.packs_kept_for_new_snapshots == 1
    verify_kept(repo_path, tmp_path / "c2", kept, tmp_path / "out")
    assert_clean(repo_path, tmp_path / "c3")


def header_entries(repo: Repository, pack_hex: str):
    """Read a pack's entries from its header."""
    from cas.pack import PROLOGUE_SIZE, TRAILER_SIZE, decode_header, parse_trailer

    name = pack_name(bytes.fromhex(pack_hex))
    size = repo.backend.size(name)
    header_size = parse_trailer(
        repo.backend.get(name, size - TRAILER_SIZE, TRAILER_SIZE), size, name
    )
    start = size - TRAILER_SIZE - header_size
    header = decode_header(
        repo.keys,
        bytes.fromhex(pack_hex),
        repo.backend.get(name, 0, PROLOGUE_SIZE),
        repo.backend.get(name, start, header_size),
        start,
    )
    return list(header.entries)


def test_gc_keeps_dead_blobs_reused_meanwhile(tmp_path):
    """A snapshot taken during phase 1 reuses chunks that phase 1 found dead."""
    old = {"model.bin": random_bytes(700 * KIB, 13)}
    other_files = {"other.bin": random_bytes(300 * KIB, 14)}
    with init_repo(tmp_path / "repo", tmp_path / "cache") as repo:
        write_files(tmp_path / "src", old)
        first = take(repo, tmp_path / "src")
        write_files(tmp_path / "src2", other_files)
        second = take(repo, tmp_path / "src2")
        delete_snapshot(repo, first)
        gc = GarbageCollector(repo, GcOptions(max_unused=0.0))
        plan = gc.plan()
        assert plan.packs_with("delete")
        with open_repo(tmp_path / "repo", tmp_path / "cache-other") as other:
            run = Archiver(other, SnapshotOptions(threads=1)).run([str(tmp_path / "src")])
        assert run.new_chunks == 0, "the new snapshot must reuse the dead chunks"
        result = gc.commit(plan, gc.write(plan))
    assert result.rescued_blobs > 0
    with open_repo(tmp_path / "repo", tmp_path / "c2") as repo:
        assert_restores(repo, run.snapshot, old, tmp_path / "out")
        assert_restores(repo, second, other_files, tmp_path / "out")
    assert_clean(tmp_path / "repo", tmp_path / "c3")
    with open_repo(tmp_path / "repo", tmp_path / "c4") as repo:
        GarbageCollector(repo, GcOptions(max_unused=0.0)).run()
        assert_restores(repo, run.snapshot, old, tmp_path / "out")
    assert_clean(tmp_path / "repo", tmp_path / "c5")


def test_gc_refuses_second_gc(tmp_path):
    repo_path, _kept = build_scenario(tmp_path)
    with (
        open_repo(repo_path, tmp_path / "c1") as repo,
        RepositoryLock(
            repo.backend, repo.keys, exclusive=False, operation="gc", unique_operation=True
        ),
        pytest.raises(LockedError, match="gc"),
    ):
        GarbageCollector(repo).run()


def test_gc_withdraws_when_index_vanishes(tmp_path):
    repo_path, kept = build_scenario(tmp_path)
    with open_repo(repo_path, tmp_path / "c1") as repo:
        first = GarbageCollector(repo, GcOptions(max_unused=0.0))
        plan = first.plan()
        written = first.write(plan)
        with open_repo(repo_path, tmp_path / "c-other") as other:
            # What a gc that ignored the lock would do: replace every index object.
            GarbageCollector(other, GcOptions(max_unused=0.0)).commit(
                *prepare(GarbageCollector(other, GcOptions(max_unused=0.0)))
            )
        listing = sorted(str(path) for path in repo_path.rglob("*") if path.is_file())
        with pytest.raises(LockedError, match="disappeared"):
            first.commit(plan, written)
    assert sorted(str(path) for path in repo_path.rglob("*") if path.is_file()) == listing
    verify_kept(repo_path, tmp_path / "c2", kept, tmp_path / "out")
    assert_clean(repo_path, tmp_path / "c3")


def prepare(gc: GarbageCollector):
    plan = gc.plan()
    return plan, gc.write(plan)


# A failure at every write


def copy_repo(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    return target


def record_writes(repo_path: Path, cache: Path, operation) -> list[str]:
    """Run ``operation`` once without failures; return its writes, such as "put data/..."."""
    backend = FaultyBackend(LocalBackend(repo_path))
    with open_repo(repo_path, cache, backend) as repo:
        operation(repo)
    return backend.log


def run_gc(repo: Repository) -> None:
    GarbageCollector(repo, GcOptions(max_unused=0.0)).run()


def verify_after_crash(repo_path: Path, root: Path, kept: dict[str, dict[str, bytes]]) -> None:
    """Kept snapshots restore, a rerun of gc completes, and check finds nothing."""
    verify_kept(repo_path, root / "fresh1", kept, root / "out")
    with open_repo(repo_path, root / "fresh2") as repo:
        run_gc(repo)
        assert measure_unused(repo).unused_bytes == 0
    verify_kept(repo_path, root / "fresh3", kept, root / "out")
    assert_clean(repo_path, root / "fresh4")


def sweep_gc_failures(tmp_path: Path, template: Path, kept) -> list[str]:
    writes = record_writes(copy_repo(template, tmp_path / "count"), tmp_path / "cc", run_gc)
    for step in range(1, len(writes) + 1):
        work = tmp_path / f"gc-{step}"
        repo_path = copy_repo(template, work / "repo")
        backend = FaultyBackend(LocalBackend(repo_path), fail_at=step)
        with open_repo(repo_path, work / "cache", backend) as repo, pytest.raises(CasError):
            run_gc(repo)
        verify_after_crash(repo_path, work, kept)
        shutil.rmtree(work)
    return writes


def sweep_snapshot_failures(tmp_path: Path, template: Path, kept, files) -> list[str]:
    source = tmp_path / "new-src"
    write_files(source, files)

    def snapshot(repo: Repository) -> None:
        take(repo, source)

    writes = record_writes(copy_repo(template, tmp_path / "count-s"), tmp_path / "cs", snapshot)
    for step in range(1, len(writes) + 1):
        work = tmp_path / f"snap-{step}"
        repo_path = copy_repo(template, work / "repo")
        backend = FaultyBackend(LocalBackend(repo_path), fail_at=step)
        with open_repo(repo_path, work / "cache", backend) as repo, pytest.raises(CasError):
            snapshot(repo)
        with open_repo(repo_path, work / "names") as repo:
            assert sorted(repo.snapshot_names()) == sorted(kept)
        verify_after_crash(repo_path, work, kept)
        shutil.rmtree(work)
    return writes


def test_gc_survives_failure_at_every_write(tmp_path):
    template, kept = build_scenario(tmp_path / "template")
    writes = sweep_gc_failures(tmp_path, template, kept)
    kinds = {f"{verb} {name.split('/')[0]}" for verb, name in (write.split() for write in writes)}
    # Every kind of step: a repacked pack, the new index, old index objects, old packs.
    assert kinds == {"put data", "put index", "delete index", "delete data"}, writes


def test_snapshot_survives_failure_at_every_write(tmp_path):
    template, kept = build_scenario(tmp_path / "template")
    files = {"new.bin": random_bytes(1536 * KIB, 20), "model.bin": versions()[2]["model.bin"]}
    writes = sweep_snapshot_failures(tmp_path, template, kept, files)
    assert len(writes) >= 3, writes


@pytest.mark.slow
def test_gc_failure_sweep_large(tmp_path):
    root = tmp_path / "template"
    repo_path, source = root / "repo", root / "src"
    kept: dict[str, dict[str, bytes]] = {}
    with init_repo(repo_path, root / "cache") as repo:
        rng = random.Random(30)
        model = bytearray(rng.randbytes(6 * MIB))
        for number in range(6):
            start = rng.randrange(0, len(model) - MIB)
            model[start : start + MIB] = rng.randbytes(MIB)
            files = {"model.bin": bytes(model), f"step-{number}.json": b"{}" * number}
            write_files(source, files)
            snapshot = take(repo, source)
            if number % 3 == 0:
                delete_snapshot(repo, snapshot)
            else:
                kept[snapshot.snapshot_hex] = files
    sweep_gc_failures(tmp_path, repo_path, kept)


# Command line


def cas_json(run_cas, *args, expect=0):
    return json.loads(run_cas(*args, "--json", expect=expect).stdout)


def test_gc_cli_reports(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    ids = []
    for files in versions():
        write_files(source, files)
        ids.append(cas_json(run_cas, "snapshot", source)["id"])
    run_cas("prune", ids[0])
    before = cas_json(run_cas, "stats")
    assert before["unused_bytes"] > 0
    preview = cas_json(run_cas, "gc", "--dry-run", "--max-unused", "0")
    assert preview["dry_run"] is True
    assert preview["packs_deleted"] + preview["packs_repacked"] == len(preview["packs"]) > 0
    report = cas_json(run_cas, "gc", "--max-unused", "0%")
    assert report["packs_deleted"] == preview["packs_deleted"]
    assert 0 <= report["exclusive_seconds"] <= report["seconds"]
    after = cas_json(run_cas, "stats")
    assert after["unused_bytes"] == 0
    assert (
        after["pack_count"]
        == before["pack_count"]
        - report["packs_deleted"]
        - report["packs_repacked"]
        + report["packs_written"]
    )
    assert after["repository_size"] < before["repository_size"]
    human = run_cas("stats").stdout
    assert "unused" in human
    check = run_cas("check", "--read-data")
    assert check.returncode == 0


def test_stats_survives_missing_tree(cli_repo, run_cas, tmp_path):
    write_files(tmp_path / "src", {"a.bin": random_bytes(50 * KIB, 21)})
    run_cas("snapshot", tmp_path / "src")
    with open_repo(cli_repo.repo, tmp_path / "c1") as repo:
        tree_packs = {
            location.pack_id
            for _blob, location in repo.index.cache.items()
            if location.blob_type == BlobType.TREE
        }
        for pack_id in tree_packs:
            repo.backend.delete(pack_name(pack_id))
    result = run_cas("stats", "--json")
    assert json.loads(result.stdout)["unused_bytes"] is None
    assert "cannot count unused bytes" in result.stderr
    refused = run_cas("gc", expect=3)
    assert "Nothing was deleted" in refused.stderr


def test_gc_cli_rejects_bad_percent(cli_repo, run_cas):
    result = run_cas("gc", "--max-unused", "150", expect=2)
    assert "0 to 100" in result.stderr


def test_stats_unused_matches_independent_count(tmp_path):
    repo_path, _kept = build_scenario(tmp_path)
    with open_repo(repo_path, tmp_path / "c1") as repo:
        live = reachable_blobs(repo)
        sizes = {info.name.rsplit("/", 1)[1]: info.size for info in repo.backend.list("data/")}
        expected = 0
        for pack, rows in indexed_packs(repo).items():
            if any(blob in live for blob, _ in rows):
                expected += sum(size for blob, size in rows if blob not in live)
            else:
                expected += sizes[pack]
        assert measure_unused(repo).unused_bytes == expected
