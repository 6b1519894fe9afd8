"""Round trips: snapshot a tree, check it out, and compare bytes, types, modes and mtimes.

The tree covers empty files and folders, nested folders, relative and dangling symlinks,
and file sizes around the test chunker's bounds (min 4096, max 65536 bytes) up to a few
MiB of random and of all-zero data.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from pathlib import Path
from typing import Any

import pytest

from cas.archiver import Archiver, SnapshotOptions
from cas.chunker import cut_points
from cas.restorer import CheckoutOptions, Restorer

MIB = 1 << 20
MIN_SIZE = 4096
MAX_SIZE = 65536
# With a memory limit below 128 MiB the archiver reads 4 MiB blocks, so ZERO_SIZE is exactly
# one block and RANDOM_SIZE spans two.
SMALL_MEMORY_LIMIT = 64 << 20
RANDOM_SIZE = 5 * MIB + 3
ZERO_SIZE = 4 * MIB
BOUNDARY_SIZES = {
    "empty.bin": 0,
    "one.bin": 1,
    "below-min.bin": MIN_SIZE - 1,
    "min.bin": MIN_SIZE,
    "max.bin": MAX_SIZE,
    "above-max.bin": MAX_SIZE + 1,
}
FILE_COUNT = len(BOUNDARY_SIZES) + 3  # random.bin, zeros.bin and nested/a/b/deep.txt
BASE_MTIME_NS = 1_600_000_000_123_456_789


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def build_tree(root: Path) -> None:
    """Create the test tree below ``root`` with distinct modes and nanosecond mtimes."""
    root.mkdir()
    for seed, (name, size) in enumerate(BOUNDARY_SIZES.items()):
        (root / name).write_bytes(random_bytes(size, seed))
    (root / "random.bin").write_bytes(random_bytes(RANDOM_SIZE, 100))
    (root / "zeros.bin").write_bytes(bytes(ZERO_SIZE))
    (root / "empty-dir").mkdir()
    deep = root / "nested" / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "deep.txt").write_bytes(b"deep\n")
    (root / "link-relative").symlink_to("nested/a/b/deep.txt")
    (root / "link-dangling").symlink_to("does-not-exist")

    os.chmod(root / "one.bin", 0o600)
    os.chmod(root / "min.bin", 0o755)
    os.chmod(root / "max.bin", 0o444)
    os.chmod(deep, 0o750)

    # Children first, so that setting a folder's mtime is the last change inside it.
    paths = [path for path in root.rglob("*") if not path.is_symlink()]
    paths.sort(key=lambda path: len(path.parts), reverse=True)
    for number, path in enumerate(paths):
        mtime_ns = BASE_MTIME_NS + number * 1_000_000_007
        os.utime(path, ns=(mtime_ns, mtime_ns))


def tree_state(root: Path) -> dict[str, dict[str, Any]]:
    """Return each entry's type, content digest, mode, mtime and symlink target by aspect.

    Symlinks have no mode or mtime entry, because Linux ignores symlink modes and the
    restorer does not set symlink times (see test_roundtrip_symlink_mtime).
    """
    state: dict[str, dict[str, Any]] = {
        "types": {},
        "digests": {},
        "modes": {},
        "mtimes": {},
        "targets": {},
    }
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            state["types"][rel] = "symlink"
            state["targets"][rel] = os.readlink(path)
            continue
        state["types"][rel] = "dir" if stat.S_ISDIR(st.st_mode) else "file"
        state["modes"][rel] = oct(stat.S_IMODE(st.st_mode))
        state["mtimes"][rel] = st.st_mtime_ns
        if stat.S_ISREG(st.st_mode):
            state["digests"][rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def assert_same_tree(restored_root: Path, source_root: Path) -> None:
    restored = tree_state(restored_root)
    expected = tree_state(source_root)
    assert restored["types"] == expected["types"]
    assert restored["digests"] == expected["digests"]
    assert restored["modes"] == expected["modes"]
    assert restored["mtimes"] == expected["mtimes"]
    assert restored["targets"] == expected["targets"]


def sparse_files_supported(folder: Path) -> bool:
    probe = folder / "sparse-probe"
    with open(probe, "wb") as file:
        file.truncate(4 * MIB)
    allocated = probe.stat().st_blocks * 512
    probe.unlink()
    return allocated == 0


@pytest.mark.parametrize("threads", [1, 2])
def test_roundtrip_library_tree(repo, tmp_path, threads):
    source = tmp_path / "src"
    build_tree(source)
    options = SnapshotOptions(threads=threads, memory_limit=SMALL_MEMORY_LIMIT)

    result = Archiver(repo, options).run([str(source)])
    dest = tmp_path / "dest"
    checkout = Restorer(repo, result.snapshot, str(dest), CheckoutOptions(threads=threads)).run()

    assert result.warnings == ()
    assert result.files == FILE_COUNT
    assert checkout.failed == ()
    assert checkout.files == FILE_COUNT
    assert checkout.symlinks == 2
    assert_same_tree(dest, source)


def test_roundtrip_chunk_bounds(repo, tmp_path):
    source = tmp_path / "src"
    build_tree(source)
    options = SnapshotOptions(memory_limit=SMALL_MEMORY_LIMIT)

    snapshot = Archiver(repo, options).run([str(source)]).snapshot
    nodes = {node.name.decode(): node for node in repo.load_tree(snapshot.tree_id)}

    for name in [*BOUNDARY_SIZES, "random.bin", "zeros.bin"]:
        sizes = nodes[name].sizes
        assert sum(sizes) == nodes[name].size, name
        assert all(size <= MAX_SIZE for size in sizes), (name, sizes)
        assert all(size >= MIN_SIZE for size in sizes[:-1]), (name, sizes)
    assert nodes["empty.bin"].sizes == ()
    assert nodes["min.bin"].sizes == (MIN_SIZE,)
    assert len(nodes["above-max.bin"].sizes) >= 2


def test_block_reads_match_whole_cut(repo, tmp_path):
    """Reading in 4 MiB blocks cuts the same chunks as one pass over the whole file."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "random.bin").write_bytes(random_bytes(RANDOM_SIZE, 100))
    options = SnapshotOptions(memory_limit=SMALL_MEMORY_LIMIT)

    snapshot = Archiver(repo, options).run([str(source)]).snapshot
    (node,) = repo.load_tree(snapshot.tree_id)
    seed = repo.keys.chunker_seed()
    whole_file = cut_points(source / "random.bin", repo.config.chunker, seed)

    assert list(node.sizes) == [length for _, length in whole_file]


