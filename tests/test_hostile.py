"""Hostile trees and hostile storage: nothing is written outside the target, nothing unbounded.

Crafted trees are built by hand as node maps, sealed with the repository's own keys and
stored through `BlobWriter`, so they authenticate like real ones. They stand for a writer
that has the keys but not good intentions, or for a bug in a future writer. Every
checkout here goes through the real CLI into a folder next to an ``outside`` folder, which
must stay untouched.

Hostile storage (an attacker who can change objects but has no keys) is covered by
checks that each reader authenticates before it parses and bounds sizes before it
allocates.
"""

from __future__ import annotations

import os
import struct
import subprocess
from datetime import datetime
from pathlib import Path

import blake3
import lz4.block
import pytest

from cas.blobstore import BlobWriter
from cas.crypto import pack_msgpack, unpack_msgpack
from cas.errors import IntegrityError
from cas.objects import OBJECT_MAGIC, ObjectKind, decode_object
from cas.pack import (
    MAX_BLOB_RAW_SIZE,
    BlobOpener,
    BlobType,
    Codec,
    PackWriter,
    parse_entry,
    parse_prologue,
    parse_trailer,
)
from cas.repository import Repository
from cas.snapshot import Snapshot

KIB = 1 << 10


class Crafter:
    """Stores hand-made trees and snapshots in the CLI's repository."""

    def __init__(self, env) -> None:
        self.repo = Repository.open(str(env.repo), env.password.encode(), cache_dir=env.cache)
        self.writer = BlobWriter(self.repo, threaded=False)

    def file(self, name: bytes, content: bytes, **extra: object) -> dict[str, object]:
        chunk_id = self.repo.keys.blob_id(content)
        self.writer.add_chunk(chunk_id, memoryview(content))
        node: dict[str, object] = {
            "name": name,
            "type": "file",
            "mode": 0o644,
            "size": len(content),
            "chunks": chunk_id,
            "sizes": [len(content)],
            "digest": blake3.blake3(content).digest(),
        }
        node.update(extra)
        return node

    def folder(self, name: bytes, nodes: list[dict[str, object]]) -> dict[str, object]:
        return {"name": name, "type": "dir", "mode": 0o755, "subtree": self.tree(nodes)}

    def symlink(self, name: bytes, target: bytes) -> dict[str, object]:
        return {"name": name, "type": "symlink", "mode": 0o777, "target": target}

    def tree(self, nodes: list[dict[str, object]]) -> bytes:
        # Written as given: no sorting and no name check, unlike `cas.tree.encode_tree`.
        payload = pack_msgpack({"v": 1, "nodes": nodes})
        tree_id = self.repo.keys.blob_id(payload)
        self.writer.add_tree(tree_id, payload)
        return tree_id

    def snapshot(self, nodes: list[dict[str, object]]) -> str:
        root = self.tree(nodes)
        self.writer.finish()
        self.writer = BlobWriter(self.repo, threaded=False)
        snapshot = Snapshot(
            snapshot_id=b"",
            time=datetime.now().astimezone().isoformat(),
            host="crafted",
            user="crafted",
            paths=(b"/crafted",),
            tree_id=root,
        )
        stored, _ = self.repo.write_snapshot(snapshot)
        return stored.snapshot_hex

    def close(self) -> None:
        self.repo.close()


@pytest.fixture
def crafter(cli_repo):
    crafting = Crafter(cli_repo)
    yield crafting
    crafting.close()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim").write_bytes(b"keep me")
    return folder


def assert_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_bytes() == b"keep me"
    assert not (outside / "victim").is_symlink()


def files_below(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# Unsafe names


UNSAFE_NAMES = [b"..", b".", b"", b"/tmp/absolute", b"a/b", b"../outside/victim", b"a\x00b"]


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=repr)
def test_unsafe_name_in_subtree(crafter, run_cas, tmp_path, outside, name):
    snapshot = crafter.snapshot(
        [
            crafter.file(b"good.bin", b"good content"),
            crafter.folder(b"sub", [crafter.file(name, b"evil content")]),
        ]
    )
    dest = tmp_path / "dest"

    result = run_cas("checkout", snapshot, dest, expect=3)

    assert "unsafe name" in result.stderr
    assert "sub" in result.stderr
    assert (dest / "good.bin").read_bytes() == b"good content"
    assert files_below(dest) == ["good.bin", "sub"]
    assert_untouched(outside)


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=repr)
def test_unsafe_name_in_root(crafter, run_cas, tmp_path, outside, name):
    snapshot = crafter.snapshot([crafter.file(name, b"evil content")])
    dest = tmp_path / "dest"

    result = run_cas("checkout", snapshot, dest, expect=3)

    assert "unsafe name" in result.stderr
    assert files_below(dest) == []
    assert_untouched(outside)


