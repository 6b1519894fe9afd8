"""Locks: refusal with exit code 5, --wait, `cas unlock`, stale locks, the shared lock of
checkout, the lock upgrade of gc, and a snapshot and a gc started together in both orders."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT_SECONDS
from test_gc import (
    GarbageCollector,
    GcOptions,
    assert_clean,
    build_scenario,
    open_repo,
    random_bytes,
    verify_kept,
    write_files,
)

from cas.errors import LockedError
from cas.locks import LOCK_PREFIX, STALE_AFTER, LockInfo, RepositoryLock, read_locks
from cas.objects import ObjectKind, encode_object
from cas.repository import Repository

MIB = 1 << 20
SLOW_CLI = Path(__file__).with_name("faulty_backend.py")


def library_repo(cas_env, name: str = "lib-cache") -> Repository:
    return Repository.open(
        str(cas_env.repo), cas_env.password.encode(), cache_dir=cas_env.repo.parent / name
    )


def put_lock(repo: Repository, *, host: str, pid: int, refreshed: float, exclusive=False) -> str:
    """Write a lock object by hand, as a process that died would have left it."""
    name = LOCK_PREFIX + os.urandom(16).hex()
    body = {
        "v": 1,
        "exclusive": exclusive,
        "host": host,
        "pid": pid,
        "user": "someone",
        "operation": "snapshot",
        "started": "2026-12-01T10:00:00+00:00",
        "refreshed": refreshed,
    }
    repo.backend.put(name, encode_object(repo.keys, ObjectKind.LOCK, name, body))
    return name


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def lock_names(cas_env) -> set[str]:
    folder = cas_env.repo / "locks"
    return {f"locks/{path.name}" for path in folder.iterdir()} if folder.exists() else set()


# cas unlock


def test_unlock_removes_dead_pid_lock(cli_repo, run_cas):
    with library_repo(cli_repo) as repo:
        name = put_lock(repo, host=socket.gethostname(), pid=dead_pid(), refreshed=time.time())
    report = json.loads(run_cas("unlock", "--json").stdout)
    assert [lock["name"] for lock in report["removed"]] == [name]
    assert lock_names(cli_repo) == set()


def test_unlock_removes_old_refresh_lock(cli_repo, run_cas):
    with library_repo(cli_repo) as repo:
        name = put_lock(repo, host="elsewhere", pid=1, refreshed=time.time() - 3600)
        fresh = put_lock(repo, host="elsewhere", pid=1, refreshed=time.time())
    report = json.loads(run_cas("unlock", "--json").stdout)
    assert [lock["name"] for lock in report["removed"]] == [name]
    assert [lock["name"] for lock in report["remaining"]] == [fresh]
    assert lock_names(cli_repo) == {fresh}


def test_unlock_remove_all_warns(cli_repo, run_cas):
    with library_repo(cli_repo) as repo:
        other = put_lock(repo, host="other-host", pid=1, refreshed=time.time(), exclusive=False)
        with RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot") as held:
            kept = json.loads(run_cas("unlock", "--json").stdout)
            assert kept["removed"] == []
            assert len(kept["remaining"]) == 2
            result = run_cas("unlock", "--remove-all")
            assert "warning: removing all 1 locks" in result.stderr
            assert "still running on this host" in result.stderr
            # The live lock of this process stays; the other host's lock goes.
            assert lock_names(cli_repo) == {held.name}
            assert other not in lock_names(cli_repo)


def test_lost_lock_stops_snapshot(cli_repo, tmp_path):
    """A snapshot whose lock another process removed must publish nothing.

    Without the check, a gc that took the lock for stale could delete the
    packs this snapshot wrote, and the snapshot would still commit.
    """
    write_files(tmp_path / "src", {f"f{i}.bin": os.urandom(200_000) for i in range(12)})
    snapshot = start_slow(cli_repo, "snapshot", tmp_path / "src", "--json", put_delay=0.3)
    wait_for_lock(cli_repo, "snapshot", exclusive=False)
    for name in lock_names(cli_repo):
        (cli_repo.repo / name).unlink()

    code, _, stderr = finish(snapshot)

    assert code == 5, stderr
    assert "was removed by another process" in stderr
    assert not (cli_repo.repo / "snapshots").exists() or not any(
        (cli_repo.repo / "snapshots").iterdir()
    )


def test_stale_lock_does_not_block(cli_repo, run_cas, tmp_path):
    with library_repo(cli_repo) as repo:
        put_lock(
            repo, host=socket.gethostname(), pid=dead_pid(), refreshed=time.time(), exclusive=True
        )
    write_files(tmp_path / "src", {"a.bin": b"x" * 1000})
    result = run_cas("snapshot", tmp_path / "src")
    assert "removing stale exclusive lock" in result.stderr
    assert lock_names(cli_repo) == set()


def test_unchanged_refresh_becomes_stale(cli_repo):
    """A lock whose refresh time stays the same for STALE_AFTER of this process's clock."""
    with (
        library_repo(cli_repo) as repo,
        RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot") as watcher,
    ):
        # A holder whose clock runs an hour ahead: the timestamp rule never fires.
        ahead = LockInfo(
            "locks/" + "0" * 32, True, "elsewhere", 1, "u", "gc", "", time.time() + 3600
        )
        assert not ahead.is_stale()
        assert not watcher._unchanged_too_long(ahead)
        first_seen = time.monotonic() - STALE_AFTER - 1
        watcher._observed[ahead.name] = (ahead.refreshed, first_seen)
        assert watcher._unchanged_too_long(ahead)
        refreshed = replace(ahead, refreshed=ahead.refreshed + 60)
        assert not watcher._unchanged_too_long(refreshed)