def test_checkout_zero_file_sparse(repo, tmp_path):
    if not sparse_files_supported(tmp_path):
        pytest.skip("the file system under tmp_path does not support sparse files")
    source = tmp_path / "src"
    source.mkdir()
    (source / "zeros.bin").write_bytes(bytes(ZERO_SIZE))
    # Zeros between two random parts: whole chunks inside the zero run stay holes.
    mixed = random_bytes(MAX_SIZE, 1) + bytes(ZERO_SIZE) + random_bytes(MAX_SIZE, 2)
    (source / "mixed.bin").write_bytes(mixed)

    snapshot = Archiver(repo, SnapshotOptions()).run([str(source)]).snapshot
    dest = tmp_path / "dest"
    checkout = Restorer(repo, snapshot, str(dest), CheckoutOptions()).run()

    assert checkout.failed == ()
    assert (dest / "zeros.bin").read_bytes() == bytes(ZERO_SIZE)
    assert (dest / "mixed.bin").read_bytes() == mixed
    assert (dest / "zeros.bin").stat().st_blocks * 512 < MAX_SIZE
    assert (dest / "mixed.bin").stat().st_blocks * 512 < 2 * MIB


def test_roundtrip_empty_folder(repo, tmp_path):
    source = tmp_path / "src"
    source.mkdir()

    result = Archiver(repo, SnapshotOptions()).run([str(source)])
    dest = tmp_path / "dest"
    checkout = Restorer(repo, result.snapshot, str(dest), CheckoutOptions()).run()

    assert result.files == 0
    assert checkout.files == 0
    assert list(dest.iterdir()) == []


def test_roundtrip_non_utf8_name(repo, tmp_path):
    name = b"w\xffeights-\xe9.bin"
    source = tmp_path / "src"
    source.mkdir()
    with open(os.path.join(os.fsencode(source), name), "wb") as file:
        file.write(b"weights")

    snapshot = Archiver(repo, SnapshotOptions()).run([str(source)]).snapshot
    dest = tmp_path / "dest"
    checkout = Restorer(repo, snapshot, str(dest), CheckoutOptions()).run()

    assert checkout.failed == ()
    assert os.listdir(os.fsencode(dest)) == [name]
    with open(os.path.join(os.fsencode(dest), name), "rb") as file:
        assert file.read() == b"weights"


