"""Rollback and partial checkout: `Restorer` into folders that are not empty, and --include.

A rollback target starts as a checkout of the snapshot and is then changed. Files become
longer, shorter, or different at the same size and mtime. Files are added and removed, a
folder and a file swap places, and symlinks point elsewhere or outside. After the rollback
the target must equal the snapshot again, and files that still matched must keep their
inode. Nothing outside the target may change.
"""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import blake3
import pytest
from conftest import tree_state

from cas.archiver import Archiver, SnapshotOptions
from cas.errors import UsageError
from cas.index import pack_name
from cas.restorer import CheckoutOptions, CheckoutResult, Restorer
from cas.target import PARALLEL_DIGEST_MIN_SIZE, TEMP_PREFIX, digest_fd, digest_threads

KIB = 1 << 10
BASE_MTIME_NS = 1_650_000_000_000_000_123


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


SOURCE_FILES = {
    "longer.bin": random_bytes(40 * KIB, 1),
    "shorter.bin": random_bytes(30 * KIB, 2),
    "same.bin": random_bytes(120 * KIB, 3),
    "same-size.bin": random_bytes(20 * KIB, 4),
    "touched.bin": random_bytes(10 * KIB, 5),
    "was-link.bin": b"a file where the target has a symlink\n",
    "swap-file": b"a file where the target has a folder\n",
    "swap-dir/inside.txt": b"a folder where the target has a file\n",
    "link-dir/inside.txt": b"a folder where the target has a symlink\n",
    "sub/missing.txt": b"deleted from the target\n",
    "sub/deep/kept.txt": b"stays\n",
}


def build_source(root: Path) -> None:
    """Create SOURCE_FILES, one symlink and distinct modes and mtimes below ``root``."""
    for rel, content in SOURCE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (root / "link").symlink_to("same.bin")
    os.chmod(root / "same.bin", 0o640)
    os.chmod(root / "sub" / "deep", 0o750)
    paths = sorted(root.rglob("*"), key=lambda path: len(path.parts), reverse=True)
    for number, path in enumerate(paths):
        if not path.is_symlink():
            mtime_ns = BASE_MTIME_NS + number * 1_000_000_007
            os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    build_source(root)
    return root


@pytest.fixture
def snapshot(repo, source):
    return Archiver(repo, SnapshotOptions(threads=1)).run([str(source)]).snapshot


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the target that no checkout may change."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "victim").write_bytes(b"outside content")
    return folder


def checkout(repo, snapshot, dest: Path, **options: Any) -> CheckoutResult:
    return Restorer(repo, snapshot, str(dest), CheckoutOptions(threads=1, **options)).run()


def set_mtime(path: Path, mtime_ns: int) -> None:
    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def change_target(dest: Path, outside: Path) -> None:
    """Change a checkout of the snapshot in every way a rollback must undo."""
    (dest / "longer.bin").write_bytes(SOURCE_FILES["longer.bin"] + random_bytes(9 * KIB, 10))
    (dest / "shorter.bin").write_bytes(SOURCE_FILES["shorter.bin"][: 5 * KIB])
    # Same size and mtime, other bytes: only the digest shows the change.
    same_size = dest / "same-size.bin"
    mtime_ns = same_size.stat().st_mtime_ns
    same_size.write_bytes(random_bytes(20 * KIB, 11))
    set_mtime(same_size, mtime_ns)
    # Same bytes, new mtime: rewritten, because only a matching mtime is read back.
    os.utime(dest / "touched.bin")
    (dest / "was-link.bin").unlink()
    (dest / "was-link.bin").symlink_to(outside / "victim")
    (dest / "swap-file").unlink()
    (dest / "swap-file").mkdir()
    (dest / "swap-file" / "old.txt").write_bytes(b"old")
    (dest / "swap-dir" / "inside.txt").unlink()
    (dest / "swap-dir").rmdir()
    (dest / "swap-dir").write_bytes(b"a file in the folder's place")
    (dest / "link-dir" / "inside.txt").unlink()
    (dest / "link-dir").rmdir()
    (dest / "link-dir").symlink_to(outside)
    (dest / "link").unlink()
    (dest / "link").symlink_to("shorter.bin")
    (dest / "sub" / "missing.txt").unlink()
    (dest / "extra.txt").write_bytes(b"not in the snapshot")
    (dest / "sub" / "extra-dir" / "inner").mkdir(parents=True)
    (dest / "sub" / "extra-dir" / "inner" / "x.txt").write_bytes(b"x")