def test_unsafe_name_check_reports_tree(crafter, run_cas):
    crafter.snapshot([crafter.folder(b"sub", [crafter.file(b"..", b"x")])])

    result = run_cas("check", expect=3)

    assert "error: tree" in result.stderr
    assert "/sub" in result.stderr


def test_duplicate_names_rejected(crafter, run_cas, tmp_path, outside):
    """A folder and a symlink of one name in one tree: the tree does not load."""
    snapshot = crafter.snapshot(
        [
            crafter.symlink(b"a", str(outside).encode()),
            crafter.folder(b"a", [crafter.file(b"victim", b"evil content")]),
        ]
    )

    result = run_cas("checkout", snapshot, tmp_path / "dest", expect=3)

    assert "not sorted or repeats" in result.stderr
    assert_untouched(outside)


# Symlinks in the way


def test_symlink_then_folder_across_overwrite(crafter, run_cas, tmp_path, outside):
    """A first checkout leaves ``sub -> outside``; a second replaces it, never writes through."""
    first = crafter.snapshot([crafter.symlink(b"sub", str(outside).encode())])
    second = crafter.snapshot([crafter.folder(b"sub", [crafter.file(b"victim", b"evil")])])
    dest = tmp_path / "dest"
    run_cas("checkout", first, dest, "--quiet")
    assert (dest / "sub").is_symlink()

    run_cas("checkout", second, dest, "--overwrite", "--quiet")

    assert not (dest / "sub").is_symlink()
    assert (dest / "sub" / "victim").read_bytes() == b"evil"
    assert_untouched(outside)


def test_existing_symlink_folder_in_target(crafter, run_cas, tmp_path, outside):
    snapshot = crafter.snapshot([crafter.folder(b"sub", [crafter.file(b"victim", b"evil")])])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)

    run_cas("checkout", snapshot, dest, "--overwrite", "--quiet")

    assert not (dest / "sub").is_symlink()
    assert (dest / "sub" / "victim").read_bytes() == b"evil"
    assert_untouched(outside)


def test_existing_symlink_deeper_in_target(crafter, run_cas, tmp_path, outside):
    inner = crafter.folder(b"deeper", [crafter.file(b"victim", b"evil")])
    snapshot = crafter.snapshot([crafter.folder(b"sub", [inner])])
    dest = tmp_path / "dest"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "deeper").symlink_to(outside)

    run_cas("checkout", snapshot, dest, "--overwrite", "--quiet")

    assert not (dest / "sub" / "deeper").is_symlink()
    assert (dest / "sub" / "deeper" / "victim").read_bytes() == b"evil"
    assert_untouched(outside)


def test_existing_symlink_file_in_target(crafter, run_cas, tmp_path, outside):
    """A symlink where a file goes is replaced, never written through."""
    snapshot = crafter.snapshot([crafter.file(b"victim", b"restored content")])
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "victim").symlink_to(outside / "victim")

    run_cas("checkout", snapshot, dest, "--overwrite", "--quiet")

    assert not (dest / "victim").is_symlink()
    assert (dest / "victim").read_bytes() == b"restored content"
    assert_untouched(outside)


def test_absolute_symlink_restored_not_followed(crafter, run_cas, tmp_path, outside):
    snapshot = crafter.snapshot(
        [
            crafter.symlink(b"link", str(outside / "victim").encode()),
            crafter.symlink(b"up", b"../../outside"),
        ]
    )
    dest = tmp_path / "dest"

    run_cas("checkout", snapshot, dest, "--quiet")

    assert os.readlink(dest / "link") == str(outside / "victim")
    assert os.readlink(dest / "up") == "../../outside"
    assert_untouched(outside)


def test_crafted_hard_link_with_other_content(crafter, run_cas, tmp_path):
    """Nodes that claim one inode but differ in content are restored as separate files."""
    link = {"inode": 77, "device": 5, "nlink": 2}
    snapshot = crafter.snapshot(
        [crafter.file(b"a", b"first", **link), crafter.file(b"b", b"second", **link)]
    )
    dest = tmp_path / "dest"

    run_cas("checkout", snapshot, dest, "--quiet")

    assert (dest / "a").read_bytes() == b"first"
    assert (dest / "b").read_bytes() == b"second"
    assert (dest / "a").stat().st_ino != (dest / "b").stat().st_ino


# Hostile storage: authenticate before parsing, bound before allocating


def test_forged_object_fails_before_parsing(cli_repo):
    """A body that would make msgpack allocate 4 G entries is never parsed: the tag fails."""
    with Repository.open(str(cli_repo.repo), cli_repo.password.encode()) as repo:
        bomb = b"\xdd\xff\xff\xff\xff" * 10
        forged = OBJECT_MAGIC + bytes([1, 2, 2, 0]) + os.urandom(12) + bomb + os.urandom(16)

        with pytest.raises(IntegrityError, match="failed authentication"):
            decode_object(repo.keys, ObjectKind.INDEX, "index/" + "ab" * 32, forged)


