"""Model file parsers on real files, and on headers that lie.

The files come from independent writers: the real all-MiniLM-L6-v2 safetensors file,
torch.save, the gguf package and numpy. Each kind of lie (offsets out of range, overlapping
tensors, sizes that disagree with dtype and shape, truncation, absurd counts) must raise
`ModelFormatError`, never another exception and never a huge allocation.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from model_files import (
    minilm_path,
    random_tensors,
    read_safetensors,
    safetensors_bytes,
    write_gguf,
    write_safetensors,
    write_torch,
)

from cas.models import ModelFormatError, ModelLayout, parse_file, parse_layout
from cas.models.gguf import GGML_TYPES
from cas.models.verify import run_test_command, verify_models

SHAPES = {"layer.0.weight": (64, 48), "layer.0.bias": (48,), "layer.1.weight": (48, 32)}


def parse_bytes(data: bytes) -> ModelLayout | None:
    return parse_layout(lambda offset, size: data[offset : offset + size], len(data))


def tensor_table(layout: ModelLayout) -> dict[str, tuple[str, tuple[int, ...], int]]:
    return {t.name: (t.dtype, t.shape, t.size) for t in layout.tensors}


def check_bytes_match(path: Path, layout: ModelLayout, arrays: dict[str, np.ndarray]) -> None:
    """Assert that each tensor's byte range in the file contains exactly the array's bytes."""
    raw = path.read_bytes()
    for tensor in layout.tensors:
        expected = np.ascontiguousarray(arrays[tensor.name]).tobytes()
        assert raw[tensor.offset : tensor.end] == expected, tensor.name


# Real files


def test_minilm_safetensors_layout() -> None:
    path = minilm_path()
    layout = parse_file(path)
    arrays = read_safetensors(path)

    assert layout is not None
    assert layout.format == "safetensors"
    assert len(layout.tensors) == len(arrays) == 104
    assert layout.file_size == path.stat().st_size
    check_bytes_match(path, layout, arrays)
    assert layout.tensors[-1].end == layout.file_size


def test_torch_file_of_minilm(tmp_path: Path) -> None:
    arrays = read_safetensors(minilm_path())
    path = write_torch(tmp_path / "model.pt", arrays)
    layout = parse_file(path)
    safetensors_layout = parse_file(minilm_path())

    assert layout is not None and safetensors_layout is not None
    assert layout.format == "torch"
    assert tensor_table(layout) == tensor_table(safetensors_layout)
    check_bytes_match(path, layout, arrays)
    assert len(layout.data_regions) == len(arrays)


def test_torch_views_and_dtypes(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(100, dtype=torch.float32)
    state = {
        "nested": {"view": base[10:30], "bf16": torch.ones(8, dtype=torch.bfloat16)},
        "list": [torch.zeros(3, 4, dtype=torch.float16), torch.tensor(7)],
        "param": torch.nn.Parameter(torch.ones(5)),
        "step": 12,
    }
    path = tmp_path / "views.pt"
    torch.save(state, path)
    layout = parse_file(path)

    assert layout is not None
    table = {t.name: t for t in layout.tensors}
    assert set(table) == {"nested.view", "nested.bf16", "list.0", "list.1", "param"}
    view = table["nested.view"]
    assert (view.dtype, view.shape, view.size, view.element_size) == ("F32", (20,), 80, 4)
    raw = path.read_bytes()
    assert raw[view.offset : view.end] == base[10:30].numpy().tobytes()
    assert table["nested.bf16"].element_size == 2
    assert table["list.0"].dtype == "F16"
    assert table["list.1"].shape == ()
    assert table["list.1"].dtype == "I64"


def test_gguf_from_gguf_package(tmp_path: Path) -> None:
    arrays = random_tensors(1, SHAPES)
    arrays["ids"] = np.arange(40, dtype=np.int32)
    arrays["half"] = np.ones((4, 32), dtype=np.float16)
    path = write_gguf(tmp_path / "model.gguf", arrays)
    layout = parse_file(path)

    assert layout is not None
    assert layout.format == "gguf"
    assert {t.name for t in layout.tensors} == set(arrays)
    check_bytes_match(path, layout, arrays)
    table = {t.name: t for t in layout.tensors}
    # GGUF lists dimensions innermost first.
    assert table["layer.0.weight"].shape == (48, 64)
    assert table["half"].element_size == 2
    assert table["ids"].element_size == 0


def test_gguf_quantized_tensor_size(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    quant = gguf.GGMLQuantizationType.Q8_0
    data = gguf.quants.quantize(random_tensors(2, {"w": (8, 64)})["w"], quant)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "test")
    writer.add_tensor("w", data, raw_dtype=quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    layout = parse_file(tmp_path / "q.gguf")

    assert layout is not None
    (tensor,) = layout.tensors
    assert tensor.dtype == "Q8_0"
    assert tensor.shape == (64, 8)
    assert tensor.size == data.nbytes


def test_ggml_type_table_matches_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    for number, (name, block_elements, block_size) in GGML_TYPES.items():
        quant = gguf.GGMLQuantizationType(number)
        assert quant.name == name
        assert gguf.GGML_QUANT_SIZES[quant] == (block_elements, block_size), name


def test_npz_stored_and_compressed(tmp_path: Path) -> None:
    arrays = random_tensors(3, SHAPES)
    arrays["ids"] = np.arange(30, dtype=np.int64)
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    plain = parse_file(tmp_path / "plain.npz")
    packed = parse_file(tmp_path / "packed.npz")

    assert plain is not None and packed is not None
    assert plain.format == packed.format == "npz"
    assert {t.name for t in plain.tensors} == set(arrays)
    check_bytes_match(tmp_path / "plain.npz", plain, arrays)
    assert {t.name: t.dtype for t in plain.tensors}["ids"] == "I64"
    # Deflated members are no tensors: their bytes go to the normal chunker.
    assert packed.tensors == ()


def test_npz_zip64_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = {"a": np.ones((20, 20), dtype=np.float32), "b": np.arange(50)}
    # zipfile writes zip64 extra fields and end records above ZIP64_LIMIT; a low limit makes
    # it write them for this small file.
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 100)
    np.savez(tmp_path / "z64.npz", **arrays)
    monkeypatch.undo()
    raw = (tmp_path / "z64.npz").read_bytes()
    layout = parse_file(tmp_path / "z64.npz")

    assert b"PK\x06\x06" in raw
    assert layout is not None
    check_bytes_match(tmp_path / "z64.npz", layout, arrays)


def test_gguf_version_2(tmp_path: Path) -> None:
    arrays = random_tensors(8, SHAPES)
    data = bytearray(write_gguf(tmp_path / "m.gguf", arrays).read_bytes())
    # The gguf package's reader (0.19) reads versions 2 and 3 with the same code.
    data[4:8] = struct.pack("<I", 2)
    (tmp_path / "v2.gguf").write_bytes(bytes(data))
    layout = parse_file(tmp_path / "v2.gguf")

    assert layout is not None
    check_bytes_match(tmp_path / "v2.gguf", layout, arrays)


def test_other_files_not_recognised(tmp_path: Path) -> None:
    (tmp_path / "a.zip").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as archive:
        archive.writestr("readme.txt", "hello")

    assert parse_file(tmp_path / "a.zip") is None
    assert parse_bytes(b"plain text file\n" * 10) is None
    assert parse_bytes(b"") is None


# Headers that lie


def safetensors_with(header: dict[str, object], data_size: int) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(data_size)


LYING_SAFETENSORS = {
    "offset past the end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8),
    "overlap": (
        {
            "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
        },
        24,
    ),
    "size disagrees with shape": (
        {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}},
        16,
    ),
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, 16),
    "negative dimension": ({"a": {"dtype": "U8", "shape": [-4], "data_offsets": [0, 0]}}, 0),
    "reversed offsets": ({"a": {"dtype": "U8", "shape": [0], "data_offsets": [9, 1]}}, 16),
    "too many dimensions": (
        {"a": {"dtype": "U8", "shape": [1] * 40, "data_offsets": [0, 1]}},
        1,
    ),
}


@pytest.mark.parametrize("kind", sorted(LYING_SAFETENSORS))
def test_safetensors_lies(kind: str) -> None:
    header, data_size = LYING_SAFETENSORS[kind]
    with pytest.raises(ModelFormatError):
        parse_bytes(safetensors_with(header, data_size))


def test_safetensors_truncated_and_huge_header() -> None:
    good = safetensors_bytes(random_tensors(4, {"w": (16, 16)}))
    huge = struct.pack("<Q", 2**63) + b"{" + bytes(100)

    assert parse_bytes(good) is not None
    with pytest.raises(ModelFormatError):
        parse_bytes(good[:-1])
    with pytest.raises(ModelFormatError):
        parse_bytes(good[:40])
    # A size past the limit is not recognised as safetensors at all, so nothing is read.
    assert parse_bytes(huge) is None


def gguf_bytes(tmp_path: Path) -> bytes:
    return write_gguf(tmp_path / "m.gguf", random_tensors(5, SHAPES)).read_bytes()


def tensor_info_offset(data: bytes, name: str) -> int:
    """Return the offset of a GGUF tensor info's u64 offset field."""
    encoded = struct.pack("<Q", len(name)) + name.encode()
    start = data.index(encoded) + len(encoded)
    (dim_count,) = struct.unpack_from("<I", data, start)
    return start + 4 + 8 * dim_count + 4


