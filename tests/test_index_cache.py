"""The local LMDB index cache: rebuilt when deleted or stale, and shared through the repository.

Two cache folders on one host stand for two machines that share one repository. Each keeps
its own cache, so the index objects in the repository are the only index data they share.
"""

from __future__ import annotations

import json
import os
import random
import shutil

from cas.archiver import Archiver, SnapshotOptions
from cas.index import INDEX_PREFIX, entries_to_list
from cas.objects import ObjectKind, encode_object
from cas.repository import Repository

KIB = 1 << 10


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def make_source(root, seed: int = 0) -> int:
    """Create two files below ``root`` and return their total size."""
    root.mkdir()
    (root / "model.bin").write_bytes(random_bytes(600 * KIB, seed))
    (root / "head.bin").write_bytes(random_bytes(100 * KIB, seed + 1))
    return 700 * KIB


def cas_json(run_cas, *args, expect=0):
    return json.loads(run_cas(*args, "--json", expect=expect).stdout)


def index_names(repo: Repository) -> set[str]:
    return {info.name for info in repo.backend.list(INDEX_PREFIX)}


def reopen(repo: Repository, password: str) -> Repository:
    """Open the repository again with the same cache root, as a new process would."""
    return Repository.open(repo.backend.url, password.encode(), cache_dir=repo.cache_dir.parent)


# Rebuild


def test_cache_rebuilt_after_delete(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    make_source(source)
    run_cas("snapshot", source, "--quiet")
    blobs_before = cas_json(run_cas, "stats")["blob_count"]

    shutil.rmtree(cli_repo.cache)
    dest = tmp_path / "dest"
    run_cas("checkout", "latest", dest, "--quiet")
    blobs_after = cas_json(run_cas, "stats")["blob_count"]

    assert blobs_after == blobs_before
    assert list(cli_repo.cache.glob("*/index/data.mdb")) != []
    assert (dest / "model.bin").read_bytes() == (source / "model.bin").read_bytes()


def test_cache_rebuilt_library(repo, cas_env, tmp_path):
    source = tmp_path / "src"
    make_source(source)
    Archiver(repo, SnapshotOptions()).run([str(source)])
    count = repo.index.cache.count()
    repo.close()

    shutil.rmtree(repo.cache_dir)
    with reopen(repo, cas_env.password) as again:
        rebuilt_count = again.index.cache.count()
        merged = again.index.cache.merged_indexes()
        names = index_names(again)

    assert count > 0
    assert rebuilt_count == count
    assert merged == names


def test_stale_cache_replaced(repo, cas_env, tmp_path):
    """An index object replaced by another one (as gc does) makes the cache rebuild."""
    source = tmp_path / "src"
    make_source(source)
    snapshot = Archiver(repo, SnapshotOptions()).run([str(source)]).snapshot
    count = repo.index.cache.count()
    (old_name,) = index_names(repo)
    packs, _ = repo.index.read_index_object(old_name)
    new_name = INDEX_PREFIX + os.urandom(32).hex()
    body = {
        "v": 1,
        "packs": [[pack_id, entries_to_list(entries)] for pack_id, entries in packs],
        "supersedes": [old_name],
    }
    repo.backend.put(new_name, encode_object(repo.keys, ObjectKind.INDEX, new_name, body))
    repo.backend.delete(old_name)
    repo.close()

    with reopen(repo, cas_env.password) as again:
        merged = again.index.cache.merged_indexes()
        rebuilt_count = again.index.cache.count()
        tree = again.load_tree(snapshot.tree_id)

    assert merged == {new_name}
    assert rebuilt_count == count
    assert sorted(node.name for node in tree) == [b"head.bin", b"model.bin"]


def test_stale_cache_not_served(repo, cas_env, tmp_path):
    """Entries of deleted index objects are dropped, not served from the cache."""
    source = tmp_path / "src"
    make_source(source)
    Archiver(repo, SnapshotOptions()).run([str(source)])
    for name in index_names(repo):
        repo.backend.delete(name)
    repo.close()

    with reopen(repo, cas_env.password) as again:
        count = again.index.cache.count()

    assert count == 0


def test_cache_garbage_file(cli_repo, run_cas, tmp_path):
    """A cache file overwritten with garbage is rebuilt, as a deleted cache is."""
    source = tmp_path / "src"
    make_source(source)
    run_cas("snapshot", source, "--quiet")
    (data_file,) = cli_repo.cache.glob("*/index/data.mdb")
    data_file.write_bytes(random_bytes(64 * KIB, 9))

    run_cas("check", "--quiet")


# Two machines


def test_second_machine_sees_snapshots(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    make_source(source)
    snapshot = cas_json(run_cas, "snapshot", source)
    other_cache = ("--cache-dir", tmp_path / "machine-b")
    dest = tmp_path / "dest"

    log = cas_json(run_cas, "log", *other_cache)
    run_cas("checkout", "latest", dest, "--quiet", *other_cache)

    assert [entry["id"] for entry in log] == [snapshot["id"]]
    assert (dest / "head.bin").read_bytes() == (source / "head.bin").read_bytes()


def test_second_machine_dedups(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    total = make_source(source)
    first = cas_json(run_cas, "snapshot", source)
    copy = tmp_path / "copy-on-b"
    shutil.copytree(source, copy)

    second = cas_json(
        run_cas, "snapshot", copy, "--host", "machine-b", "--cache-dir", tmp_path / "machine-b"
    )

    assert first["new_chunks"] > 0
    assert second["parent"] is None
    assert second["bytes_read"] == total
    assert second["new_chunks"] == 0
    assert second["bytes_added"] < total // 50


def test_cache_merges_other_machine_index(cli_repo, run_cas, tmp_path):
    machine_b = ("--cache-dir", tmp_path / "machine-b")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "old.bin").write_bytes(random_bytes(100 * KIB, 5))
    run_cas("snapshot", tmp_path / "a", "--quiet")
    source_b = tmp_path / "b"
    make_source(source_b, seed=20)
    snapshot_b = cas_json(run_cas, "snapshot", source_b, *machine_b)
    copy = tmp_path / "b-on-a"
    shutil.copytree(source_b, copy)

    # Machine A's cache holds only its own index object until the next command syncs it.
    dest = tmp_path / "dest"
    run_cas("checkout", snapshot_b["id"], dest, "--quiet")
    again = cas_json(run_cas, "snapshot", copy)

    assert (dest / "model.bin").read_bytes() == (source_b / "model.bin").read_bytes()
    assert again["new_chunks"] == 0
