"""`cas dump`: one file to stdout, a folder as a tar stream read back by the real `tar`.

The CLI runs as a subprocess with binary stdout. Damage is a flipped byte inside a stored
chunk, which must stop the dump with exit code 3.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pty
import random
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT_SECONDS, CasEnv, tree_state

from cas.dump import iter_content
from cas.errors import IntegrityError
from cas.index import pack_name
from cas.repository import Repository

KIB = 1 << 10
BASE_MTIME_NS = 1_650_000_000_000_000_123

needs_tar = pytest.mark.skipif(shutil.which("tar") is None, reason="needs the tar program")


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


FILES = {
    "model.bin": random_bytes(300 * KIB, 1),
    "config.json": b'{"layers": 4}\n',
    "empty.bin": b"",
    "tokenizer/vocab.txt": b"a\nb\nc\n",
    "tokenizer/deep/merges.txt": random_bytes(5 * KIB, 2),
}


def run_dump(env: CasEnv, *args: str | os.PathLike[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `cas dump` with binary stdout and return the completed process."""
    kwargs.setdefault("capture_output", True)
    return subprocess.run(
        [sys.executable, "-m", "cas_cli.main", "dump", *map(str, args)],
        env=env.env,
        stdin=subprocess.DEVNULL,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
        **kwargs,
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "src"
    for rel, content in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (root / "tokenizer" / "link").symlink_to("vocab.txt")
    os.link(root / "model.bin", root / "model-link.bin")
    os.chmod(root / "config.json", 0o600)
    os.chmod(root / "tokenizer" / "deep", 0o750)
    paths = sorted(root.rglob("*"), key=lambda path: len(path.parts), reverse=True)
    for number, path in enumerate(paths):
        if not path.is_symlink():
            mtime_ns = BASE_MTIME_NS + number * 1_000_000_007
            os.utime(path, ns=(mtime_ns, mtime_ns))
    return root


@pytest.fixture
def stored(cli_repo, run_cas, source) -> str:
    """Snapshot ``source`` through the CLI and return the snapshot id."""
    return json.loads(run_cas("snapshot", source, "--json").stdout)["id"]


def damage_chunk(env: CasEnv, tmp_path: Path, snapshot_hex: str, name: bytes) -> None:
    """Flip one byte inside the last stored chunk of the root entry ``name``."""
    with Repository.open(
        str(env.repo), env.password.encode(), cache_dir=tmp_path / "inspect-cache"
    ) as repo:
        snapshot = repo.load_snapshot(snapshot_hex)
        node = next(node for node in repo.load_tree(snapshot.tree_id) if node.name == name)
        location = repo.index.lookup(node.chunk_ids[-1])
    assert location is not None
    pack = env.repo / pack_name(location.pack_id)
    with open(pack, "r+b") as file:
        file.seek(location.offset + location.stored_size // 2)
        value = file.read(1)[0]
        file.seek(location.offset + location.stored_size // 2)
        file.write(bytes([value ^ 1]))


# Files


def test_dump_file_to_stdout(cli_repo, stored):
    result = run_dump(cli_repo, "latest", "/model.bin")

    assert result.returncode == 0, result.stderr
    assert result.stdout == FILES["model.bin"]


def test_dump_empty_file(cli_repo, stored):
    result = run_dump(cli_repo, "latest", "empty.bin")

    assert result.returncode == 0, result.stderr
    assert result.stdout == b""


def test_dump_file_to_output_json(cli_repo, stored, tmp_path):
    output = tmp_path / "out.bin"

    result = run_dump(cli_repo, stored[:12], "tokenizer/deep/merges.txt", "-o", output, "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["id"] == stored
    assert document["path"] == "/tokenizer/deep/merges.txt"
    assert document["format"] == "file"
    assert document["output"] == str(output)
    assert document["files"] == 1
    assert document["bytes_written"] == len(FILES["tokenizer/deep/merges.txt"])
    assert output.read_bytes() == FILES["tokenizer/deep/merges.txt"]


def test_dump_damaged_chunk_exits_3(cli_repo, stored, tmp_path):
    damage_chunk(cli_repo, tmp_path, stored, b"model.bin")

    result = run_dump(cli_repo, "latest", "model.bin")

    assert result.returncode == 3
    assert b"model.bin" in result.stderr
    assert b"failed authentication" in result.stderr
    assert len(result.stdout) < len(FILES["model.bin"])
    assert b"Traceback" not in result.stderr


def test_dump_damaged_chunk_leaves_no_output(cli_repo, stored, tmp_path):
    damage_chunk(cli_repo, tmp_path, stored, b"model.bin")
    output = tmp_path / "out.bin"
    output.write_bytes(b"older dump")

    result = run_dump(cli_repo, "latest", "model.bin", "-o", output, "--json")

    assert result.returncode == 3
    assert json.loads(result.stdout)["exit_code"] == 3
    assert output.read_bytes() == b"older dump"
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".cas")) == []


def test_digest_mismatch_holds_last_chunk(repo, tmp_path):
    from cas.archiver import Archiver, SnapshotOptions

    source = tmp_path / "lib-src"
    source.mkdir()
    content = random_bytes(200 * KIB, 3)
    (source / "a.bin").write_bytes(content)
    snapshot = Archiver(repo, SnapshotOptions(threads=1)).run([str(source)]).snapshot
    node = repo.load_tree(snapshot.tree_id)[0]
    assert len(node.chunk_ids) > 1
    wrong = dataclasses.replace(node, digest=bytes(32))
    received: list[bytes] = []

    with pytest.raises(IntegrityError, match="digest"):
        for chunk in iter_content(repo, wrong, "/a.bin"):
            received.append(chunk)

    assert b"".join(received) == content[: len(content) - node.sizes[-1]]
    assert b"".join(iter_content(repo, node, "/a.bin")) == content


# Folders as tar


@needs_tar
def test_dump_folder_through_tar(cli_repo, stored, source, tmp_path):
    dump = run_dump(cli_repo, "latest", "/tokenizer")
    extracted = tmp_path / "extracted"
    extracted.mkdir()

    tar = subprocess.run(
        ["tar", "-x", "-f", "-", "-C", str(extracted)],
        input=dump.stdout,
        capture_output=True,
        check=False,
    )

    assert dump.returncode == 0, dump.stderr
    assert tar.returncode == 0, tar.stderr
    expected = {
        rel: value for rel, value in tree_state(source).items() if rel.startswith("tokenizer")
    }
    assert tree_state(extracted) == expected


@needs_tar
def test_dump_root_through_tar_pipe(cli_repo, stored, source, tmp_path):
    extracted = tmp_path / "extracted"
    extracted.mkdir()

    # The shell pipes cas straight into tar, so the stream is never seekable.
    pipeline = subprocess.run(
        f"{sys.executable} -m cas_cli.main dump latest / | tar -x -f - -C {extracted}",
        shell=True,
        env=cli_repo.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=CLI_TIMEOUT_SECONDS,
        check=False,
    )

    assert pipeline.returncode == 0, pipeline.stderr
    assert tree_state(extracted) == tree_state(source)
    model = (extracted / "model.bin").stat()
    assert model.st_ino == (extracted / "model-link.bin").stat().st_ino


def test_dump_tar_headers(cli_repo, stored, source):
    result = run_dump(cli_repo, "latest", "/")

    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        members = {member.name: member for member in archive}
    st = (source / "config.json").stat()
    config = members["config.json"]
    assert config.mode == 0o600
    assert config.uid == st.st_uid
    assert config.pax_headers["mtime"] == f"{st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d}"
    # Names sort bytewise, so model-link.bin is the first path of the linked file.
    assert members["model.bin"].islnk()
    assert members["model.bin"].linkname == "model-link.bin"
    assert members["tokenizer/link"].issym()
    assert members["tokenizer/link"].linkname == "vocab.txt"
    assert members["tokenizer/deep"].isdir()


def test_dump_tar_user_names(cli_repo, stored, source):
    import grp
    import pwd

    result = run_dump(cli_repo, "latest", "/config.json", "--archive", "tar")

    with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
        (member,) = archive.getmembers()
    st = (source / "config.json").stat()
    assert member.name == "config.json"
    assert member.uname == pwd.getpwuid(st.st_uid).pw_name
    assert member.gname == grp.getgrgid(st.st_gid).gr_name


def test_dump_folder_json(cli_repo, stored, tmp_path):
    output = tmp_path / "tokenizer.tar"

    result = run_dump(cli_repo, "latest", "tokenizer", "-o", output, "--json")

    document = json.loads(result.stdout)
    assert document["format"] == "tar"
    assert document["files"] == 2
    assert document["bytes_written"] == output.stat().st_size
    with tarfile.open(output) as archive:
        names = sorted(archive.getnames())
    assert names == [
        "tokenizer",
        "tokenizer/deep",
        "tokenizer/deep/merges.txt",
        "tokenizer/link",
        "tokenizer/vocab.txt",
    ]


def test_dump_tar_damaged_chunk_exits_3(cli_repo, stored, tmp_path):
    damage_chunk(cli_repo, tmp_path, stored, b"model.bin")

    result = run_dump(cli_repo, "latest", "/")

    assert result.returncode == 3
    assert b"/model-link.bin" in result.stderr


# Refusals


def test_dump_refuses_terminal(cli_repo, stored):
    controller, terminal = pty.openpty()
    try:
        result = run_dump(
            cli_repo,
            "latest",
            "model.bin",
            capture_output=False,
            stdout=terminal,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(terminal)
        os.close(controller)

    assert result.returncode == 2
    assert b"terminal" in result.stderr
    assert b"-o FILE" in result.stderr


def test_dump_json_needs_output(cli_repo, stored):
    result = run_dump(cli_repo, "latest", "model.bin", "--json")

    assert result.returncode == 2
    assert json.loads(result.stdout)["exit_code"] == 2


def test_dump_missing_path(cli_repo, stored):
    result = run_dump(cli_repo, "latest", "tokenizer/nothing")

    assert result.returncode == 2
    assert b"/tokenizer/nothing" in result.stderr
    assert b"`cas ls SNAPSHOT` lists its paths" in result.stderr
    assert result.stdout == b""


@needs_tar
def test_dump_non_utf8_names(cli_repo, run_cas, tmp_path):
    source = tmp_path / "odd"
    source.mkdir()
    os.mkdir(os.fsencode(source) + b"/d\xff")
    with open(os.fsencode(source) + b"/d\xff/caf\xe9.txt", "wb") as file:
        file.write(b"latin-1 name")
    run_cas("snapshot", source, "--quiet")
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    output = tmp_path / "odd.tar"

    result = run_dump(cli_repo, "latest", "/", "-o", output, "--json")
    tar = subprocess.run(
        ["tar", "-x", "-f", str(output), "-C", str(extracted)], capture_output=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/"
    assert tar.returncode == 0, tar.stderr
    with open(os.fsencode(extracted) + b"/d\xff/caf\xe9.txt", "rb") as file:
        assert file.read() == b"latin-1 name"
