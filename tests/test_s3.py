"""The S3 backend against a real SeaweedFS server: URLs, errors, retries, and whole repositories.

Faults come from real events: a wrong key sent to the server, a bucket that does not exist, the
server process stopped in the middle of a snapshot, and `FaultProxy`, a proxy on 127.0.0.1 that
cuts response bodies short or returns 503 SlowDown before forwarding to the server.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import PASSWORD, SMALL_CHUNKER, CasEnv, RunCas, fast_kdf
from s3server import FaultProxy, SeaweedServer, s3_server, use_server_env, weed_or_skip

from cas.backend import LocalBackend, open_backend
from cas.backend.s3 import RetryPolicy, S3Backend, parse_s3_url
from cas.errors import AlreadyExistsError, BackendError, NotFoundError, UsageError
from cas.repository import Repository

__all__ = ["s3_server"]

MIB = 1 << 20
BUCKET = "cas-s3-tests"
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05, time_limit=5.0)
WRITER_COUNT = 4
INDEX_FLUSH_PACKS = 64  # cas.blobstore publishes an index object every 64 packs


@pytest.fixture(scope="module")
def bucket(s3_server: SeaweedServer) -> str:
    """Create the bucket that this module's tests share, each under its own prefix."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_server_env(monkeypatch, s3_server)
        backend = S3Backend(BUCKET)
        backend.create_location()
        backend.close()
    return BUCKET


@pytest.fixture
def s3_env(
    s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch, bucket: str
) -> Iterator[SeaweedServer]:
    """Point this process's AWS variables at the server; yield the server."""
    use_server_env(monkeypatch, s3_server)
    yield s3_server


@pytest.fixture
def s3_cas_env(cas_env: CasEnv, s3_server: SeaweedServer, bucket: str) -> CasEnv:
    """Make the CLI environment of ``cas_env`` use a new prefix of the test bucket."""
    set_cli_s3_env(cas_env, s3_server, f"s3://{bucket}/cli-{uuid.uuid4().hex[:12]}")
    return cas_env


def set_cli_s3_env(cas_env: CasEnv, server: SeaweedServer, url: str) -> None:
    """Replace the AWS variables of the CLI environment and set CAS_REPOSITORY to ``url``."""
    for name in [name for name in cas_env.env if name.startswith("AWS_")]:
        del cas_env.env[name]
    cas_env.env.update(server.env())
    cas_env.env["CAS_REPOSITORY"] = url


def init_library_repo(url: str, backend: S3Backend, cache: Path) -> None:
    """Create a repository with small chunks, 1 MiB packs and a fast KDF."""
    Repository.init(
        url,
        PASSWORD.encode(),
        cache_dir=cache,
        chunker=SMALL_CHUNKER,
        pack_size=1 << 20,
        kdf=fast_kdf(),
        backend=backend,
    ).close()


def make_model_folder(root: Path, seed: int, size: int) -> dict[str, bytes]:
    """Write a model-like folder of ``size`` random bytes plus small files; return its files."""
    generator = random.Random(seed)
    files = {
        "model.safetensors": generator.randbytes(size),
        "config.json": json.dumps({"seed": seed}).encode(),
        "tokenizer/vocab.txt": b"a\nb\nc\n",
    }
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def assert_same_files(expected: dict[str, bytes], folder: Path) -> None:
    """Assert that ``folder`` contains exactly the files of ``expected``, byte for byte."""
    found = {
        str(path.relative_to(folder)): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }
    assert sorted(found) == sorted(expected)
    for rel, content in expected.items():
        assert found[rel] == content, f"{rel} differs after checkout"


def cas_json(run_cas: RunCas, *args: str | os.PathLike[str], expect: int = 0) -> object:
    """Run a command with --json and return its parsed output."""
    return json.loads(run_cas(*args, "--json", expect=expect).stdout)


# Repository URLs


def test_open_backend_url_forms(s3_env: SeaweedServer, tmp_path: Path) -> None:
    s3 = open_backend("s3://models/team/run-7")
    local = open_backend(str(tmp_path / "repo"))
    file_url = open_backend(f"file://{tmp_path}/repo")

    assert isinstance(s3, S3Backend)
    assert (s3.bucket, s3.prefix, s3.url) == ("models", "team/run-7", "s3://models/team/run-7")
    assert s3.endpoint == s3_env.endpoint
    assert isinstance(local, LocalBackend)
    assert isinstance(file_url, LocalBackend)
    assert file_url.url == str(tmp_path / "repo")


