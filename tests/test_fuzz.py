"""Fuzzing the readers with mutated objects: only `CasError` may come out, and quickly.

Two kinds of input per format:

- bytes as stored (packs, sealed objects of every kind, key objects), mutated by flips,
  insertions, deletions and truncation. Authentication rejects every change to a sealed
  object, pack header or blob before its content is parsed; only the pack prologue and
  trailer are checked against fixed bounds first. Key objects are parsed first, within
  their size bound, because their KDF parameters are public;
- plaintext behind the authentication (tree bodies, pack header lists, index and snapshot
  bodies), mutated the same way and sealed again with the repository's keys, so that the
  parsers themselves are exercised on authenticated garbage.

Hypothesis's deadline bounds the time of each example. The normal run is kept short; the
``slow`` variants run many more examples.
"""

from __future__ import annotations

import contextlib
import os
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cas.backend.local import LocalBackend
from cas.crypto import (
    KdfParams,
    MasterKeys,
    counter_nonce,
    pack_header_key,
    pack_msgpack,
    unpack_msgpack,
)
from cas.errors import CasError
from cas.index import decode_index_body
from cas.keys import unlock, write_key
from cas.objects import ObjectKind, decode_object, encode_object, seal_object
from cas.pack import (
    PROLOGUE_SIZE,
    TRAILER_SIZE,
    BlobOpener,
    BlobType,
    Codec,
    PackWriter,
    compress,
    decode_header,
    parse_prologue,
    parse_trailer,
)
from cas.snapshot import snapshot_from_body
from cas.tree import Node, decode_tree, encode_tree

PASSWORD = b"fuzz password"
FAST_KDF = KdfParams(salt=b"s" * 16, iterations=1, lanes=1, memory_kib=64)


@dataclass
class Samples:
    """Valid objects of every format, made once for all examples."""

    keys: MasterKeys
    pack_id: bytes
    pack: bytes
    header_plain: bytes
    tree_plain: bytes
    index_body: bytes
    snapshot_body: bytes
    key_object: bytes


def make_samples() -> Samples:
    keys = MasterKeys.generate()
    tree_nodes = [
        Node(name=b"a.bin", type="file", size=5, chunks=b"\x01" * 32, sizes=(5,), digest=b"d" * 32),
        Node(name=b"link", type="symlink", target=b"a.bin", xattrs={b"user.x": b"1"}),
        Node(name=b"sub", type="dir", subtree=b"\x02" * 32, mode=0o755),
    ]
    tree_plain = encode_tree(tree_nodes)
    writer = PackWriter(keys, 1 << 20, 1 << 20)
    chunk = os.urandom(3000)
    writer.add(BlobType.CHUNK, keys.blob_id(chunk), chunk, Codec.NONE, len(chunk))
    packed = compress(tree_plain) or tree_plain
    codec = Codec.LZ4 if packed is not tree_plain else Codec.NONE
    writer.add(BlobType.TREE, keys.blob_id(tree_plain), packed, codec, len(tree_plain))
    pack = bytes(writer.finish())
    header_plain = pack_msgpack([entry.to_list() for entry in writer.entries])
    index_body = pack_msgpack(
        {
            "v": 1,
            "packs": [[writer.pack_id, [e.to_list() for e in writer.entries]]],
            "supersedes": [],
        }
    )
    snapshot_body = pack_msgpack(
        {
            "v": 1,
            "time": "2026-12-04T16:08:56.310378+00:00",
            "host": "h",
            "user": "u",
            "paths": [b"/src"],
            "tags": ["t"],
            "message": "m",
            "meta": {"k": "v"},
            "parent": None,
            "tree": keys.blob_id(tree_plain),
            "cas_version": "0",
            "summary": {"files": 1},
        }
    )
    return Samples(
        keys=keys,
        pack_id=writer.pack_id,
        pack=pack,
        header_plain=header_plain,
        tree_plain=tree_plain,
        index_body=index_body,
        snapshot_body=snapshot_body,
        key_object=b"",
    )


SAMPLES = make_samples()

# One mutation: (operation, position as a fraction of the length, random bytes).
mutation = st.tuples(
    st.sampled_from(["flip", "insert", "delete", "truncate", "overwrite"]),
    st.floats(min_value=0, max_value=1, allow_nan=False),
    st.binary(min_size=1, max_size=16),
)
mutations = st.lists(mutation, min_size=1, max_size=4)