@pytest.fixture
def changed(repo, snapshot, tmp_path, outside) -> Path:
    dest = tmp_path / "dest"
    assert checkout(repo, snapshot, dest).failed == ()
    change_target(dest, outside)
    return dest


def inode(path: Path) -> int:
    return path.stat().st_ino


# Rollback


def test_rollback_restores_snapshot(repo, snapshot, source, changed, outside):
    result = checkout(repo, snapshot, changed, overwrite=True, delete=True)

    assert result.failed == ()
    assert tree_state(changed) == tree_state(source)
    assert (outside / "victim").read_bytes() == b"outside content"
    assert sorted(path.name for path in outside.iterdir()) == ["victim"]


def test_rollback_keeps_matching_files(repo, snapshot, changed):
    kept = ["same.bin", "sub/deep/kept.txt"]
    before = {rel: (inode(changed / rel), (changed / rel).stat().st_mtime_ns) for rel in kept}

    result = checkout(repo, snapshot, changed, overwrite=True)

    for rel in kept:
        assert inode(changed / rel) == before[rel][0], rel
        assert (changed / rel).stat().st_mtime_ns == before[rel][1], rel
    assert result.unchanged == 2


def test_rollback_rewrites_under_new_inode(repo, snapshot, changed):
    rewritten = ["longer.bin", "shorter.bin", "same-size.bin", "touched.bin"]
    before = {rel: inode(changed / rel) for rel in rewritten}

    result = checkout(repo, snapshot, changed, overwrite=True)

    for rel in rewritten:
        assert inode(changed / rel) != before[rel], rel
        assert (changed / rel).read_bytes() == SOURCE_FILES[rel], rel
    # The four above, the symlink replaced by was-link.bin, and the folder by swap-file.
    assert result.rewritten == 6
    assert result.created == 3  # swap-dir/inside.txt, link-dir/inside.txt, sub/missing.txt
    expected_bytes = sum(len(SOURCE_FILES[rel]) for rel in SOURCE_FILES) - sum(
        len(SOURCE_FILES[rel]) for rel in ("same.bin", "sub/deep/kept.txt")
    )
    assert result.bytes_written == expected_bytes


def test_rollback_without_delete_keeps_extras(repo, snapshot, changed):
    result = checkout(repo, snapshot, changed, overwrite=True)

    assert result.failed == ()
    assert result.deleted == 0
    assert (changed / "extra.txt").read_bytes() == b"not in the snapshot"
    assert (changed / "sub" / "extra-dir" / "inner" / "x.txt").exists()


def test_rollback_delete_removes_extras(repo, snapshot, changed):
    result = checkout(repo, snapshot, changed, overwrite=True, delete=True)

    assert result.deleted == 2
    assert not (changed / "extra.txt").exists()
    assert not (changed / "sub" / "extra-dir").exists()


def test_rollback_replaces_swapped_entries(repo, snapshot, changed):
    checkout(repo, snapshot, changed, overwrite=True)

    assert (changed / "swap-file").read_bytes() == SOURCE_FILES["swap-file"]
    assert (changed / "swap-dir").is_dir()
    assert (changed / "swap-dir" / "inside.txt").read_bytes() == SOURCE_FILES["swap-dir/inside.txt"]


