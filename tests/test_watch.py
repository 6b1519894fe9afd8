"""`cas watch DIR` as a real subprocess: a checkpoint written in several steps is snapshotted
once and complete, marker mode waits for the marker, a failed snapshot is survived, and
SIGTERM stops it with exit code 0. Settle times are short so each test takes seconds.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cas.locks import RepositoryLock
from cas.repository import Repository

EVENT_TIMEOUT_SECONDS = 30


class WatchProcess:
    """A running `cas watch --json` whose JSON lines are read on a thread."""

    def __init__(self, cas_env, *args):
        command = [sys.executable, "-m", "cas_cli.main", "watch", *map(str, args), "--json"]
        self.process = subprocess.Popen(
            command,
            env=cas_env.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        self.stderr_lines: list[str] = []
        self.readers = [
            threading.Thread(target=self._read_events, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read_events(self):
        for line in self.process.stdout:
            self.events.put(json.loads(line))

    def _read_stderr(self):
        for line in self.process.stderr:
            self.stderr_lines.append(line)

    def next_event(self, timeout=EVENT_TIMEOUT_SECONDS):
        """Return the next event; fail the test if none comes within ``timeout`` seconds."""
        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no watch event within {timeout} s; seen: {self.seen}")
        self.seen.append(event)
        return event

    def no_event_for(self, seconds):
        """Return whether no event arrives within ``seconds``."""
        try:
            event = self.events.get(timeout=seconds)
        except queue.Empty:
            return True
        self.seen.append(event)
        return False

    def stop(self, signum=signal.SIGTERM):
        """Send ``signum`` and return (exit code, stderr)."""
        self.process.send_signal(signum)
        code = self.process.wait(timeout=EVENT_TIMEOUT_SECONDS)
        for reader in self.readers:
            reader.join(timeout=EVENT_TIMEOUT_SECONDS)
        return code, "".join(self.stderr_lines)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def watch(cli_repo):
    started = []

    def start(*args):
        process = WatchProcess(cli_repo, *args)
        started.append(process)
        assert process.next_event()["event"] == "start"
        return process

    yield start
    for process in started:
        process.kill()


def open_repo(cas_env):
    return Repository.open(str(cas_env.repo), cas_env.password.encode(), cache_dir=cas_env.cache)


def snapshot_files(cas_env, run_cas, snapshot_id, dest):
    run_cas("checkout", snapshot_id, dest)
    return {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def folder_files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def write_in_steps(root: Path, steps=6, pause=0.15):
    """Write a checkpoint as a trainer does: shards appended to in several writes."""
    root.mkdir(parents=True, exist_ok=True)
    for step in range(steps):
        with open(root / f"shard-{step % 2}.bin", "ab") as file:
            file.write(os.urandom(50_000))
            file.flush()
        time.sleep(pause)
    (root / "config.json").write_text('{"step": 100}')


def test_watch_checkpoint_in_steps(cli_repo, run_cas, watch, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    process = watch(root, "--settle", "0.8", "--interval", "0.05")
    write_in_steps(root)
    event = process.next_event()
    assert event["event"] == "snapshot"
    assert event["files"] == 3
    assert process.no_event_for(1.5)
    code, stderr = process.stop()
    assert code == 0, stderr
    assert process.next_event()["event"] == "stop"
    restored = snapshot_files(cli_repo, run_cas, event["id"], tmp_path / "restore")
    assert restored == folder_files(root)


def test_watch_snapshots_each_checkpoint(cli_repo, run_cas, watch, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    process = watch(root, "--settle", "0.5", "--interval", "0.05")
    write_in_steps(root, steps=2)
    first = process.next_event()
    (root / "config.json").write_text('{"step": 200}')
    second = process.next_event()
    assert first["event"] == second["event"] == "snapshot"
    assert second["unchanged_files"] == 2
    process.stop()
    restored = snapshot_files(cli_repo, run_cas, second["id"], tmp_path / "restore")
    assert restored["config.json"] == b'{"step": 200}'


def test_watch_ignores_excluded_files(cli_repo, run_cas, watch, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "weights.bin").write_bytes(b"w" * 1000)
    process = watch(root, "--settle", "0.5", "--interval", "0.05", "--exclude", "*.log")
    # A log that keeps growing would keep the folder from settling if it were watched.
    deadline = time.monotonic() + 10
    event = None
    while time.monotonic() < deadline and event is None:
        with open(root / "train.log", "a") as log:
            log.write("step\n")
        try:
            event = process.events.get(timeout=0.1)
        except queue.Empty:
            continue
    assert event is not None
    assert event["event"] == "snapshot"
    assert event["files"] == 1
    process.stop()


def test_watch_marker(cli_repo, run_cas, watch, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    process = watch(runs, "--marker", "DONE", "--interval", "0.05")
    step = runs / "step-100"
    write_in_steps(step, steps=3)
    assert process.no_event_for(1.0)
    (step / "DONE").write_text("")
    event = process.next_event()
    assert event["event"] == "snapshot"
    assert event["path"] == str(step)
    assert process.no_event_for(0.5)
    code, _ = process.stop()
    assert code == 0
    restored = snapshot_files(cli_repo, run_cas, event["id"], tmp_path / "restore")
    assert restored == folder_files(step)


def test_watch_marker_skips_done_at_start(cli_repo, run_cas, watch, tmp_path):
    runs = tmp_path / "runs"
    step = runs / "step-1"
    write_in_steps(step, steps=1, pause=0)
    (step / "DONE").write_text("")
    run_cas("snapshot", step)
    process = watch(runs, "--marker", "DONE", "--interval", "0.05")
    assert process.no_event_for(1.0)
    step2 = runs / "step-2"
    write_in_steps(step2, steps=1, pause=0)
    (step2 / "DONE").write_text("")
    assert process.next_event()["path"] == str(step2)
    process.stop()


def test_watch_survives_locked_repository(cli_repo, run_cas, watch, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    repo = open_repo(cli_repo)
    lock = RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="test")
    lock.__enter__()
    try:
        process = watch(root, "--settle", "0.3", "--interval", "0.05", "--retry-after", "600")
        (root / "weights.bin").write_bytes(b"a" * 1000)
        error = process.next_event()
        assert error["event"] == "error"
        assert error["exit_code"] == 5
        assert process.no_event_for(1.0)
    finally:
        lock.__exit__(None, None, None)
        repo.close()
    # The next change is snapshotted.
    (root / "weights.bin").write_bytes(b"b" * 1000)
    event = process.next_event()
    assert event["event"] == "snapshot"
    code, stderr = process.stop()
    assert code == 0
    assert "snapshot of" in stderr
    assert "failed" in stderr
    restored = snapshot_files(cli_repo, run_cas, event["id"], tmp_path / "restore")
    assert restored == {"weights.bin": b"b" * 1000}


def test_watch_sigint_stops(cli_repo, watch, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    process = watch(root, "--settle", "0.3", "--interval", "0.05")
    code, stderr = process.stop(signal.SIGINT)
    assert code == 0, stderr
    assert process.next_event()["event"] == "stop"


def test_watch_once(cli_repo, run_cas, tmp_path):
    root = tmp_path / "ckpt"
    write_in_steps(root, steps=1, pause=0)
    result = run_cas("watch", root, "--once", "--settle", "0.2", "--interval", "0.05", "--json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["event"] for event in events] == ["start", "snapshot", "stop"]
    assert events[1]["files"] == 2


def test_watch_once_failure_exit_code(cli_repo, run_cas, tmp_path):
    root = tmp_path / "ckpt"
    write_in_steps(root, steps=1, pause=0)
    repo = open_repo(cli_repo)
    with RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="test"):
        result = run_cas("watch", root, "--once", "--settle", "0", "--interval", "0.05", expect=5)
    repo.close()
    assert "locked" in result.stderr


def test_watch_invalid_options(cli_repo, run_cas, tmp_path):
    assert "not a folder" in run_cas("watch", tmp_path / "none", expect=2).stderr
    result = run_cas("watch", tmp_path / "none", "--marker", "a/b", expect=2)
    assert "invalid --marker" in result.stderr
    result = run_cas("watch", tmp_path / "none", "--interval", "0", expect=2)
    assert "invalid --interval" in result.stderr


def test_watch_rejects_repository_inside(cli_repo, run_cas, tmp_path):
    result = run_cas("watch", tmp_path, expect=2)
    assert "contains the repository" in result.stderr