def mutate(data: bytes, steps: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for operation, where, noise in steps:
        position = min(int(where * len(out)), max(len(out) - 1, 0))
        if operation == "flip" and out:
            out[position] ^= noise[0] or 1
        elif operation == "insert":
            out[position:position] = noise
        elif operation == "delete":
            del out[position : position + len(noise)]
        elif operation == "truncate":
            del out[position:]
        else:
            out[position : position + len(noise)] = noise
    return bytes(out)


def changed(data: bytes, steps: list[tuple[str, float, bytes]]) -> bytes | None:
    mutated = mutate(data, steps)
    return None if mutated == data else mutated


FAST = settings(max_examples=400, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=30000, deadline=5000, suppress_health_check=[HealthCheck.too_slow])


# Readers, each taking one input that may be anything


def read_pack(data: bytes) -> None:
    """Read a pack as `cas repair index` and `cas check --read-data` do."""
    name = SAMPLES.pack_id.hex()
    key_mode, salt = parse_prologue(data[:PROLOGUE_SIZE], name)
    header_size = parse_trailer(data[-TRAILER_SIZE:], len(data), name)
    start = len(data) - TRAILER_SIZE - header_size
    header = decode_header(
        SAMPLES.keys, SAMPLES.pack_id, data[:PROLOGUE_SIZE], data[start:-TRAILER_SIZE], start
    )
    opener = BlobOpener(SAMPLES.keys, SAMPLES.pack_id, key_mode, salt)
    for entry in header.entries:
        stored = data[entry.offset : entry.offset + entry.stored_size]
        opener.open(
            entry.blob_id,
            entry.blob_type,
            entry.codec,
            entry.filter,
            entry.raw_size,
            entry.offset,
            stored,
        )


def read_resealed_header(plain: bytes) -> None:
    """Decode a header list that authenticates: the parser behind the tag."""
    pack = SAMPLES.pack
    prologue = pack[:PROLOGUE_SIZE]
    salt = prologue[8:40]
    key = pack_header_key(SAMPLES.keys.index_key, salt, SAMPLES.pack_id)
    sealed = AESGCM(key).encrypt(counter_nonce(0), plain, prologue)
    decode_header(SAMPLES.keys, SAMPLES.pack_id, prologue, sealed, len(pack) - 100)


def read_index_object(data: bytes) -> None:
    name = "index/" + "ab" * 32
    decode_index_body(decode_object(SAMPLES.keys, ObjectKind.INDEX, name, data), name)


def read_resealed_index(plain: bytes) -> None:
    name = "index/" + "ab" * 32
    sealed = seal_object(SAMPLES.keys, ObjectKind.INDEX, name, plain)
    decode_index_body(decode_object(SAMPLES.keys, ObjectKind.INDEX, name, sealed), name)


def read_resealed_snapshot(plain: bytes) -> None:
    name = "snapshots/" + "cd" * 32
    sealed = seal_object(SAMPLES.keys, ObjectKind.SNAPSHOT, name, plain)
    snapshot_from_body(
        b"\x00" * 32, decode_object(SAMPLES.keys, ObjectKind.SNAPSHOT, name, sealed), name
    )


def expect_cas_error_only(reader, data: bytes) -> None:
    """Run ``reader``; a `CasError` or success is fine, any other exception fails the test."""
    with contextlib.suppress(CasError):
        reader(data)


# Stored bytes: authentication rejects every change


@FAST
@given(steps=mutations)
def test_fuzz_pack(steps):
    data = changed(SAMPLES.pack, steps)
    if data is None:
        return
    expect_cas_error_only(read_pack, data)


@FAST
@given(steps=mutations)
def test_fuzz_sealed_index_object(steps):
    name = "index/" + "ab" * 32
    original = seal_object(SAMPLES.keys, ObjectKind.INDEX, name, SAMPLES.index_body)
    data = changed(original, steps)
    if data is None:
        return
    with pytest.raises(CasError):
        read_index_object(data)


@FAST
@given(steps=mutations, kind=st.sampled_from(list(ObjectKind)))
def test_fuzz_sealed_object_any_kind(steps, kind):
    name = "config"
    original = encode_object(SAMPLES.keys, kind, name, {"v": 1})
    data = changed(original, steps)
    if data is None:
        return
    with pytest.raises(CasError):
        decode_object(SAMPLES.keys, kind, name, data)


def test_mutated_pack_blob_fails():
    """Guard for the pack fuzzer: a flip inside the first blob must raise, not pass."""
    data = bytearray(SAMPLES.pack)
    data[PROLOGUE_SIZE + 10] ^= 1

    with pytest.raises(CasError, match="failed authentication"):
        read_pack(bytes(data))


def test_unchanged_samples_read():
    """Guard for every fuzzer below: the unmutated samples read without error."""
    read_pack(SAMPLES.pack)
    read_resealed_header(SAMPLES.header_plain)
    read_resealed_index(SAMPLES.index_body)
    read_resealed_snapshot(SAMPLES.snapshot_body)
    assert len(decode_tree(SAMPLES.tree_plain, "tree")) == 3


# Plaintext behind the tag: the parsers see authenticated garbage


@FAST
@given(steps=mutations)
def test_fuzz_tree_body(steps):
    data = changed(SAMPLES.tree_plain, steps)
    if data is None:
        return
    expect_cas_error_only(lambda d: decode_tree(d, "tree"), data)


@FAST
@given(steps=mutations)
def test_fuzz_pack_header_body(steps):
    data = changed(SAMPLES.header_plain, steps)
    if data is None:
        return
    expect_cas_error_only(read_resealed_header, data)


@FAST
@given(steps=mutations)
def test_fuzz_index_body(steps):
    data = changed(SAMPLES.index_body, steps)
    if data is None:
        return
    expect_cas_error_only(read_resealed_index, data)


@FAST
@given(steps=mutations)
def test_fuzz_snapshot_body(steps):
    data = changed(SAMPLES.snapshot_body, steps)
    if data is None:
        return
    expect_cas_error_only(read_resealed_snapshot, data)


@FAST
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**63), max_value=2**64 - 1)
        | st.floats()
        | st.binary(max_size=40)
        | st.text(max_size=10),
        lambda children: (
            st.lists(children, max_size=5)
            | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), children, max_size=5)
        ),
        max_leaves=30,
    )
)
def test_fuzz_tree_structure(value):
    """Well-formed msgpack of any shape, as a tree body or as one node of a tree."""
    expect_cas_error_only(lambda d: decode_tree(d, "tree"), pack_msgpack(value))
    expect_cas_error_only(
        lambda d: decode_tree(d, "tree"), pack_msgpack({"v": 1, "nodes": [value]})
    )
    expect_cas_error_only(read_resealed_header, pack_msgpack([value]))
    expect_cas_error_only(
        read_resealed_index, pack_msgpack({"v": 1, "packs": [[b"\x00" * 32, [value]]]})
    )