def test_rollback_never_follows_symlinks(repo, snapshot, changed, outside):
    checkout(repo, snapshot, changed, overwrite=True, delete=True)

    assert not (changed / "was-link.bin").is_symlink()
    assert (changed / "was-link.bin").read_bytes() == SOURCE_FILES["was-link.bin"]
    assert not (changed / "link-dir").is_symlink()
    assert os.readlink(changed / "link") == "same.bin"
    assert (outside / "victim").read_bytes() == b"outside content"
    assert sorted(path.name for path in outside.iterdir()) == ["victim"]


def test_delete_never_enters_symlinked_folder(repo, snapshot, tmp_path, outside):
    dest = tmp_path / "dest"
    checkout(repo, snapshot, dest)
    (dest / "sub" / "to-outside").symlink_to(outside)

    result = checkout(repo, snapshot, dest, overwrite=True, delete=True)

    assert result.deleted == 1
    assert not os.path.lexists(dest / "sub" / "to-outside")
    assert (outside / "victim").read_bytes() == b"outside content"


def test_rollback_restores_modes_of_kept_file(repo, snapshot, tmp_path):
    dest = tmp_path / "dest"
    checkout(repo, snapshot, dest)
    os.chmod(dest / "same.bin", 0o600)
    number = inode(dest / "same.bin")

    result = checkout(repo, snapshot, dest, overwrite=True)

    assert result.unchanged == len(SOURCE_FILES)
    assert stat.S_IMODE((dest / "same.bin").stat().st_mode) == 0o640
    assert inode(dest / "same.bin") == number


def test_rollback_of_unchanged_target_writes_nothing(repo, snapshot, tmp_path):
    dest = tmp_path / "dest"
    checkout(repo, snapshot, dest)

    result = checkout(repo, snapshot, dest, overwrite=True, delete=True)

    assert result.unchanged == len(SOURCE_FILES)
    assert result.rewritten == 0
    assert result.created == 0
    assert result.deleted == 0
    assert result.bytes_written == 0


def test_failed_rewrite_keeps_old_file(repo, snapshot, tmp_path):
    """A damaged chunk fails the rewrite; the old file stays and no temporary file is left."""
    dest = tmp_path / "dest"
    checkout(repo, snapshot, dest)
    old = b"old content of the same length".ljust(len(SOURCE_FILES["same.bin"]), b".")
    (dest / "same.bin").write_bytes(old)
    node = next(n for n in repo.load_tree(snapshot.tree_id) if n.name == b"same.bin")
    location = repo.index.lookup(node.chunk_ids[0])
    pack = Path(repo.backend.root) / pack_name(location.pack_id)
    with open(pack, "r+b") as file:
        file.seek(location.offset + 8)
        value = file.read(1)[0]
        file.seek(location.offset + 8)
        file.write(bytes([value ^ 1]))

    result = checkout(repo, snapshot, dest, overwrite=True)

    assert [path for path, _ in result.failed] == [str(dest / "same.bin")]
    assert "left as it was" in result.failed[0][1]
    assert (dest / "same.bin").read_bytes() == old
    assert not [path for path in dest.rglob("*") if path.name.encode().startswith(TEMP_PREFIX)]


def test_rollback_target_mode_readonly_folder(repo, snapshot, tmp_path):
    dest = tmp_path / "dest"
    checkout(repo, snapshot, dest)
    (dest / "sub" / "deep" / "kept.txt").unlink()
    os.chmod(dest / "sub" / "deep", 0o500)

    result = checkout(repo, snapshot, dest, overwrite=True)

    assert result.failed == ()
    assert (dest / "sub" / "deep" / "kept.txt").read_bytes() == SOURCE_FILES["sub/deep/kept.txt"]
    assert stat.S_IMODE((dest / "sub" / "deep").stat().st_mode) == 0o750