# Refusal and --wait


@pytest.mark.parametrize(
    "command",
    [
        ["snapshot", "{src}"],
        ["checkout", "latest", "{dest}"],
        ["prune", "--keep-last", "1"],
        ["gc"],
    ],
    ids=["snapshot", "checkout", "prune", "gc"],
)
def test_locked_exit_code(cli_repo, run_cas, tmp_path, command):
    write_files(tmp_path / "src", {"a.bin": random_bytes(100_000, 1)})
    run_cas("snapshot", tmp_path / "src")
    args = [arg.format(src=tmp_path / "src", dest=tmp_path / "dest") for arg in command]
    with (
        library_repo(cli_repo) as repo,
        RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="test-holder"),
    ):
        result = run_cas(*args, expect=5)
    assert "test-holder" in result.stderr
    assert "--wait" in result.stderr
    assert "cas unlock" in result.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["snapshot", "{src}"],
        ["checkout", "latest", "{dest}"],
        ["prune", "--keep-last", "1"],
        ["gc"],
    ],
    ids=["snapshot", "checkout", "prune", "gc"],
)
def test_wait_outlasts_lock(cli_repo, run_cas, tmp_path, command):
    write_files(tmp_path / "src", {"a.bin": random_bytes(100_000, 2)})
    run_cas("snapshot", tmp_path / "src")
    args = [arg.format(src=tmp_path / "src", dest=tmp_path / "dest") for arg in command]
    with library_repo(cli_repo) as repo:
        lock = RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="test-holder")
        timer = threading.Timer(2.0, lock.release)
        timer.start()
        started = time.monotonic()
        try:
            run_cas(*args, "--wait", "1m")
        finally:
            timer.join()
    assert time.monotonic() - started >= 2.0


def test_wait_rejects_bad_duration(cli_repo, run_cas):
    result = run_cas("gc", "--wait", "soon", expect=2)
    assert "invalid duration" in result.stderr


# gc's shared lock and its upgrade


def test_gc_upgrade_waits_for_writer(tmp_path):
    repo_path, kept = build_scenario(tmp_path)
    with open_repo(repo_path, tmp_path / "c1") as repo:
        writer = RepositoryLock(repo.backend, repo.keys, exclusive=False, operation="snapshot")
        with pytest.raises(LockedError, match="snapshot"):
            GarbageCollector(repo, GcOptions(max_unused=0.0)).run()
        # Nothing was deleted, so every snapshot is intact with the duplicates gc wrote.
        verify_kept(repo_path, tmp_path / "c2", kept, tmp_path / "out")
        timer = threading.Timer(1.5, writer.release)
        timer.start()
        result = GarbageCollector(repo, GcOptions(max_unused=0.0, wait=60)).run()
        timer.join()
    assert result.packs_deleted + result.packs_repacked > 0
    verify_kept(repo_path, tmp_path / "c3", kept, tmp_path / "out")
    assert_clean(repo_path, tmp_path / "c4")


# Concurrent processes


def start_slow(cas_env, *args: str | os.PathLike[str], **delays: float) -> subprocess.Popen[str]:
    """Start the CLI with a backend that sleeps before each write (put_delay, delete_delay...)."""
    options = [f"--{key.replace('_', '-')}={value}" for key, value in delays.items()]
    command = [sys.executable, str(SLOW_CLI), *options, "--", *map(str, args)]
    return subprocess.Popen(
        command,
        env=cas_env.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_SECONDS)
    assert "Traceback" not in stderr, stderr
    return process.returncode, stdout, stderr