@settings(max_examples=40, deadline=None)
@given(steps=mutations, target=st.sampled_from(["tree", "header", "index", "snapshot"]))
def test_fuzz_memory_bounded(steps, target):
    """Decoding authenticated garbage allocates at most a small multiple of its size."""
    readers = {
        "tree": (SAMPLES.tree_plain, lambda d: decode_tree(d, "tree")),
        "header": (SAMPLES.header_plain, read_resealed_header),
        "index": (SAMPLES.index_body, read_resealed_index),
        "snapshot": (SAMPLES.snapshot_body, read_resealed_snapshot),
    }
    original, reader = readers[target]
    data = mutate(original, steps)
    tracemalloc.start()
    try:
        expect_cas_error_only(reader, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 64 * len(data) + (1 << 20)


# Key objects


@pytest.fixture(scope="module")
def key_folder(tmp_path_factory) -> tuple[Path, bytes]:
    folder = tmp_path_factory.mktemp("fuzz-keys")
    backend = LocalBackend(folder)
    write_key(backend, SAMPLES.keys, PASSWORD, FAST_KDF)
    [path] = (folder / "keys").iterdir()
    return folder, path.read_bytes()


def read_key_object(folder: Path, data: bytes) -> None:
    keys_dir = folder / "keys"
    for old in keys_dir.iterdir():
        old.unlink()
    (keys_dir / ("ef" * 32)).write_bytes(data)
    unlock(LocalBackend(folder), PASSWORD)


def cheap_kdf(data: bytes) -> bool:
    """Whether a mutated key object can be tried quickly.

    A mutation may raise the Argon2id cost to values the format accepts (up to 1 GiB and
    16 passes), which is slow by design, so such inputs are skipped. So are parameters
    with ``memory_kib`` below 8 x ``lanes``: docs/format.md records that they pass the
    checks and then make Argon2id raise ValueError.
    """
    try:
        body = unpack_msgpack(data, "key object", 1 << 16)
    except CasError:
        return True
    if not isinstance(body, dict):
        return True
    values = [body.get(key) for key in ("iterations", "lanes", "memory_kib")]
    if not all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        return True
    iterations, lanes, memory_kib = values
    return iterations * memory_kib <= 4096 and memory_kib >= 8 * lanes


@FAST
@given(steps=mutations)
def test_fuzz_key_object(key_folder, steps):
    folder, original = key_folder
    data = changed(original, steps)
    if data is None or not cheap_kdf(data):
        return
    expect_cas_error_only(lambda d: read_key_object(folder, d), data)


# Long runs


@pytest.mark.slow
@SLOW
@given(steps=mutations, target=st.sampled_from(["tree", "header", "index", "snapshot", "pack"]))
def test_fuzz_all_readers_long(steps, target):
    readers = {
        "tree": (SAMPLES.tree_plain, lambda d: decode_tree(d, "tree")),
        "header": (SAMPLES.header_plain, read_resealed_header),
        "index": (SAMPLES.index_body, read_resealed_index),
        "snapshot": (SAMPLES.snapshot_body, read_resealed_snapshot),
        "pack": (SAMPLES.pack, read_pack),
    }
    original, reader = readers[target]
    data = changed(original, steps)
    if data is None:
        return
    expect_cas_error_only(reader, data)
