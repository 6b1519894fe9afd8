"""The `cas` command line: JSON output, global options, passwords, checkout targets, snapshot
names and deduplication figures, each run as a real subprocess against a real repository.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from cas.archiver import Archiver, SnapshotOptions
from cas.errors import AmbiguousNameError
from cas.repository import Repository

KIB = 1 << 10
MIB = 1 << 20


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


SOURCE_FILES = {
    "model.bin": random_bytes(2 * MIB, 1),
    "optimizer.bin": random_bytes(MIB, 2),
    "config.json": b'{"layers": 4}\n',
    "tokenizer/vocab.txt": b"a\nb\nc\n",
}
SOURCE_BYTES = sum(len(content) for content in SOURCE_FILES.values())


def make_source(root: Path) -> None:
    """Create a small model folder with SOURCE_FILES below ``root``."""
    for rel, content in SOURCE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def cas_json(run_cas, *args, expect=0, env=None):
    """Run a command with --json and return the parsed stdout."""
    return json.loads(run_cas(*args, "--json", expect=expect, env=env).stdout)


@pytest.fixture
def source(tmp_path) -> Path:
    root = tmp_path / "src"
    make_source(root)
    return root


# JSON output


def test_init_json(cas_env, run_cas):
    output = cas_json(run_cas, "init", "--chunk-min", "4096", "--chunk-avg", "16384")

    assert output["repository"] == str(cas_env.repo)
    assert len(output["id"]) == 64
    assert set(output["id"]) <= set("0123456789abcdef")


def test_snapshot_json(cli_repo, run_cas, source):
    output = cas_json(run_cas, "snapshot", source)

    assert len(output["id"]) == 64
    assert output["files"] == 4
    assert output["bytes_read"] == SOURCE_BYTES
    assert output["bytes_added"] > 3 * MIB
    assert output["warnings"] == []


def test_log_json(cli_repo, run_cas, source):
    first = cas_json(run_cas, "snapshot", source, "--tag", "run-7", "--tag", "best")
    second = cas_json(run_cas, "snapshot", source / "config.json", "-m", "step 12000")

    log = cas_json(run_cas, "log")

    assert [entry["id"] for entry in log] == [second["id"], first["id"]]
    assert log[1]["paths"] == [str(source)]
    assert log[1]["tags"] == ["run-7", "best"]
    assert log[0]["paths"] == [str(source / "config.json")]
    assert log[0]["tags"] == []
    assert log[0]["message"] == "step 12000"
    for entry in log:
        assert datetime.fromisoformat(entry["time"]).utcoffset() is not None, entry["time"]


def test_log_tag_filter(cli_repo, run_cas, source):
    tagged = cas_json(run_cas, "snapshot", source, "--tag", "run-7")
    run_cas("snapshot", source, "--tag", "run-8", "--quiet")

    log = cas_json(run_cas, "log", "--tag", "run-7")

    assert [entry["id"] for entry in log] == [tagged["id"]]


def test_ls_json(cli_repo, run_cas, source):
    run_cas("snapshot", source, "--quiet")

    entries = {entry["path"]: entry for entry in cas_json(run_cas, "ls", "latest")}

    assert sorted(entries) == [
        "/config.json",
        "/model.bin",
        "/optimizer.bin",
        "/tokenizer",
        "/tokenizer/vocab.txt",
    ]
    assert entries["/model.bin"]["type"] == "file"
    assert entries["/model.bin"]["size"] == 2 * MIB
    assert entries["/tokenizer"]["type"] == "dir"
    assert datetime.fromisoformat(entries["/model.bin"]["mtime"]).utcoffset() is not None


def test_ls_json_subfolder(cli_repo, run_cas, source):
    run_cas("snapshot", source, "--quiet")

    entries = cas_json(run_cas, "ls", "latest", "/tokenizer")
    single = cas_json(run_cas, "ls", "latest", "tokenizer/vocab.txt")

    assert [entry["path"] for entry in entries] == ["/tokenizer/vocab.txt"]
    assert [entry["path"] for entry in single] == ["/tokenizer/vocab.txt"]


def test_ls_missing_path(cli_repo, run_cas, source):
    run_cas("snapshot", source, "--quiet")

    result = run_cas("ls", "latest", "/no-such-file", expect=2)

    assert "/no-such-file" in result.stderr
    assert "`cas ls SNAPSHOT` lists its paths" in result.stderr


def test_ls_through_file(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(b"a file, not a folder\n")
    run_cas("snapshot", source, "--quiet")

    result = run_cas("ls", "latest", "/f/f", expect=2)

    assert "not a folder" in result.stderr


def test_ls_non_utf8_name(cli_repo, run_cas, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    with open(os.path.join(os.fsencode(source), b"w\xffeights.bin"), "wb") as file:
        file.write(b"weights")
    run_cas("snapshot", source, "--quiet")
    env = {**cli_repo.env, "PYTHONIOENCODING": "utf-8:strict"}

    result = run_cas("ls", "latest", env=env)

    assert "eights.bin" in result.stdout


def test_checkout_json(cli_repo, run_cas, source, tmp_path):
    run_cas("snapshot", source, "--quiet")

    output = cas_json(run_cas, "checkout", "latest", tmp_path / "dest")

    assert output["files"] == 4
    assert output["dirs"] == 1
    assert output["bytes_total"] == SOURCE_BYTES
    assert output["failed"] == []
    assert (tmp_path / "dest" / "model.bin").read_bytes() == (source / "model.bin").read_bytes()


def test_check_json(cli_repo, run_cas, source):
    run_cas("snapshot", source, "--quiet")

    output = cas_json(run_cas, "check", "--read-data")

    assert output["ok"] is True
    assert output["snapshots"] == 1
    assert output["findings"] == []
    assert output["blobs_read"] > 0
    assert output["blobs_read"] >= output["trees"]


def test_stats_json(cli_repo, run_cas, source):
    run_cas("snapshot", source, "--quiet")
    run_cas("snapshot", source, "--quiet")

    output = cas_json(run_cas, "stats")

    assert output["snapshot_count"] == 2
    assert output["pack_count"] >= 1
    assert output["blob_count"] > 0
    assert output["logical_bytes"] == 2 * SOURCE_BYTES
    assert output["pack_bytes"] < SOURCE_BYTES + 100 * KIB
    assert output["dedup_ratio"] > 1.9


# Global options


def test_global_options_before_command(cli_repo, run_cas, source):
    env = cli_repo.without("CAS_REPOSITORY")
    run_cas("-r", cli_repo.repo, "--quiet", "snapshot", source, env=env)

    log = json.loads(run_cas("-r", cli_repo.repo, "--json", "log", env=env).stdout)

    assert len(log) == 1


def test_global_options_after_command(cli_repo, run_cas, source):
    env = cli_repo.without("CAS_REPOSITORY")
    run_cas("snapshot", source, "--quiet", "--repo", cli_repo.repo, env=env)

    log = json.loads(run_cas("log", "--json", "-r", cli_repo.repo, env=env).stdout)

    assert len(log) == 1


def test_global_options_mixed(cli_repo, run_cas, source, tmp_path):
    env = cli_repo.without("CAS_REPOSITORY")
    cache = tmp_path / "explicit-cache"
    run_cas("snapshot", source, "--quiet", "-r", cli_repo.repo, env=env)

    log = json.loads(
        run_cas("-r", cli_repo.repo, "log", "--json", "--cache-dir", cache, env=env).stdout
    )
    dest = tmp_path / "dest"
    run_cas("--cache-dir", cache, "-r", cli_repo.repo, "checkout", "latest", dest, env=env)

    assert len(log) == 1
    assert any(cache.iterdir())


def test_missing_repository_option(cli_repo, run_cas):
    result = run_cas("log", expect=2, env=cli_repo.without("CAS_REPOSITORY"))

    assert "-r/--repo" in result.stderr


def test_repository_not_found(cas_env, run_cas, tmp_path):
    result = run_cas("-r", tmp_path / "nowhere", "log", expect=2)

    assert "cas init" in result.stderr


def test_snapshot_missing_path(cli_repo, run_cas, tmp_path):
    missing = tmp_path / "no-such-folder"

    result = run_cas("snapshot", missing, expect=2)

    assert str(missing) in result.stderr
    assert "check the paths to snapshot" in result.stderr


def test_init_existing_repository(cli_repo, run_cas):
    result = run_cas("init", expect=2)

    assert "already exists" in result.stderr


# Deduplication figures


def test_snapshot_unchanged_adds_little(cli_repo, run_cas, source):
    first = cas_json(run_cas, "snapshot", source)
    second = cas_json(run_cas, "snapshot", source)

    assert second["parent"] == first["id"]
    assert second["bytes_read"] == 0
    assert second["unchanged_files"] == 4
    assert second["new_chunks"] == 0
    assert second["bytes_added"] < first["bytes_read"] // 100


def test_snapshot_small_change_adds_little(cli_repo, run_cas, source):
    first = cas_json(run_cas, "snapshot", source)
    with open(source / "model.bin", "r+b") as file:
        file.seek(MIB)
        file.write(b"changed!")

    second = cas_json(run_cas, "snapshot", source)
    dest = Path(str(source) + "-restored")
    run_cas("checkout", second["id"], dest, "--quiet")

    assert second["bytes_read"] == 2 * MIB
    assert second["unchanged_files"] == 3
    assert second["new_chunks"] <= 3
    assert second["bytes_added"] < first["bytes_added"] // 20
    assert (dest / "model.bin").read_bytes() == (source / "model.bin").read_bytes()


# Passwords


def test_wrong_password(cli_repo, run_cas, source):
    env = {**cli_repo.env, "CAS_PASSWORD": "not the password"}

    result = run_cas("log", expect=4, env=env)

    assert "wrong password" in result.stderr


def test_password_file_option(cli_repo, run_cas, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text(cli_repo.password + "\n")
    env = cli_repo.without("CAS_PASSWORD")

    run_cas("log", "--password-file", password_file, env=env)


def test_password_file_env(cli_repo, run_cas, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text(cli_repo.password + "\n")
    env = {**cli_repo.without("CAS_PASSWORD"), "CAS_PASSWORD_FILE": str(password_file)}

    run_cas("log", env=env)


def test_password_command(cli_repo, run_cas, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text(cli_repo.password + "\n")
    env = cli_repo.without("CAS_PASSWORD")

    run_cas("log", "--password-command", f"cat '{password_file}'", env=env)


def test_password_file_before_env(cli_repo, run_cas, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text(cli_repo.password)
    env = {**cli_repo.env, "CAS_PASSWORD": "not the password"}

    run_cas("log", "--password-file", password_file, env=env)


def test_password_command_before_file(cli_repo, run_cas, tmp_path):
    wrong_file = tmp_path / "wrong-password"
    wrong_file.write_text("not the password")
    env = {**cli_repo.without("CAS_PASSWORD"), "CAS_PASSWORD_FILE": str(wrong_file)}

    run_cas("log", "--password-command", f"echo '{cli_repo.password}'", env=env)


def test_password_command_fails(cli_repo, run_cas):
    result = run_cas("log", "--password-command", "exit 7", expect=2)

    assert "exit code 7" in result.stderr


def test_password_file_missing(cli_repo, run_cas, tmp_path):
    missing = tmp_path / "no-such-password-file"

    result = run_cas("log", "--password-file", missing, expect=2)

    assert str(missing) in result.stderr


def test_password_missing(cli_repo, run_cas):
    result = run_cas("log", expect=2, env=cli_repo.without("CAS_PASSWORD"))

    assert "no password given" in result.stderr


# Checkout targets


def test_checkout_nonempty_target(cli_repo, run_cas, source, tmp_path):
    run_cas("snapshot", source, "--quiet")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.bin").write_bytes(b"old weights")

    result = run_cas("checkout", "latest", dest, expect=2)

    assert "--overwrite" in result.stderr
    assert (dest / "model.bin").read_bytes() == b"old weights"


def test_checkout_overwrite(cli_repo, run_cas, source, tmp_path):
    run_cas("snapshot", source, "--quiet")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "model.bin").write_bytes(b"old weights")
    (dest / "notes.txt").write_bytes(b"kept")

    run_cas("checkout", "latest", dest, "--overwrite", "--quiet")

    assert (dest / "model.bin").read_bytes() == (source / "model.bin").read_bytes()
    assert (dest / "notes.txt").read_bytes() == b"kept"


def test_checkout_target_is_file(cli_repo, run_cas, source, tmp_path):
    run_cas("snapshot", source, "--quiet")
    dest = tmp_path / "dest"
    dest.write_bytes(b"a file")

    result = run_cas("checkout", "latest", dest, "--overwrite", expect=2)

    assert "not a folder" in result.stderr
    assert "choose a new or empty folder" in result.stderr


def test_checkout_overwrite_file_over_folder(cli_repo, run_cas, source, tmp_path):
    run_cas("snapshot", source, "--quiet")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tokenizer").write_bytes(b"a file where the snapshot has a folder")

    run_cas("checkout", "latest", dest, "--overwrite", "--quiet")

    assert (dest / "tokenizer").is_dir()
    assert (dest / "tokenizer" / "vocab.txt").read_bytes() == (
        source / "tokenizer" / "vocab.txt"
    ).read_bytes()


def test_checkout_overwrite_folder_over_file(cli_repo, run_cas, source, tmp_path):
    run_cas("snapshot", source, "--quiet")
    dest = tmp_path / "dest"
    (dest / "model.bin").mkdir(parents=True)
    (dest / "model.bin" / "inside.txt").write_bytes(b"removed with its folder")

    run_cas("checkout", "latest", dest, "--overwrite", "--quiet")

    assert (dest / "model.bin").read_bytes() == (source / "model.bin").read_bytes()


def test_checkout_target_below_file(cli_repo, run_cas, source, tmp_path):
    run_cas("snapshot", source, "--quiet")
    blocker = tmp_path / "blocker"
    blocker.write_bytes(b"a file")

    result = run_cas("checkout", "latest", blocker / "dest", expect=2)

    assert str(blocker) in result.stderr


# Snapshot names


def test_snapshot_name_forms(cli_repo, run_cas, source, tmp_path):
    first = cas_json(run_cas, "snapshot", source)
    second = cas_json(run_cas, "snapshot", source / "config.json")

    by_full = cas_json(run_cas, "checkout", first["id"], tmp_path / "full")
    by_prefix = cas_json(run_cas, "checkout", first["id"][:8], tmp_path / "prefix")
    by_upper = cas_json(run_cas, "checkout", first["id"][:10].upper(), tmp_path / "upper")
    by_latest = cas_json(run_cas, "checkout", "latest", tmp_path / "latest")

    assert by_full["id"] == first["id"]
    assert by_prefix["id"] == first["id"]
    assert by_upper["id"] == first["id"]
    assert by_latest["id"] == second["id"]


def test_snapshot_name_too_short(cli_repo, run_cas, source, tmp_path):
    snapshot = cas_json(run_cas, "snapshot", source)

    result = run_cas("checkout", snapshot["id"][:7], tmp_path / "dest", expect=2)

    assert "at least 8" in result.stderr
    assert not (tmp_path / "dest").exists()


def test_snapshot_name_not_hex(cli_repo, run_cas, source, tmp_path):
    run_cas("snapshot", source, "--quiet")

    result = run_cas("ls", "latest-1", expect=2)

    assert "invalid snapshot name" in result.stderr


def test_snapshot_name_unknown(cli_repo, run_cas, source, tmp_path):
    snapshot = cas_json(run_cas, "snapshot", source)
    unknown = format((int(snapshot["id"][:8], 16) + 1) % (1 << 32), "08x")

    result = run_cas("checkout", unknown, tmp_path / "dest", expect=2)

    assert "no snapshot matches" in result.stderr


def test_snapshot_name_latest_empty(cli_repo, run_cas, tmp_path):
    result = run_cas("checkout", "latest", tmp_path / "dest", expect=2)

    assert "no snapshots" in result.stderr


def test_snapshot_name_ambiguous(cli_repo, run_cas, source, tmp_path):
    snapshot = cas_json(run_cas, "snapshot", source)
    # A second snapshot name that shares the first 12 digits. Prefix matching looks only at
    # names, so a copy of the object under that name is enough to make the prefix ambiguous.
    original = cli_repo.repo / "snapshots" / snapshot["id"]
    twin_id = snapshot["id"][:12] + format(int(snapshot["id"][12:], 16) ^ 1, "052x")
    shutil.copyfile(original, original.with_name(twin_id))

    ambiguous = run_cas("checkout", snapshot["id"][:12], tmp_path / "dest", expect=2)
    exact = cas_json(run_cas, "ls", snapshot["id"])

    assert "matches 2 snapshots" in ambiguous.stderr
    assert any(entry["path"] == "/model.bin" for entry in exact)


def test_resolve_snapshot_ambiguous(repo, tmp_path):
    source = tmp_path / "src"
    make_source(source)
    snapshot = Archiver(repo, SnapshotOptions()).run([str(source)]).snapshot
    twin_hex = snapshot.snapshot_hex[:8] + format(int(snapshot.snapshot_hex[8:], 16) ^ 1, "056x")
    data = repo.backend.get("snapshots/" + snapshot.snapshot_hex)
    repo.backend.put("snapshots/" + twin_hex, data)

    with pytest.raises(AmbiguousNameError, match="matches 2 snapshots"):
        repo.resolve_snapshot(snapshot.snapshot_hex[:8])
    assert repo.resolve_snapshot(snapshot.snapshot_hex) == snapshot


# cas debug chunks


def test_debug_chunks_cover_file(run_cas, tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(random_bytes(MIB + 17, 3))

    chunks = cas_json(run_cas, "debug", "chunks", path, "--unkeyed")

    offsets = [chunk["offset"] for chunk in chunks]
    ends = [chunk["offset"] + chunk["length"] for chunk in chunks]
    assert offsets[0] == 0
    assert offsets[1:] == ends[:-1]
    assert ends[-1] == MIB + 17
    assert all(0 < chunk["length"] <= 64 * KIB for chunk in chunks)
    assert all(chunk["length"] >= 4 * KIB for chunk in chunks[:-1])


def test_debug_chunks_empty_file(run_cas, tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")

    chunks = cas_json(run_cas, "debug", "chunks", path, "--unkeyed")

    assert chunks == []


def test_debug_chunks_keyed_differs(cli_repo, run_cas, tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(random_bytes(MIB, 4))

    unkeyed = cas_json(run_cas, "debug", "chunks", path, "--unkeyed")
    keyed = cas_json(run_cas, "debug", "chunks", path)

    assert sum(chunk["length"] for chunk in keyed) == MIB
    assert keyed != unkeyed


def test_debug_chunks_missing_file(run_cas, tmp_path):
    result = run_cas("debug", "chunks", tmp_path / "missing.bin", "--unkeyed", expect=2)

    assert "missing.bin" in result.stderr


def test_repository_open_library(cli_repo, run_cas, source):
    """The library opens a CLI-made repository and sees the same snapshot."""
    snapshot = cas_json(run_cas, "snapshot", source)

    with Repository.open(
        str(cli_repo.repo), cli_repo.password.encode(), cache_dir=cli_repo.cache
    ) as repo:
        names = repo.snapshot_names()

    assert names == [snapshot["id"]]