def test_oversized_snapshot_not_read(cli_repo, run_cas):
    """A 300 MiB (sparse) snapshot object is rejected from its size, before any read."""
    Repository.open(str(cli_repo.repo), cli_repo.password.encode()).close()
    path = cli_repo.repo / "snapshots" / ("cd" * 32)
    path.parent.mkdir(exist_ok=True)
    with open(path, "wb") as file:
        file.truncate(300 << 20)

    result = run_cas("check", expect=3)

    assert "over the limit" in result.stderr


def test_trailer_header_size_bounded():
    huge = struct.pack("<I", 0xFFFFFFF0) + b"CASE"

    with pytest.raises(IntegrityError, match="claims a header"):
        parse_trailer(huge, 1 << 20, "data/00/00")


@pytest.mark.parametrize(
    "entry",
    [
        [b"\x01" * 32, 0, 0, 0, 40, 100, MAX_BLOB_RAW_SIZE + 1],
        [b"\x01" * 32, 0, 0, 0, 40, 1 << 40, 1 << 40],
        [b"\x01" * 32, 0, 1, 0, 40, 5000, 100],
        [b"\x01" * 32, 0, 0, 0, 2, 100, 100],
        [b"\x01" * 31, 0, 0, 0, 40, 100, 100],
    ],
    ids=["raw-over-max", "stored-huge", "stored-over-raw", "in-prologue", "short-id"],
)
def test_pack_entry_bounds(entry):
    with pytest.raises(IntegrityError):
        parse_entry(entry, 0, 1 << 30, "pack")


def test_lz4_output_limited_to_raw_size(cli_repo):
    """A blob whose lz4 block expands past its authenticated raw size is rejected."""
    with Repository.open(str(cli_repo.repo), cli_repo.password.encode()) as repo:
        content = bytes(1 << 20)
        packed = lz4.block.compress(content, store_size=False)
        blob_id = repo.keys.blob_id(content[:100])
        writer = PackWriter(repo.keys, 1 << 20, 2 << 20)
        entry = writer.add(BlobType.CHUNK, blob_id, packed, Codec.LZ4, 100)
        pack = bytes(writer.finish())
        key_mode, salt = parse_prologue(pack[:40], "pack")
        opener = BlobOpener(repo.keys, writer.pack_id, key_mode, salt)
        stored = pack[entry.offset : entry.offset + entry.stored_size]

        with pytest.raises(IntegrityError, match="does not decompress"):
            opener.open(blob_id, 0, Codec.LZ4, 0, 100, entry.offset, stored)


@pytest.mark.parametrize(
    "data",
    [
        b"\xdd\xff\xff\xff\xff",  # array of 2^32 - 1 items
        b"\xdf\xff\xff\xff\xff",  # map of 2^32 - 1 pairs
        b"\xc6\xff\xff\xff\xff",  # bin of 4 GiB
        b"\xdb\xff\xff\xff\xff",  # str of 4 GiB
        b"\x91" * 100_000,  # arrays nested 100,000 deep
        b"\xc7\x01\x05\x00",  # extension type
        b"\xa2\xff\xfe",  # str that is not UTF-8
    ],
    ids=["array", "map", "bin", "str", "deep", "ext", "utf8"],
)
def test_msgpack_limits(data):
    with pytest.raises(IntegrityError):
        unpack_msgpack(data, "test input")


def test_msgpack_input_size_limit():
    with pytest.raises(IntegrityError, match="over the limit"):
        unpack_msgpack(bytes(1025), "test input", max_size=1024)


# Depth


def test_tree_deeper_than_recursion_limit(crafter, run_cas, tmp_path):
    """Folders nested past Python's recursion limit are checked and restored, not a crash."""
    depth = 1100
    nodes = [crafter.file(b"bottom.bin", b"at the bottom")]
    for _ in range(depth):
        nodes = [crafter.folder(b"d", nodes)]
    snapshot = crafter.snapshot(nodes)
    dest = tmp_path / "dest"

    try:
        run_cas("check", "--quiet")
        run_cas("checkout", snapshot, dest, "--quiet")

        assert read_deep_file(dest, depth, "bottom.bin") == b"at the bottom"
    finally:
        # pytest removes old temporary folders recursively, which fails at this depth,
        # so the restored tree must not outlive the test. GNU rm has no depth limit.
        subprocess.run(["rm", "-rf", str(dest)], check=True)


def read_deep_file(top: Path, depth: int, name: str) -> bytes:
    """Read a file ``depth`` folders named ``d`` below ``top``; the path is too long to open."""
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(depth):
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        reader = os.open(name, os.O_RDONLY, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        return os.read(reader, 1000)
    finally:
        os.close(reader)
