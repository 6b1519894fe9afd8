"""Model files whose headers attack the parsers, through the library and the CLI.

Each file must be stored and restored byte for byte, `cas diff` and `cas snapshot` must
finish without a traceback, and `cas checkout --verify-models` must report it with exit
code 6. The memo and repetition cases also bound how much a small pickle may allocate.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import pytest

from cas.models import ModelFormatError, parse_file

PAD = b"\0" * 8192
"""Bytes that make every file larger than the test chunker's 4096-byte min_size."""

_STORAGE_TENSOR = (
    b"ctorch._utils\n_rebuild_tensor_v2\n(("
    b"X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01t"
    b"QK\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"
)
"""Protocol 2 opcodes that push one 1-element F32 tensor of storage ``0``."""


def safetensors_file(header: bytes) -> bytes:
    """Return a safetensors file with this raw JSON header and zero bytes after it."""
    return struct.pack("<Q", len(header)) + header + PAD


def torch_file(pickle_bytes: bytes, storage: bytes | None = None) -> bytes:
    """Return a torch zip whose ``archive/data.pkl`` is these pickle opcodes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", b"little")
        if storage is not None:
            archive.writestr("archive/data/0", storage)
        archive.writestr("archive/pad", PAD)
    return buffer.getvalue()


HOSTILE = {
    "deep-json.safetensors": safetensors_file(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "long-int.safetensors": safetensors_file(
        b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,4]}}'
    ),
    # A dict {huge int: None}: naming the key needs str() of a 24,000-digit int.
    "long-int-key.pt": torch_file(
        b"\x80\x02}\x8b" + struct.pack("<i", 10_000) + b"\x01" * 10_000 + b"Ns."
    ),
    # A dict whose key is a tuple nested 100,000 deep.
    "deep-key.pt": torch_file(b"\x80\x02})" + b"\x85" * 100_000 + b"Ns."),
    # LONG_BINPUT at memo index 2**25 would make the C unpickler allocate 512 MiB.
    "memo-index.pt": torch_file(b"\x80\x02Nr" + struct.pack("<I", 1 << 25) + b"."),
    "memo-index-text.pt": torch_file(b"\x80\x02Np33554432\n."),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_header_is_format_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(HOSTILE[name])
    with pytest.raises(ModelFormatError):
        parse_file(path)


def test_repeated_tensor_stops_at_limit(tmp_path: Path) -> None:
    # One memoized tensor appended 1,000,001 times: 2 MB of pickle, a million names.
    count = 1_000_001
    opcodes = b"\x80\x02" + _STORAGE_TENSOR + b"q\x00]q\x01(" + b"h\x00" * count + b"e."
    path = tmp_path / "repeated.pt"
    path.write_bytes(torch_file(opcodes, storage=b"\0" * 4))
    with pytest.raises(ModelFormatError, match="more than 1000000 tensors"):
        parse_file(path)


def test_single_tensor_still_parses(tmp_path: Path) -> None:
    path = tmp_path / "one.pt"
    path.write_bytes(torch_file(b"\x80\x02" + _STORAGE_TENSOR + b"q\x00.", storage=b"\0" * 4))
    layout = parse_file(path)
    assert layout is not None
    assert [tensor.shape for tensor in layout.tensors] == [(1,)]


def test_hostile_files_roundtrip_cli(cli_repo, run_cas, tmp_path: Path) -> None:
    source = tmp_path / "hostile"
    source.mkdir()
    marker = tmp_path / "code-ran"
    command = b"__import__('os').system('touch " + str(marker).encode() + b"')"
    evil = b"cbuiltins\neval\n(V" + command + b"\ntR."
    files = {**HOSTILE, "eval.pt": torch_file(evil)}
    for name, content in files.items():
        (source / name).write_bytes(content)

    first = json.loads(run_cas("snapshot", source, "--json").stdout)["id"]
    (source / "long-int.safetensors").write_bytes(HOSTILE["deep-json.safetensors"])
    run_cas("snapshot", source)
    diff = run_cas("diff", first, "latest")
    assert "long-int.safetensors" in diff.stdout

    restored = tmp_path / "restored"
    checked = run_cas("checkout", first, restored, "--verify-models", expect=6)
    for name, content in files.items():
        assert (restored / name).read_bytes() == content, name
    # eval.pt is a valid torch file without tensors once eval is replaced by a stand-in.
    for name in HOSTILE:
        assert f"error: {name}:" in checked.stderr, name
    assert not marker.exists()