def test_roundtrip_fifo(repo, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    os.mkfifo(source / "pipe")

    snapshot = Archiver(repo, SnapshotOptions()).run([str(source)]).snapshot
    dest = tmp_path / "dest"
    Restorer(repo, snapshot, str(dest), CheckoutOptions()).run()

    assert stat.S_ISFIFO((dest / "pipe").lstat().st_mode)


def test_roundtrip_fifo_metadata(repo, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    os.mkfifo(source / "pipe")
    os.chmod(source / "pipe", 0o666)
    os.utime(source / "pipe", ns=(BASE_MTIME_NS, BASE_MTIME_NS))

    snapshot = Archiver(repo, SnapshotOptions()).run([str(source)]).snapshot
    dest = tmp_path / "dest"
    Restorer(repo, snapshot, str(dest), CheckoutOptions()).run()

    restored = (dest / "pipe").lstat()
    assert stat.S_IMODE(restored.st_mode) == 0o666
    assert restored.st_mtime_ns == BASE_MTIME_NS


def test_roundtrip_symlink_mtime(repo, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "link").symlink_to("target.bin")
    os.utime(source / "link", ns=(BASE_MTIME_NS, BASE_MTIME_NS), follow_symlinks=False)

    snapshot = Archiver(repo, SnapshotOptions()).run([str(source)]).snapshot
    dest = tmp_path / "dest"
    Restorer(repo, snapshot, str(dest), CheckoutOptions()).run()

    assert (dest / "link").lstat().st_mtime_ns == BASE_MTIME_NS


def test_roundtrip_cli_tree(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    build_tree(source)
    dest = tmp_path / "dest"

    run_cas("snapshot", source, "--quiet")
    run_cas("checkout", "latest", dest, "--quiet")

    assert_same_tree(dest, source)


def test_snapshot_folder_content_at_root(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "a.txt").write_bytes(b"a\n")
    (source / "sub" / "b.txt").write_bytes(b"b\n")

    run_cas("snapshot", source, "--quiet")
    listed = [entry["path"] for entry in json.loads(run_cas("ls", "latest", "--json").stdout)]

    assert listed == ["/a.txt", "/sub", "/sub/b.txt"]


def test_snapshot_single_file(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    content = random_bytes(3 * MAX_SIZE, 7)
    (source / "model.bin").write_bytes(content)
    dest = tmp_path / "dest"

    run_cas("snapshot", source / "model.bin", "--quiet")
    listed = json.loads(run_cas("ls", "latest", "--json").stdout)
    run_cas("checkout", "latest", dest, "--quiet")

    assert [entry["path"] for entry in listed] == ["/model.bin"]
    assert listed[0]["size"] == len(content)
    assert sorted(path.name for path in dest.iterdir()) == ["model.bin"]
    assert (dest / "model.bin").read_bytes() == content


def test_snapshot_several_paths(cli_repo, run_cas, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "weights.bin").write_bytes(random_bytes(2 * MAX_SIZE, 1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_bytes(b'{"vocab": []}\n')
    dest = tmp_path / "dest"

    run_cas("snapshot", tmp_path / "ckpt", tmp_path / "other" / "tokenizer.json", "--quiet")
    listed = json.loads(run_cas("ls", "latest", "--json").stdout)
    run_cas("checkout", "latest", dest, "--quiet")

    assert [entry["path"] for entry in listed] == ["/ckpt", "/ckpt/weights.bin", "/tokenizer.json"]
    weights = (tmp_path / "ckpt" / "weights.bin").read_bytes()
    assert (dest / "ckpt" / "weights.bin").read_bytes() == weights
    assert (dest / "tokenizer.json").read_bytes() == b'{"vocab": []}\n'


def test_snapshot_base_name_clash(cli_repo, run_cas, tmp_path):
    first = tmp_path / "run-1" / "model.bin"
    second = tmp_path / "run-2" / "model.bin"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"weights")

    result = run_cas("snapshot", first, second, expect=2)
    log = json.loads(run_cas("log", "--json").stdout)

    assert str(first) in result.stderr
    assert str(second) in result.stderr
    assert log == []
