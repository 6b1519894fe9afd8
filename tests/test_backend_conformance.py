"""One conformance suite for every backend: the local folder and S3 (a real SeaweedFS server).

Each test receives a fresh, empty backend through the parametrized ``backend`` fixture: a new
folder for the local backend, a new key prefix in one shared bucket for S3.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from s3server import SeaweedServer, s3_server, use_server_env

from cas.backend import Backend, LocalBackend, ObjectInfo
from cas.backend.s3 import MULTIPART_THRESHOLD, PART_SIZE, S3Backend
from cas.errors import AlreadyExistsError, BackendError, IntegrityError, NotFoundError, UsageError

__all__ = ["s3_server"]

BUCKET = "cas-conformance"
LISTING_PAGE_SIZE = 1000  # S3 returns at most 1000 keys per ListObjectsV2 page
EDGE_SIZES = [0, 1, 4095, 4096, 4097, 1 << 20]
LARGE_SIZE = 40 << 20


@pytest.fixture(scope="session")
def s3_bucket(s3_server: SeaweedServer) -> str:
    """Create the bucket that every S3 test uses, each under its own prefix."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        use_server_env(monkeypatch, s3_server)
        backend = S3Backend(BUCKET)
        backend.create_location()
        backend.close()
    return BUCKET


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Yield an empty backend of each kind."""
    if request.param == "local":
        store: Backend = LocalBackend(tmp_path / "store")
        store.create_location()
    else:
        server: SeaweedServer = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        use_server_env(monkeypatch, server)
        store = S3Backend(bucket, f"conformance/{uuid.uuid4().hex}")
    try:
        yield store
    finally:
        store.close()


def random_payload(size: int) -> bytes:
    """Return ``size`` random bytes."""
    return os.urandom(size)


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_put_get_round_trip(backend: Backend, size: int) -> None:
    data = random_payload(size)
    backend.put("data/ab/object", data)

    assert backend.get("data/ab/object") == data
    assert backend.size("data/ab/object") == size


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (0, 1000), (1, 999), (500, 500), (999, 1), (0, 0), (1000, 0), (123, None)],
)
def test_get_byte_range(backend: Backend, offset: int, length: int | None) -> None:
    data = random_payload(1000)
    backend.put("object", data)

    expected = data[offset:] if length is None else data[offset : offset + length]
    assert backend.get("object", offset, length) == expected


@pytest.mark.parametrize(("offset", "length"), [(0, 1001), (999, 2), (1000, 1), (5000, 10)])
def test_get_past_end_is_short_read(backend: Backend, offset: int, length: int) -> None:
    backend.put("object", random_payload(1000))

    with pytest.raises(BackendError, match="short read"):
        backend.get("object", offset, length)


def test_put_existing_name_raises(backend: Backend) -> None:
    backend.put("keys/one", b"original")

    with pytest.raises(AlreadyExistsError):
        backend.put("keys/one", b"replacement")
    assert backend.get("keys/one") == b"original"


def test_put_overwrite_replaces(backend: Backend) -> None:
    backend.put("locks/one", b"original")
    backend.put("locks/one", b"new and longer", overwrite=True)

    assert backend.get("locks/one") == b"new and longer"
    assert backend.size("locks/one") == len(b"new and longer")


def test_put_overwrite_creates_new_name(backend: Backend) -> None:
    backend.put("locks/new", b"first", overwrite=True)

    assert backend.get("locks/new") == b"first"


def test_size_and_exists(backend: Backend) -> None:
    backend.put("snapshots/one", b"12345")

    assert backend.size("snapshots/one") == 5
    assert backend.exists("snapshots/one")
    assert not backend.exists("snapshots/two")


def test_exists_false_for_name_prefix(backend: Backend) -> None:
    backend.put("snapshots/one", b"12345")

    assert not backend.exists("snapshots")


def test_list_by_prefix(backend: Backend) -> None:
    names = ["config", "keys/k1", "data/00/p1", "data/00/p2", "data/01/p3", "index/i1"]
    for number, name in enumerate(names):
        backend.put(name, b"x" * number)

    assert sorted(backend.list("data/"), key=lambda info: info.name) == [
        ObjectInfo("data/00/p1", 2),
        ObjectInfo("data/00/p2", 3),
        ObjectInfo("data/01/p3", 4),
    ]
    assert [info.name for info in backend.list("data/01/")] == ["data/01/p3"]
    assert sorted(info.name for info in backend.list("")) == sorted(names)
    assert list(backend.list("snapshots/")) == []


def test_list_many_objects(backend: Backend) -> None:
    names = [f"data/{number % 7:02x}/{number:08x}" for number in range(LISTING_PAGE_SIZE + 150)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: backend.put(name, name.encode()), names))

    listed = list(backend.list("data/"))

    assert len(listed) == len(names)
    assert sorted(info.name for info in listed) == sorted(names)
    assert all(info.size == len(info.name) for info in listed)


def test_delete(backend: Backend) -> None:
    backend.put("index/one", b"data")
    backend.delete("index/one")

    assert not backend.exists("index/one")
    assert list(backend.list("index/")) == []


def test_delete_missing_raises(backend: Backend) -> None:
    with pytest.raises(NotFoundError):
        backend.delete("index/missing")


@pytest.mark.parametrize("call", ["get", "range", "size", "get_bounded"])
def test_missing_object_raises(backend: Backend, call: str) -> None:
    with pytest.raises(NotFoundError):
        if call == "get":
            backend.get("data/00/missing")
        elif call == "range":
            backend.get("data/00/missing", 10, 20)
        elif call == "size":
            backend.size("data/00/missing")
        else:
            backend.get_bounded("data/00/missing", 100)


def test_get_bounded_within_limit(backend: Backend) -> None:
    backend.put("config", b"x" * 100)

    assert backend.get_bounded("config", 100) == b"x" * 100


def test_get_bounded_over_limit_reads_nothing(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend.put("config", b"x" * 101)
    reads: list[str] = []

    def fail_on_get(name: str, offset: int = 0, length: int | None = None) -> bytes:
        reads.append(name)
        raise AssertionError("get_bounded read an object over its limit")

    monkeypatch.setattr(backend, "get", fail_on_get)
    with pytest.raises(IntegrityError, match="over the limit"):
        backend.get_bounded("config", 100)
    assert reads == []


def test_read_into(backend: Backend) -> None:
    data = random_payload(10_000)
    backend.put("data/00/pack", data)
    buffer = bytearray(3000)

    backend.read_into("data/00/pack", 2500, memoryview(buffer))

    assert bytes(buffer) == data[2500:5500]


def test_read_into_past_end_raises(backend: Backend) -> None:
    backend.put("data/00/pack", random_payload(100))
    buffer = bytearray(50)

    with pytest.raises(BackendError, match="short read"):
        backend.read_into("data/00/pack", 60, memoryview(buffer))


@pytest.mark.parametrize(
    "name", ["", "/abs", "../escape", "a/../b", "UPPER", "a//b", ".hidden", "a/b/c/d/e", "a b"]
)
def test_invalid_name_rejected(backend: Backend, name: str) -> None:
    with pytest.raises(UsageError):
        backend.put(name, b"x")
    with pytest.raises(UsageError):
        backend.get(name)
    with pytest.raises(UsageError):
        backend.delete(name)


def test_large_object(backend: Backend) -> None:
    assert LARGE_SIZE > MULTIPART_THRESHOLD  # a multipart upload on S3
    data = random_payload(LARGE_SIZE)
    backend.put("data/ff/large", memoryview(data))

    assert backend.size("data/ff/large") == LARGE_SIZE
    assert backend.get("data/ff/large") == data
    across_part = backend.get("data/ff/large", PART_SIZE - 10, 20)
    assert across_part == data[PART_SIZE - 10 : PART_SIZE + 10]


def test_large_object_existing_name_raises(backend: Backend) -> None:
    first = random_payload(MULTIPART_THRESHOLD + 1)
    backend.put("data/ff/large", first)

    with pytest.raises(AlreadyExistsError):
        backend.put("data/ff/large", random_payload(MULTIPART_THRESHOLD + 1))
    assert backend.get("data/ff/large") == first


def test_concurrent_puts_of_different_names(backend: Backend) -> None:
    names = [f"data/{number % 4:02x}/object-{number}" for number in range(64)]
    blobs = {name: random_payload(1000 + index) for index, name in enumerate(names)}

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda name: backend.put(name, blobs[name]), names))

    for name, data in blobs.items():
        assert backend.get(name) == data


def test_concurrent_puts_of_one_name(backend: Backend) -> None:
    writer_count = 8
    barrier = threading.Barrier(writer_count)
    winners: list[int] = []
    losers: list[int] = []

    def write(writer: int) -> None:
        barrier.wait()
        try:
            backend.put("keys/contested", f"writer {writer}".encode())
        except AlreadyExistsError:
            losers.append(writer)
        else:
            winners.append(writer)

    with ThreadPoolExecutor(writer_count) as pool:
        list(pool.map(write, range(writer_count)))

    assert len(winners) == 1, f"writers {winners} all stored the object"
    assert len(losers) == writer_count - 1
    assert backend.get("keys/contested") == f"writer {winners[0]}".encode()