def wait_for_lock(cas_env, operation: str, exclusive: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with library_repo(cas_env, "poll-cache") as repo:
        while time.monotonic() < deadline:
            locks = read_locks(repo.backend, repo.keys)
            if any(lock.operation == operation and lock.exclusive == exclusive for lock in locks):
                return
            time.sleep(0.05)
    raise AssertionError(f"no {operation} lock (exclusive={exclusive}) appeared in {timeout} s")


@pytest.fixture
def pruned_repo(cli_repo, run_cas, tmp_path):
    """A repository whose first snapshot is pruned, so gc has packs to delete.

    Returns the files of each remaining snapshot by id.
    """
    kept = {}
    first = {"old.bin": random_bytes(2 * MIB, 10)}
    second = {"model.bin": random_bytes(2 * MIB, 11)}
    ids = []
    for files in (first, second):
        write_files(tmp_path / "src", files)
        ids.append(json.loads(run_cas("snapshot", tmp_path / "src", "--json").stdout)["id"])
    run_cas("prune", ids[0])
    kept[ids[1]] = second
    return kept


def verify_cli(run_cas, tmp_path: Path, kept: dict[str, dict[str, bytes]]) -> None:
    """Every expected snapshot exists and checks out byte for byte, and check finds nothing."""
    listed = {item["id"] for item in json.loads(run_cas("log", "--json").stdout)}
    assert listed == set(kept)
    for number, (snapshot_hex, files) in enumerate(kept.items()):
        dest = tmp_path / f"verify-{number}"
        run_cas("checkout", snapshot_hex, dest)
        for rel, content in files.items():
            assert (dest / rel).read_bytes() == content, f"{rel} of {snapshot_hex[:12]}"
        shutil.rmtree(dest)
    run_cas("check", "--read-data")


def new_source(tmp_path: Path) -> dict[str, bytes]:
    files = {"model.bin": random_bytes(3 * MIB, 12), "config.json": b"{}"}
    write_files(tmp_path / "src-new", files)
    return files


@pytest.mark.parametrize("wait", [False, True], ids=["no-wait", "wait"])
def test_snapshot_then_gc(pruned_repo, cli_repo, run_cas, tmp_path, wait):
    files = new_source(tmp_path)
    snapshot = start_slow(cli_repo, "snapshot", tmp_path / "src-new", "--json", put_delay=1.0)
    wait_for_lock(cli_repo, "snapshot", exclusive=False)
    wait_args = ["--wait", "2m"] if wait else []
    gc = run_cas("gc", "--json", *wait_args, expect=0 if wait else 5)
    code, stdout, stderr = finish(snapshot)
    assert code == 0, stderr
    kept = {**pruned_repo, json.loads(stdout)["id"]: files}
    if wait:
        assert json.loads(gc.stdout)["packs_deleted"] > 0
    else:
        assert "snapshot" in gc.stderr
    verify_cli(run_cas, tmp_path, kept)
    run_cas("gc")
    verify_cli(run_cas, tmp_path, kept)


@pytest.mark.parametrize("wait", [False, True], ids=["no-wait", "wait"])
def test_gc_then_snapshot(pruned_repo, cli_repo, run_cas, tmp_path, wait):
    files = new_source(tmp_path)
    gc = start_slow(cli_repo, "gc", "--json", delete_delay=1.0)
    wait_for_lock(cli_repo, "gc", exclusive=True)
    wait_args = ["--wait", "2m"] if wait else []
    snapshot = run_cas(
        "snapshot", tmp_path / "src-new", "--json", *wait_args, expect=0 if wait else 5
    )
    code, stdout, stderr = finish(gc)
    assert code == 0, stderr
    assert json.loads(stdout)["packs_deleted"] > 0
    kept = dict(pruned_repo)
    if wait:
        kept[json.loads(snapshot.stdout)["id"]] = files
    else:
        assert "gc" in snapshot.stderr
    verify_cli(run_cas, tmp_path, kept)


def test_checkout_holds_shared_lock(pruned_repo, cli_repo, run_cas, tmp_path):
    (snapshot_hex,) = pruned_repo
    checkout = start_slow(cli_repo, "checkout", snapshot_hex, tmp_path / "out", get_delay=0.5)
    wait_for_lock(cli_repo, "checkout", exclusive=False)
    refused = run_cas("gc", expect=5)
    assert "checkout" in refused.stderr
    code, _stdout, stderr = finish(checkout)
    assert code == 0, stderr
    for rel, content in pruned_repo[snapshot_hex].items():
        assert (tmp_path / "out" / rel).read_bytes() == content


def test_check_respects_exclusive_lock(cli_repo, run_cas, tmp_path):
    """A check during gc's delete phase would report the packs gc deletes as missing."""
    write_files(tmp_path / "src", {"a.bin": b"x" * 5000})
    run_cas("snapshot", tmp_path / "src")
    with (
        library_repo(cli_repo) as repo,
        RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="gc"),
    ):
        refused = run_cas("check", expect=5)
        unlocked = run_cas("check", "--no-lock")

    assert "locked" in refused.stderr
    assert "no problems found" in unlocked.stdout