def test_rollback_hard_link_relinked(repo, tmp_path):
    source = tmp_path / "linked"
    source.mkdir()
    (source / "a.bin").write_bytes(random_bytes(10 * KIB, 20))
    os.link(source / "a.bin", source / "b.bin")
    snapshot = Archiver(repo, SnapshotOptions(threads=1)).run([str(source)]).snapshot
    dest = tmp_path / "dest"
    checkout(repo, snapshot, dest)
    (dest / "b.bin").unlink()
    (dest / "b.bin").write_bytes(b"separate file")

    first = checkout(repo, snapshot, dest, overwrite=True)
    second = checkout(repo, snapshot, dest, overwrite=True)

    assert first.failed == ()
    assert inode(dest / "b.bin") == inode(dest / "a.bin")
    assert first.rewritten == 1
    assert second.unchanged == 2


# Partial checkout


def test_include_one_file(repo, snapshot, source, tmp_path):
    dest = tmp_path / "dest"

    result = checkout(repo, snapshot, dest, include=("same.bin",))

    assert result.files == 1
    assert tree_state(dest) == {"same.bin": tree_state(source)["same.bin"]}


def test_include_nested_folder_parents_metadata(repo, snapshot, source, tmp_path):
    dest = tmp_path / "dest"

    result = checkout(repo, snapshot, dest, include=("/sub/deep",))

    expected = {rel: value for rel, value in tree_state(source).items() if rel.startswith("sub")}
    del expected["sub/missing.txt"]
    assert result.files == 1
    assert tree_state(dest) == expected


def test_include_several_paths(repo, snapshot, source, tmp_path):
    dest = tmp_path / "dest"
    paths = ("link", "swap-dir", "sub/missing.txt", "sub")

    result = checkout(repo, snapshot, dest, include=paths)

    wanted = ("link", "swap-dir", "sub")
    expected = {
        rel: value
        for rel, value in tree_state(source).items()
        if any(rel == top or rel.startswith(top + "/") for top in wanted)
    }
    assert result.files == 3
    assert tree_state(dest) == expected


def test_include_root_is_whole_snapshot(repo, snapshot, source, tmp_path):
    dest = tmp_path / "dest"

    checkout(repo, snapshot, dest, include=("/",))

    assert tree_state(dest) == tree_state(source)


def test_include_missing_path_writes_nothing(repo, snapshot, tmp_path):
    dest = tmp_path / "dest"

    with pytest.raises(UsageError, match="sub/nothing"):
        checkout(repo, snapshot, dest, include=("same.bin", "sub/nothing"))

    assert not dest.exists()


def test_include_below_file_is_error(repo, snapshot, tmp_path):
    with pytest.raises(UsageError, match=r"same\.bin"):
        checkout(repo, snapshot, tmp_path / "dest", include=("same.bin/x",))


def test_include_dot_dot_is_error(repo, snapshot, tmp_path):
    with pytest.raises(UsageError, match="not allowed"):
        checkout(repo, snapshot, tmp_path / "dest", include=("sub/../same.bin",))


def test_include_rollback_deletes_only_inside(repo, snapshot, changed):
    result = checkout(repo, snapshot, changed, overwrite=True, delete=True, include=("sub",))

    assert result.failed == ()
    assert result.deleted == 1
    assert not (changed / "sub" / "extra-dir").exists()
    assert (changed / "sub" / "missing.txt").read_bytes() == SOURCE_FILES["sub/missing.txt"]
    assert (changed / "extra.txt").exists()
    assert (changed / "longer.bin").stat().st_size != len(SOURCE_FILES["longer.bin"])


# The CLI


def test_cli_rollback_json(cli_repo, run_cas, tmp_path, outside):
    source = tmp_path / "cli-src"
    build_source(source)
    run_cas("snapshot", source, "--quiet")
    dest = tmp_path / "cli-dest"
    run_cas("checkout", "latest", dest, "--quiet")
    change_target(dest, outside)

    result = run_cas("checkout", "latest", dest, "--overwrite", "--delete", "--json")

    output = json.loads(result.stdout)
    assert output["unchanged"] == 2
    assert output["rewritten"] == 6
    assert output["created"] == 3
    assert output["deleted"] == 2
    assert output["failed"] == []
    assert tree_state(dest) == tree_state(source)