def test_open_backend_explicit_endpoint(s3_env: SeaweedServer) -> None:
    backend = open_backend("s3://models", s3_endpoint="http://127.0.0.1:1")

    assert isinstance(backend, S3Backend)
    assert backend.endpoint == "http://127.0.0.1:1"
    assert backend.prefix == ""


@pytest.mark.parametrize("url", ["http://host/repo", "gs://bucket/x", "ftp://x"])
def test_open_backend_unknown_scheme(url: str) -> None:
    with pytest.raises(UsageError, match="s3://BUCKET/PREFIX") as caught:
        open_backend(url)
    assert url in str(caught.value)


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://bucket/a/../b", "s3://b/a//c"])
def test_parse_s3_url_invalid(url: str) -> None:
    with pytest.raises(UsageError, match="invalid S3 URL"):
        parse_s3_url(url)


# Backend errors against the real server


def test_missing_bucket_named(s3_env: SeaweedServer) -> None:
    backend = S3Backend("no-such-bucket-here", "repo", retry=FAST_RETRY)

    assert not backend.location_exists()
    with pytest.raises(NotFoundError, match=r"bucket no-such-bucket-here not found.*cas"):
        backend.exists("config")
    with pytest.raises(NotFoundError, match="bucket no-such-bucket-here not found"):
        backend.get("config")
    with pytest.raises(NotFoundError, match="bucket no-such-bucket-here not found"):
        list(backend.list("keys/"))


@pytest.mark.parametrize(
    ("access_key", "secret_key"),
    [("unknown-access-key", "whatever"), (None, "wrong-secret")],
    ids=["unknown-key", "wrong-secret"],
)
def test_wrong_credentials_named(
    s3_env: SeaweedServer,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    access_key: str | None,
    secret_key: str,
) -> None:
    if access_key:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    backend = S3Backend(bucket, "repo", retry=FAST_RETRY)

    for call in (backend.location_exists, lambda: backend.get("config")):
        with pytest.raises(BackendError, match="rejected the credentials") as caught:
            call()
        assert "AWS_ACCESS_KEY_ID" in str(caught.value)
        assert "AWS_SECRET_ACCESS_KEY" in str(caught.value)