def test_gguf_lies(tmp_path: Path) -> None:
    data = gguf_bytes(tmp_path)
    assert parse_bytes(data) is not None
    second = tensor_info_offset(data, "layer.0.bias")
    first_offset = struct.unpack_from("<Q", data, tensor_info_offset(data, "layer.0.weight"))[0]
    lies = {
        "version 1": data[:4] + struct.pack("<I", 1) + data[8:],
        "huge tensor count": data[:8] + struct.pack("<Q", 2**60) + data[16:],
        "huge key count": data[:16] + struct.pack("<Q", 2**60) + data[24:],
        "offset past the end": data[:second] + struct.pack("<Q", 2**40) + data[second + 8 :],
        "overlap": data[:second] + struct.pack("<Q", first_offset) + data[second + 8 :],
        "misaligned offset": data[:second] + struct.pack("<Q", 8) + data[second + 8 :],
        "truncated data": data[:-100],
        "truncated header": data[:60],
    }
    for kind, lie in lies.items():
        with pytest.raises(ModelFormatError):
            parse_bytes(lie)
        assert kind


def test_npz_size_lie(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", w=np.zeros((10, 10), dtype=np.float32))
    data = bytearray((tmp_path / "a.npz").read_bytes())
    start = data.index(b"'shape': (10, 10)")
    data[start : start + 17] = b"'shape': (10, 11)"
    with pytest.raises(ModelFormatError):
        parse_bytes(bytes(data))


def test_zip_directory_lies(tmp_path: Path) -> None:
    arrays = random_tensors(6, SHAPES)
    data = write_torch(tmp_path / "m.pt", arrays).read_bytes()
    end = data.rindex(b"PK\x05\x06")
    entry_count_lie = data[: end + 10] + struct.pack("<H", 0xFFFE) + data[end + 12 :]
    directory_offset_lie = data[: end + 16] + struct.pack("<I", len(data)) + data[end + 20 :]

    with pytest.raises(ModelFormatError):
        parse_bytes(entry_count_lie)
    with pytest.raises(ModelFormatError):
        parse_bytes(directory_offset_lie)
    with pytest.raises(ModelFormatError):
        parse_bytes(data[: len(data) // 2])


def torch_zip_with_pickle(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("m/data.pkl", payload)
        archive.writestr("m/data/0", bytes(16))
    return path


def test_torch_storage_size_lie(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(4)}, buffer)
    with zipfile.ZipFile(buffer) as archive:
        payload = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    # The pickle claims 4 float32 elements (16 bytes); the member has 16 bytes, so a
    # view of 5 elements and a storage of 5 elements both disagree with the file.
    too_long = payload.replace(b"K\x04\x85", b"K\x05\x85", 1)
    wrong_storage = payload.replace(b"cpuq\x06K\x04", b"cpuq\x06K\x05", 1)

    assert parse_file(torch_zip_with_pickle(tmp_path / "ok.pt", payload)) is not None
    assert too_long != payload
    with pytest.raises(ModelFormatError):
        parse_file(torch_zip_with_pickle(tmp_path / "long.pt", too_long))
    assert wrong_storage != payload
    with pytest.raises(ModelFormatError):
        parse_file(torch_zip_with_pickle(tmp_path / "storage.pt", wrong_storage))


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.marker}",)


def test_torch_pickle_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _Exploit(marker), "x": [1, 2]}, protocol=2)
    layout = parse_file(torch_zip_with_pickle(tmp_path / "evil.pt", payload))

    assert not marker.exists()
    assert layout is not None
    assert layout.tensors == ()


