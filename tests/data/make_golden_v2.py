"""Write ``tests/data/repo-v2``, the golden repository of format version 2.

Run once from the project root, with the release whose format it records:

    .venv/bin/python tests/data/make_golden_v2.py

It uses every part of the format that version 2 and write-only keys added: a config
with zstd level 1 and automatic byte grouping, a safetensors file cut at its tensors
(so its fp32 chunks carry filter 4), a snapshot retagged by `change_tags` (a body with
``replaces``), and a snapshot written by a write-only key (a pack of key mode 2 and a
snapshot object of key 3). tests/test_format_golden.py rebuilds the same files with
`expected_files` and checks that the repository still opens, restores them and passes
``check --read-data``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from cas.archiver import Archiver, SnapshotOptions  # noqa: E402
from cas.chunker import ChunkerParams  # noqa: E402
from cas.codecs import Codec, Compression  # noqa: E402
from cas.crypto import KdfParams  # noqa: E402
from cas.history import TagChange, change_tags  # noqa: E402
from cas.keyring import add_key  # noqa: E402
from cas.repository import Repository  # noqa: E402

TARGET = ROOT / "tests" / "data" / "repo-v2"
PASSWORD = b"golden-v2"
WRITER_PASSWORD = b"golden-v2-writer"
CHUNKER = ChunkerParams(min_size=4096, avg_size=16384, max_size=65536)
MTIME_NS = 1767323045 * 10**9  # 2026-01-02 03:04:05 UTC


def _safetensors(tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        end = offset + len(data)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(item[2] for item in tensors.values())


def expected_files() -> dict[str, dict[str, bytes]]:
    """Return the two source folders, ``owner`` and ``writer``, as path -> content."""
    rng = random.Random(11)

    def floats(count: int) -> bytes:
        # Normal weights, scale 0.02, as float32: their high bytes repeat, so grouping helps.
        return struct.pack(f"<{count}f", *(rng.gauss(0.0, 0.02) for _ in range(count)))

    model = _safetensors(
        {
            "layer.0.weight": ("F32", (128, 128), floats(128 * 128)),
            "layer.0.bias": ("F32", (128,), floats(128)),
            "layer.1.weight": ("F32", (128, 128), floats(128 * 128)),
        }
    )
    owner = {
        "model.safetensors": model,
        "config.json": b'{"hidden_size": 128, "layers": 2}\n',
        "notes/readme.txt": b"golden repository, format version 2\n" * 40,
    }
    writer = {
        "model.safetensors": model,
        "step.json": b'{"step": 200}\n',
    }
    return {"owner": owner, "writer": writer}


def _write_folder(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, ns=(MTIME_NS, MTIME_NS))


def main() -> None:
    """Write the golden repository, replacing an older copy."""
    if TARGET.exists():
        shutil.rmtree(TARGET)
    kdf = KdfParams(salt=os.urandom(16), iterations=1, lanes=1, memory_kib=64)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        folders = expected_files()
        for name, files in folders.items():
            _write_folder(work / name, files)
        compression = Compression(Codec.ZSTD, 1, "auto")
        with Repository.init(
            str(TARGET),
            PASSWORD,
            cache_dir=work / "cache",
            chunker=CHUNKER,
            kdf=kdf,
            compression=compression,
        ) as repo:
            options = SnapshotOptions(
                tags=["golden"],
                message="golden repository v2",
                meta={"lr": "3e-4"},
                host="golden-host",
            )
            Archiver(repo, options).run([str(work / "owner")])
            change_tags(repo, ["latest"], TagChange(add=("best",)))
            add_key(repo, WRITER_PASSWORD, write_only=True, kdf=kdf, user="trainer", host="gpu-1")
        with Repository.open(str(TARGET), WRITER_PASSWORD, cache_dir=work / "writer") as repo:
            options = SnapshotOptions(tags=["cluster"], host="gpu-1")
            Archiver(repo, options).run([str(work / "writer")])
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