def test_create_bucket_denied(s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    backend = S3Backend("cas-never-created", retry=FAST_RETRY)

    with pytest.raises(BackendError, match="could not create bucket cas-never-created"):
        backend.create_location()


def test_server_down_bounded_retries(
    s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # the discard port, closed
    backend = S3Backend(BUCKET, "repo", retry=FAST_RETRY)
    started = time.monotonic()

    with caplog.at_level(logging.WARNING), pytest.raises(BackendError, match="after 3 attempts"):
        backend.get("data/00/pack")

    assert time.monotonic() - started < FAST_RETRY.time_limit
    retries = [record for record in caplog.records if "data/00/pack" in record.getMessage()]
    assert len(retries) == FAST_RETRY.max_attempts - 1


def test_put_without_conditional_support(s3_env: SeaweedServer, bucket: str) -> None:
    backend = S3Backend(bucket, f"head-check-{uuid.uuid4().hex}", conditional_put=False)
    backend.put("keys/one", b"original")

    with pytest.raises(AlreadyExistsError):
        backend.put("keys/one", b"replacement")
    assert backend.get("keys/one") == b"original"


# Faults injected by a proxy in front of the server


@pytest.fixture
def proxy(s3_env: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """Start a fault proxy in front of the server and point the AWS endpoint at it."""
    with FaultProxy(s3_env.ports["s3.port"]) as started:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", started.endpoint)
        yield started


@pytest.mark.parametrize("announced", [True, False], ids=["closed-early", "consistent-length"])
@pytest.mark.parametrize(("offset", "length"), [(0, None), (1000, 300_000), (0, MIB)])
def test_cut_body_is_retried(
    proxy: FaultProxy,
    bucket: str,
    caplog: pytest.LogCaptureFixture,
    announced: bool,
    offset: int,
    length: int | None,
) -> None:
    backend = S3Backend(bucket, f"cut-{uuid.uuid4().hex}", retry=FAST_RETRY)
    data = os.urandom(MIB)
    backend.put("data/00/pack", data)
    proxy.faults.cut_gets = 1
    proxy.faults.cut_announced = announced

    with caplog.at_level(logging.WARNING):
        read = backend.get("data/00/pack", offset, length)

    assert read == (data[offset:] if length is None else data[offset : offset + length])
    assert proxy.faults.cut_count == 1
    assert any("data/00/pack" in record.getMessage() for record in caplog.records)


def test_cut_body_every_time_fails(proxy: FaultProxy, bucket: str) -> None:
    backend = S3Backend(bucket, f"cut-{uuid.uuid4().hex}", retry=FAST_RETRY)
    backend.put("data/00/pack", os.urandom(100_000))
    proxy.faults.cut_gets = 100

    with pytest.raises(BackendError, match="after 3 attempts"):
        backend.get("data/00/pack", 0, 100_000)
    assert proxy.faults.cut_count == FAST_RETRY.max_attempts


def test_slow_down_is_retried(
    proxy: FaultProxy, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = S3Backend(bucket, f"slow-{uuid.uuid4().hex}", retry=FAST_RETRY)
    proxy.faults.slow_downs = 2

    with caplog.at_level(logging.WARNING):
        backend.put("index/one", b"index body")

    assert backend.get("index/one") == b"index body"
    assert proxy.faults.slow_down_count == 2
    warnings = [record.getMessage() for record in caplog.records]
    assert sum("SlowDown" in message and "index/one" in message for message in warnings) == 2


def test_rejected_if_none_match_falls_back(
    proxy: FaultProxy, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = S3Backend(bucket, f"reject-{uuid.uuid4().hex}", retry=FAST_RETRY)
    proxy.faults.reject_if_none_match = True

    with caplog.at_level(logging.WARNING):
        backend.put("keys/one", b"original")

    assert not backend.conditional_put
    assert proxy.faults.rejected_count == 1
    assert any("If-None-Match" in record.getMessage() for record in caplog.records)
    with pytest.raises(AlreadyExistsError):
        backend.put("keys/one", b"replacement")
    assert backend.get("keys/one") == b"original"


def test_checkout_through_cutting_proxy(
    s3_cas_env: CasEnv, run_cas: RunCas, proxy: FaultProxy, tmp_path: Path
) -> None:
    init_library_repo(
        s3_cas_env.env["CAS_REPOSITORY"],
        S3Backend(*astuple_of(s3_cas_env.env["CAS_REPOSITORY"])),
        s3_cas_env.cache,
    )
    files = make_model_folder(tmp_path / "model", seed=5, size=3 * MIB)
    run_cas("snapshot", tmp_path / "model", "--quiet")
    proxy.faults.cut_gets = 3

    run_cas("--s3-endpoint", proxy.endpoint, "checkout", "latest", tmp_path / "out", "--quiet")

    assert proxy.faults.cut_count == 3
    assert_same_files(files, tmp_path / "out")


def astuple_of(url: str) -> tuple[str, str]:
    """Return the bucket and prefix of an ``s3://`` URL."""
    location = parse_s3_url(url)
    return location.bucket, location.prefix


# Whole repositories through the command line


def test_cli_repository_on_s3(
    cas_env: CasEnv, run_cas: RunCas, s3_server: SeaweedServer, tmp_path: Path
) -> None:
    new_bucket = f"cas-cli-{uuid.uuid4().hex[:12]}"
    url = f"s3://{new_bucket}/models/team-a"
    set_cli_s3_env(cas_env, s3_server, url)
    del cas_env.env["AWS_ENDPOINT_URL_S3"]
    endpoint = ["-r", url, "--s3-endpoint", s3_server.endpoint]
    files = make_model_folder(tmp_path / "model", seed=1, size=6 * MIB)

    created = cas_json(run_cas, *endpoint, "init")
    snapshot = cas_json(run_cas, *endpoint, "snapshot", tmp_path / "model")
    run_cas(*endpoint, "checkout", "latest", tmp_path / "out", "--quiet")
    check = cas_json(run_cas, *endpoint, "check", "--read-data")

    assert isinstance(created, dict) and created["repository"] == url
    assert isinstance(snapshot, dict) and snapshot["files"] == len(files)
    assert_same_files(files, tmp_path / "out")
    assert isinstance(check, dict) and check["ok"] is True
    assert check["findings"] == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [("AWS_ACCESS_KEY_ID", "unknown-access-key"), ("AWS_SECRET_ACCESS_KEY", "wrong-secret")],
)
def test_cli_wrong_credentials(
    s3_cas_env: CasEnv, run_cas: RunCas, variable: str, value: str
) -> None:
    s3_cas_env.env[variable] = value

    result = run_cas("log", expect=2)

    assert "rejected the credentials" in result.stderr
    assert "AWS_ACCESS_KEY_ID" in result.stderr


def test_cli_missing_bucket(cas_env: CasEnv, run_cas: RunCas, s3_server: SeaweedServer) -> None:
    set_cli_s3_env(cas_env, s3_server, "s3://cas-missing-bucket/repo")

    result = run_cas("log", expect=2)

    assert "bucket cas-missing-bucket not found" in result.stderr
    assert "init" in result.stderr


def test_cli_concurrent_writers(
    s3_cas_env: CasEnv, run_cas: RunCas, s3_env: SeaweedServer, tmp_path: Path
) -> None:
    url = s3_cas_env.env["CAS_REPOSITORY"]
    init_library_repo(url, S3Backend(*astuple_of(url)), s3_cas_env.cache)
    sources = {
        writer: make_model_folder(tmp_path / f"model-{writer}", seed=100 + writer, size=4 * MIB)
        for writer in range(WRITER_COUNT)
    }

    # Each writer gets its own cache folder, as on separate machines.
    processes = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "cas_cli.main", "snapshot"),
                *(str(tmp_path / f"model-{writer}"), "--tag", f"writer-{writer}", "--json"),
            ],
            env={**s3_cas_env.env, "XDG_CACHE_HOME": str(tmp_path / f"cache-{writer}")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for writer in range(WRITER_COUNT)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]

    for process, (_stdout, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr
    log = cas_json(run_cas, "log")
    assert isinstance(log, list) and len(log) == WRITER_COUNT
    for writer, files in sources.items():
        snapshot_id = next(item["id"] for item in log if f"writer-{writer}" in item["tags"])
        run_cas("checkout", snapshot_id, tmp_path / f"by-id-{writer}", "--quiet")
        assert_same_files(files, tmp_path / f"by-id-{writer}")
    check = cas_json(run_cas, "check", "--read-data")
    assert isinstance(check, dict) and check["ok"] is True
    assert check["findings"] == []


def test_cli_server_stops_mid_snapshot(cas_env: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    server = SeaweedServer(weed_or_skip(), tmp_path / "seaweedfs")
    server.start()
    try:
        run_interrupted_snapshot(cas_env, run_cas, server, tmp_path)
    finally:
        server.stop()


def run_interrupted_snapshot(
    cas_env: CasEnv, run_cas: RunCas, server: SeaweedServer, tmp_path: Path
) -> None:
    """Stop the server after the first index object is published, restart it, and rerun."""
    url = "s3://cas-fault/repo"
    set_cli_s3_env(cas_env, server, url)
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_server_env(monkeypatch, server)
        watcher = S3Backend("cas-fault", "repo")
        init_library_repo(url, watcher, cas_env.cache)
        files = make_model_folder(tmp_path / "model", seed=7, size=160 * MIB)
        snapshot = subprocess.Popen(
            [sys.executable, "-m", "cas_cli.main", "snapshot", str(tmp_path / "model"), "--json"],
            env=cas_env.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # Stop the server once the first index object (published every 64 packs) exists.
        deadline = time.monotonic() + 60
        while snapshot.poll() is None and time.monotonic() < deadline:
            if any(True for _ in watcher.list("index/")):
                break
            time.sleep(0.05)
        packs_before_stop = sum(1 for _ in watcher.list("data/"))
        server.stop()
        _stdout, stderr = snapshot.communicate(timeout=120)

        assert snapshot.returncode == 2, f"the snapshot did not fail: {stderr}"
        assert "Traceback" not in stderr
        assert "cas: " in stderr
        assert packs_before_stop >= INDEX_FLUSH_PACKS

        server.start()
        rerun = cas_json(run_cas, "snapshot", tmp_path / "model")
        run_cas("checkout", "latest", tmp_path / "out", "--quiet")
        # Packs uploaded after the published index and before the stop are in no index
        # object: check warns about them (exit code 1) and nothing else.
        check = json.loads(run_cas("check", "--read-data", "--json", expect=None).stdout)
        watcher.close()

    assert isinstance(rerun, dict)
    total = sum(len(content) for content in files.values())
    # Packs listed in the published index are reused; the rest are uploaded again.
    assert rerun["bytes_added"] <= total - INDEX_FLUSH_PACKS * MIB // 2
    assert_same_files(files, tmp_path / "out")
    assert check["ok"] is True
    assert {finding["kind"] for finding in check["findings"]} <= {"unreferenced-pack"}