def test_torch_pickle_garbage(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError):
        parse_file(torch_zip_with_pickle(tmp_path / "bad.pt", b"\x80\x02garbage"))


# Verification of restored folders


def test_verify_models_finds_lies(tmp_path: Path) -> None:
    arrays = random_tensors(7, SHAPES)
    write_safetensors(tmp_path / "good.safetensors", arrays)
    good = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(good[:-4])
    (tmp_path / "padded.safetensors").write_bytes(good + b"\0" * 4)
    (tmp_path / "not.safetensors").write_bytes(b"hello")
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "legacy.bin").write_bytes(b"\x80\x02}q\x00.")
    checks = {check.path: check for check in verify_models(str(tmp_path))}

    assert set(checks) == {
        "good.safetensors",
        "short.safetensors",
        "padded.safetensors",
        "not.safetensors",
    }
    assert checks["good.safetensors"].error == ""
    assert checks["good.safetensors"].tensor_count == 3
    assert "truncated" in checks["short.safetensors"].error or checks["short.safetensors"].error
    assert "ends at" in checks["padded.safetensors"].error
    assert "does not start like" in checks["not.safetensors"].error


def test_run_test_command_environment(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    with out.open("w") as stream:
        code = run_test_command('pwd; echo "$CAS_CHECKOUT_DIR"; exit 4', str(tmp_path), stream)

    assert code == 4
    assert out.read_text().split() == [str(tmp_path), str(tmp_path)]
    assert run_test_command("kill -9 $$", str(tmp_path)) == 137


def test_parsing_never_imports_torch(tmp_path: Path) -> None:
    path = write_torch(tmp_path / "m.pt", random_tensors(9, SHAPES))
    code = (
        "import sys\n"
        "from cas.models import parse_file\n"
        f"layout = parse_file({str(path)!r})\n"
        "print(len(layout.tensors), 'torch' in sys.modules, 'numpy' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["3", "False", "False"]