def test_cli_include_json_and_missing(cli_repo, run_cas, tmp_path):
    source = tmp_path / "cli-src"
    build_source(source)
    run_cas("snapshot", source, "--quiet")
    dest = tmp_path / "cli-dest"

    missing = run_cas("checkout", "latest", dest, "--include", "sub/nothing", expect=2)
    result = run_cas("checkout", "latest", dest, "--include", "sub/deep", "--json")

    assert "/sub/nothing" in missing.stderr
    output = json.loads(result.stdout)
    assert output["include"] == ["sub/deep"]
    assert output["files"] == 1
    assert (dest / "sub" / "deep" / "kept.txt").read_bytes() == SOURCE_FILES["sub/deep/kept.txt"]


def test_cli_delete_needs_overwrite(cli_repo, run_cas, tmp_path):
    result = run_cas("checkout", "latest", tmp_path / "dest", "--delete", expect=2)

    assert "--overwrite" in result.stderr


def test_rollback_large_file_streamed(repo, tmp_path):
    """A file of 16 MiB or more is rewritten through the streaming path, into a temporary file."""
    source = tmp_path / "large"
    source.mkdir()
    content = random_bytes(17 << 20, 30)
    (source / "shard.bin").write_bytes(content)
    snapshot = Archiver(repo, SnapshotOptions(threads=1)).run([str(source)]).snapshot
    dest = tmp_path / "dest"
    checkout(repo, snapshot, dest)
    (dest / "shard.bin").write_bytes(content[: 3 << 20] + random_bytes(15 << 20, 31))
    number = inode(dest / "shard.bin")

    result = checkout(repo, snapshot, dest, overwrite=True)

    assert result.failed == ()
    assert result.rewritten == 1
    assert inode(dest / "shard.bin") != number
    assert (dest / "shard.bin").read_bytes() == content


def test_temp_file_failure_keeps_old_file(repo, snapshot, tmp_path, monkeypatch):
    """A full disk when the temporary file is created must leave the old file untouched."""
    import errno

    import cas.restoreplan

    dest = tmp_path / "dest"
    checkout(repo, snapshot, dest)
    old = b"old content that is longer than the snapshot's file" * 1000
    (dest / "shorter.bin").write_bytes(old)

    def no_space(dir_fd: int) -> bytes:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # Fault injection: the real create_temp, failing as it would on a full disk.
    monkeypatch.setattr(cas.restoreplan, "create_temp", no_space)
    result = checkout(repo, snapshot, dest, overwrite=True)

    assert [path for path, _ in result.failed] == [str(dest / "shorter.bin")]
    assert result.failed[0][1].startswith("write failed")
    assert (dest / "shorter.bin").read_bytes() == old


@pytest.mark.parametrize(
    ("size", "threads", "expected"),
    [
        (0, 2, 1),
        (2048, 2, 1),
        (PARALLEL_DIGEST_MIN_SIZE - 1, 2, 1),
        (PARALLEL_DIGEST_MIN_SIZE, 2, 2),
        (PARALLEL_DIGEST_MIN_SIZE, 1, 1),
        (1 << 30, 2, 2),
    ],
)
def test_digest_threads_by_size(size: int, threads: int, expected: int) -> None:
    assert digest_threads(size, threads) == expected


def test_digest_fd_matches_blake3(tmp_path: Path) -> None:
    for size in (0, 2048, PARALLEL_DIGEST_MIN_SIZE + 4096):
        data = random.Random(size).randbytes(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            assert digest_fd(fd, size, 2) == blake3.blake3(data).digest()
        finally:
            os.close(fd)
