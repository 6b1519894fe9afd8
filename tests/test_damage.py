"""Damaged repositories: flipped bytes, truncated and deleted objects, a lost index.

Each case damages one object of a real repository on disk and runs the CLI. Every command
must name the damaged object and end with the documented exit code (3 for integrity errors,
4 for a wrong password), or skip the object with a warning. No command may end with a Python
traceback, which `run_cas` checks on every run.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from cas.index import BlobLocation, pack_name
from cas.repository import Repository

KIB = 1 << 10


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def flip_byte(path: Path, offset: int) -> None:
    """Invert the lowest bit of the byte at ``offset``."""
    with open(path, "r+b") as file:
        file.seek(offset)
        value = file.read(1)[0]
        file.seek(offset)
        file.write(bytes([value ^ 0x01]))


def only_file(folder: Path) -> Path:
    files = [path for path in folder.rglob("*") if path.is_file()]
    assert len(files) == 1, files
    return files[0]


@dataclass
class Stored:
    """A repository with one snapshot of ``a.bin`` and ``b.bin``, and where their blobs lie."""

    repo: Path
    snapshot_id: str
    contents: dict[str, bytes]
    data_pack: Path
    tree_pack: Path
    chunks: dict[str, list[BlobLocation]]


@pytest.fixture
def stored(cli_repo, run_cas, tmp_path) -> Stored:
    source = tmp_path / "src"
    source.mkdir()
    contents = {"a.bin": random_bytes(200 * KIB, 1), "b.bin": random_bytes(200 * KIB, 2)}
    for name, content in contents.items():
        (source / name).write_bytes(content)
    snapshot_id = json.loads(run_cas("snapshot", source, "--json").stdout)["id"]

    with Repository.open(
        str(cli_repo.repo), cli_repo.password.encode(), cache_dir=tmp_path / "inspect-cache"
    ) as repo:
        snapshot = repo.load_snapshot(snapshot_id)
        nodes = {node.name.decode(): node for node in repo.load_tree(snapshot.tree_id)}
        chunks = {
            name: [repo.index.lookup(chunk_id) for chunk_id in nodes[name].chunk_ids]
            for name in contents
        }
        tree_location = repo.index.lookup(snapshot.tree_id)
    assert tree_location is not None
    data_packs = {location.pack_id for locations in chunks.values() for location in locations}
    assert len(data_packs) == 1, "the test expects both files in one data pack"
    return Stored(
        repo=cli_repo.repo,
        snapshot_id=snapshot_id,
        contents=contents,
        data_pack=cli_repo.repo / pack_name(data_packs.pop()),
        tree_pack=cli_repo.repo / pack_name(tree_location.pack_id),
        chunks=chunks,
    )


def check_json(run_cas) -> dict:
    return json.loads(run_cas("check", "--read-data", "--json", expect=3).stdout)


# Packs


def test_flipped_chunk_checkout(stored, run_cas, tmp_path):
    location = stored.chunks["a.bin"][1]
    flip_byte(stored.data_pack, location.offset + location.stored_size // 2)
    dest = tmp_path / "dest"

    result = run_cas("checkout", "latest", dest, expect=3)

    assert "a.bin" in result.stderr
    assert "b.bin" not in result.stderr
    assert "failed authentication" in result.stderr
    assert (dest / "b.bin").read_bytes() == stored.contents["b.bin"]


def test_flipped_chunk_check(stored, run_cas):
    location = stored.chunks["a.bin"][0]
    flip_byte(stored.data_pack, location.offset)

    result = run_cas("check", "--read-data", expect=3)
    report = check_json(run_cas)

    assert stored.data_pack.name in result.stderr
    assert "/a.bin" in result.stderr
    assert [finding["kind"] for finding in report["findings"]] == ["damaged-blob"]
    assert report["findings"][0]["paths"] == ["/a.bin"]
    assert report["findings"][0]["pack_hex"] == stored.data_pack.name


def test_flipped_chunk_structure_check(stored, run_cas):
    """Without --read-data the check reads no chunk, so it cannot see a damaged one."""
    location = stored.chunks["a.bin"][0]
    flip_byte(stored.data_pack, location.offset)

    run_cas("check", "--quiet")


def test_flipped_pack_salt(stored, run_cas, tmp_path):
    # Bytes 8..40 of a pack are the salt from which its blob key is derived.
    flip_byte(stored.data_pack, 20)

    checkout = run_cas("checkout", "latest", tmp_path / "dest", expect=3)
    report = check_json(run_cas)

    assert "a.bin" in checkout.stderr
    assert "b.bin" in checkout.stderr
    # The salt is also the header's associated data, so the header fails as well.
    assert {finding["kind"] for finding in report["findings"]} == {
        "damaged-blob",
        "bad-pack-header",
    }


def test_flipped_pack_magic(stored, run_cas, tmp_path):
    flip_byte(stored.data_pack, 0)

    checkout = run_cas("checkout", "latest", tmp_path / "dest", expect=3)
    report = check_json(run_cas)

    assert "pack magic" in checkout.stderr
    assert [finding["kind"] for finding in report["findings"]] == ["missing-pack"]
    assert "pack magic" in report["findings"][0]["message"]


def test_flipped_tree_blob(stored, run_cas, tmp_path):
    flip_byte(stored.tree_pack, 60)

    checkout = run_cas("checkout", "latest", tmp_path / "dest", expect=3)
    check = run_cas("check", expect=3)

    assert "failed authentication" in checkout.stderr
    assert "error: tree:" in check.stderr


def test_truncated_pack_check(stored, run_cas):
    last_a = stored.chunks["a.bin"][-1]
    with open(stored.data_pack, "r+b") as file:
        file.truncate(last_a.offset + last_a.stored_size)

    report = check_json(run_cas)

    kinds = {finding["kind"] for finding in report["findings"]}
    paths = {path for finding in report["findings"] for path in finding["paths"]}
    assert kinds == {"truncated-pack"}
    assert paths == {"/b.bin"}
    assert len(report["findings"]) == len(stored.chunks["b.bin"])


def test_damaged_file_set_aside(stored, run_cas, tmp_path):
    """A file that failed is never left under its real name, where a loader would read zeros."""
    location = stored.chunks["a.bin"][1]
    flip_byte(stored.data_pack, location.offset + location.stored_size // 2)
    dest = tmp_path / "dest"

    result = run_cas("checkout", "latest", dest, "--json", expect=3)

    assert not (dest / "a.bin").exists()
    damaged = (dest / "a.bin.cas-damaged").read_bytes()
    assert len(damaged) == len(stored.contents["a.bin"])
    intact_size = stored.chunks["a.bin"][0].raw_size
    assert damaged[:intact_size] == stored.contents["a.bin"][:intact_size]
    (failed,) = json.loads(result.stdout)["failed"]
    assert failed["path"] == str(dest / "a.bin")
    assert "a.bin.cas-damaged" in failed["error"]
    assert (dest / "b.bin").read_bytes() == stored.contents["b.bin"]


def test_damaged_file_name_taken(stored, run_cas, tmp_path):
    location = stored.chunks["a.bin"][0]
    flip_byte(stored.data_pack, location.offset + location.stored_size // 2)
    dest = tmp_path / "dest"
    run_cas("checkout", "latest", dest, expect=3)

    run_cas("checkout", "latest", dest, "--overwrite", expect=3)

    assert not (dest / "a.bin").exists()
    assert (dest / "a.bin.cas-damaged").is_file()
    assert (dest / "a.bin.cas-damaged.1").is_file()
    assert (dest / "b.bin").read_bytes() == stored.contents["b.bin"]


def test_truncated_pack_checkout(stored, run_cas, tmp_path):
    first_b = stored.chunks["b.bin"][0]
    with open(stored.data_pack, "r+b") as file:
        file.truncate(first_b.offset + 10)

    result = run_cas("checkout", "latest", tmp_path / "dest", expect=3)

    assert "b.bin" in result.stderr


def test_truncated_pack_keeps_intact_file(stored, run_cas, tmp_path):
    first_b = stored.chunks["b.bin"][0]
    with open(stored.data_pack, "r+b") as file:
        file.truncate(first_b.offset + 10)
    dest = tmp_path / "dest"

    result = run_cas("checkout", "latest", dest, expect=3)

    assert "a.bin" not in result.stderr
    assert (dest / "a.bin").read_bytes() == stored.contents["a.bin"]


def test_truncated_pack_prologue(stored, run_cas, tmp_path):
    with open(stored.data_pack, "r+b") as file:
        file.truncate(20)

    checkout = run_cas("checkout", "latest", tmp_path / "dest", expect=3)
    report = check_json(run_cas)

    assert "a.bin" in checkout.stderr
    assert [finding["kind"] for finding in report["findings"]] == ["missing-pack"]


def test_deleted_data_pack(stored, run_cas, tmp_path):
    stored.data_pack.unlink()

    checkout = run_cas("checkout", "latest", tmp_path / "dest", expect=3)
    report = check_json(run_cas)

    assert "a.bin" in checkout.stderr
    assert "b.bin" in checkout.stderr
    assert [finding["kind"] for finding in report["findings"]] == ["missing-pack"]
    assert report["findings"][0]["pack_hex"] == stored.data_pack.name
    assert report["findings"][0]["paths"] == ["/a.bin", "/b.bin"]


def test_deleted_tree_pack_check(stored, run_cas):
    stored.tree_pack.unlink()

    result = run_cas("check", expect=3)

    assert stored.tree_pack.name in result.stderr


def test_deleted_tree_pack_checkout(stored, run_cas, tmp_path):
    stored.tree_pack.unlink()

    result = run_cas("checkout", "latest", tmp_path / "dest", expect=3)

    assert stored.tree_pack.name in result.stderr


# Index objects and the cache


def delete_index(stored: Stored, cache: Path) -> None:
    shutil.rmtree(stored.repo / "index")
    shutil.rmtree(cache)


def test_deleted_index_check(stored, cli_repo, run_cas):
    delete_index(stored, cli_repo.cache)

    result = run_cas("check", expect=3)

    assert "not in the index" in result.stderr


def test_deleted_index_log(stored, cli_repo, run_cas):
    """Listing snapshots needs no index, so it still works."""
    delete_index(stored, cli_repo.cache)

    log = json.loads(run_cas("log", "--json").stdout)

    assert [entry["id"] for entry in log] == [stored.snapshot_id]


def test_deleted_index_checkout(stored, cli_repo, run_cas, tmp_path):
    delete_index(stored, cli_repo.cache)

    result = run_cas("checkout", "latest", tmp_path / "dest", expect=3)

    assert "not in the index" in result.stderr


def test_deleted_index_resnapshot(stored, cli_repo, run_cas, tmp_path):
    """With no index, a new snapshot cannot deduplicate and stores every chunk again."""
    delete_index(stored, cli_repo.cache)
    source = tmp_path / "again"
    source.mkdir()
    for name, content in stored.contents.items():
        (source / name).write_bytes(content)

    output = json.loads(run_cas("snapshot", source, "--json").stdout)
    run_cas("checkout", output["id"], tmp_path / "dest", "--quiet")

    assert output["new_chunks"] == sum(len(chunks) for chunks in stored.chunks.values())
    assert (tmp_path / "dest" / "a.bin").read_bytes() == stored.contents["a.bin"]


def test_flipped_index_object(stored, run_cas, tmp_path):
    """A machine without a cache reads the index objects and finds the damaged one."""
    index_object = only_file(stored.repo / "index")
    flip_byte(index_object, index_object.stat().st_size // 2)
    fresh_cache = ("--cache-dir", tmp_path / "fresh-cache")

    checkout = run_cas("checkout", "latest", tmp_path / "dest", *fresh_cache, expect=3)
    check = run_cas("check", *fresh_cache, expect=3)

    assert f"index/{index_object.name}" in checkout.stderr
    assert "failed authentication" in checkout.stderr
    assert f"index/{index_object.name}" in check.stderr


def test_flipped_index_object_check(stored, run_cas):
    index_object = only_file(stored.repo / "index")
    flip_byte(index_object, index_object.stat().st_size // 2)

    result = run_cas("check", "--read-data", expect=3)

    assert f"index/{index_object.name}" in result.stderr


# Snapshot, key and config objects


def test_flipped_snapshot_object(stored, run_cas):
    """`cas log` skips a damaged snapshot with a warning, and `cas check` reports it."""
    snapshot_object = stored.repo / "snapshots" / stored.snapshot_id
    flip_byte(snapshot_object, snapshot_object.stat().st_size // 2)

    log = run_cas("log", "--json")
    check = json.loads(run_cas("check", "--json", expect=3).stdout)

    assert json.loads(log.stdout) == []
    assert f"snapshots/{stored.snapshot_id}" in log.stderr
    assert "failed authentication" in log.stderr
    assert [finding["kind"] for finding in check["findings"]] == ["snapshot"]
    assert check["findings"][0]["snapshots"] == [stored.snapshot_id]


def test_flipped_snapshot_checkout_by_id(stored, run_cas, tmp_path):
    snapshot_object = stored.repo / "snapshots" / stored.snapshot_id
    flip_byte(snapshot_object, snapshot_object.stat().st_size // 2)

    result = run_cas("checkout", stored.snapshot_id, tmp_path / "dest", expect=3)

    assert f"snapshots/{stored.snapshot_id}" in result.stderr


def test_renamed_snapshot_object(stored, run_cas):
    """A snapshot object is bound to its name, so a copy under another id is rejected."""
    original = stored.repo / "snapshots" / stored.snapshot_id
    other_id = format(int(stored.snapshot_id, 16) ^ 1, "064x")
    shutil.copyfile(original, original.with_name(other_id))

    check = json.loads(run_cas("check", "--json", expect=3).stdout)

    assert [finding["snapshots"] for finding in check["findings"]] == [[other_id]]


def test_flipped_snapshot_other_usable(stored, run_cas, tmp_path):
    """A damaged snapshot does not stop a checkout of another one named by id."""
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "c.bin").write_bytes(b"second snapshot")
    second_id = json.loads(run_cas("snapshot", tmp_path / "second", "--json").stdout)["id"]
    snapshot_object = stored.repo / "snapshots" / stored.snapshot_id
    flip_byte(snapshot_object, snapshot_object.stat().st_size // 2)

    run_cas("checkout", second_id, tmp_path / "dest", "--quiet")

    assert (tmp_path / "dest" / "c.bin").read_bytes() == b"second snapshot"


def test_flipped_snapshot_new_snapshot(stored, run_cas, tmp_path):
    """One damaged old snapshot does not block new snapshots."""
    snapshot_object = stored.repo / "snapshots" / stored.snapshot_id
    flip_byte(snapshot_object, snapshot_object.stat().st_size // 2)
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "c.bin").write_bytes(b"second snapshot")

    result = run_cas("snapshot", tmp_path / "second", "--json")
    log = json.loads(run_cas("log", "--json").stdout)

    assert f"snapshots/{stored.snapshot_id}" in result.stderr
    assert [entry["id"] for entry in log] == [json.loads(result.stdout)["id"]]


def test_latest_warns_after_skipping(stored, run_cas, tmp_path):
    """`latest` restores the newest readable snapshot and warns that a newer one may be lost."""
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "c.bin").write_bytes(b"second snapshot")
    second_id = json.loads(run_cas("snapshot", tmp_path / "second", "--json").stdout)["id"]
    damaged = stored.repo / "snapshots" / second_id
    flip_byte(damaged, damaged.stat().st_size // 2)

    result = run_cas("checkout", "latest", tmp_path / "dest", expect=1)

    assert "'latest' may not be the newest snapshot" in result.stderr
    assert (tmp_path / "dest" / "a.bin").exists()


def test_prune_removes_unreadable_snapshot(stored, run_cas):
    """An unreadable snapshot object blocks gc; `cas prune FULL_ID` is the way out."""
    snapshot_object = stored.repo / "snapshots" / stored.snapshot_id
    flip_byte(snapshot_object, snapshot_object.stat().st_size // 2)
    run_cas("gc", expect=3)

    short = run_cas("prune", stored.snapshot_id[:12], expect=None)
    assert short.returncode != 0
    assert snapshot_object.exists()
    result = run_cas("prune", stored.snapshot_id)

    assert "unreadable" in result.stderr
    assert not snapshot_object.exists()
    run_cas("gc")


def key_object(stored: Stored) -> Path:
    return only_file(stored.repo / "keys")


def test_flipped_key_material(stored, run_cas):
    """The sealed key material fails authentication exactly as a wrong password does."""
    path = key_object(stored)
    data = path.read_bytes()
    sealed = msgpack.unpackb(data)["sealed"]
    flip_byte(path, data.index(sealed) + len(sealed) // 2)

    result = run_cas("log", expect=4)

    assert "wrong password" in result.stderr


def test_flipped_key_salt(stored, run_cas):
    path = key_object(stored)
    data = path.read_bytes()
    salt = msgpack.unpackb(data)["salt"]
    flip_byte(path, data.index(salt))

    result = run_cas("log", expect=4)

    assert "wrong password" in result.stderr


def truncate_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def replace_with_list(path: Path) -> None:
    path.write_bytes(msgpack.packb(["not", "a", "map"]))


def raise_kdf_cost(path: Path) -> None:
    body = msgpack.unpackb(path.read_bytes())
    body["iterations"] = 1_000_000
    path.write_bytes(msgpack.packb(body, use_bin_type=True))


KEY_DAMAGE = {
    "truncated": (truncate_half, "not valid msgpack"),
    "not-a-map": (replace_with_list, "not a map"),
    # A forged key object must not make the KDF run for hours.
    "huge-kdf-cost": (raise_kdf_cost, "out-of-range KDF parameters"),
}


@pytest.mark.parametrize("damage", KEY_DAMAGE)
def test_damaged_key_object_named(stored, run_cas, damage):
    path = key_object(stored)
    damage_function, message = KEY_DAMAGE[damage]
    damage_function(path)

    result = run_cas("log", expect=None)

    assert result.returncode != 0
    assert f"keys/{path.name}" in result.stderr
    assert message in result.stderr


def test_damaged_key_object_exit_code(stored, run_cas):
    truncate_half(key_object(stored))

    result = run_cas("log", expect=3)

    assert "wrong password" not in result.stderr


def test_flipped_config(stored, run_cas):
    config = stored.repo / "config"
    flip_byte(config, config.stat().st_size // 2)

    result = run_cas("log", expect=3)

    assert "object config" in result.stderr
    assert "failed authentication" in result.stderr


def test_truncated_config(stored, run_cas):
    config = stored.repo / "config"
    config.write_bytes(config.read_bytes()[:5])

    result = run_cas("log", expect=3)

    assert "object config" in result.stderr


def test_deleted_config(stored, run_cas):
    (stored.repo / "config").unlink()

    result = run_cas("log", expect=3)

    assert "no config object" in result.stderr
