"""Measure chunking throughput on fp32 weights and print a table; optionally write JSON.

Usage: python benchmarks/chunker_table.py --size-mib 1024 --json chunker.json

The input is normal-distributed float32 weights (scale 0.02) held in memory, so the
figures leave out file reads. Each row is the median of --repeat runs, and "best" is the
fastest run, which other processes on a shared machine disturb least. Throughput is in
MB/s (10**6 bytes per second). CPU seconds are the thread's own CPU time for one-thread
rows and the process's CPU time for the two-thread row. The BLAKE3 row is the hash that
cas computes over every chunk, measured in the same run, so the ratio column compares
the chunker with work that cas cannot avoid.

Alternatives measured to justify pyfastcdc: a numpy prototype of the same cut rule (run
on --numpy-mib), and pure Python (the cas reference and pyfastcdc's own fallback, run on
--python-mib). The numpy prototype's cut points are checked against pyfastcdc's.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import pyfastcdc
import pyfastcdc.py
from pyfastcdc.py.constants import GEAR, MASKS

from cas.chunker import DEFAULT_PARAMS, Chunker, ChunkerParams, MiB, reference_cut_2020

MB = 10**6


@dataclass(frozen=True)
class Row:
    """One measured implementation: medians over the repeats, and the fastest repeat."""

    name: str
    input_size: int
    repeat_count: int
    wall_seconds: float
    cpu_seconds: float
    throughput_mb_s: float
    best_throughput_mb_s: float
    note: str = ""


def make_weights(size: int, seed: int = 0) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Return ``size`` bytes of float32 weights drawn from N(0, 0.02**2)."""
    weights = np.random.default_rng(seed).standard_normal(size // 4, dtype=np.float32)
    weights *= np.float32(0.02)
    return weights


def measure(
    name: str,
    input_size: int,
    run: Callable[[], object],
    repeat_count: int,
    clock: Callable[[], float] = time.thread_time,
    note: str = "",
) -> Row:
    """Run ``run`` repeat_count times; return the median wall and CPU seconds."""
    walls = []
    cpus = []
    for _ in range(repeat_count):
        cpu_start = clock()
        wall_start = time.perf_counter()
        run()
        walls.append(time.perf_counter() - wall_start)
        cpus.append(clock() - cpu_start)
    wall = statistics.median(walls)
    return Row(
        name=name,
        input_size=input_size,
        repeat_count=repeat_count,
        wall_seconds=wall,
        cpu_seconds=statistics.median(cpus),
        throughput_mb_s=input_size / wall / MB,
        best_throughput_mb_s=input_size / min(walls) / MB,
        note=note,
    )


def chunk_in_threads(chunkers: list[Chunker], data: memoryview) -> None:
    """Cut ``data`` once in each of len(chunkers) threads at the same time."""
    threads = [
        threading.Thread(target=chunker.cut, args=(data,), kwargs={"final": True})
        for chunker in chunkers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# The numpy prototype. For position i, the windowed gear hash
#     H[i] = sum(gear[data[i - j]] << j for j in 0..63)  (mod 2**64)
# is built with six doubling steps: H[i] += H[i - w] << w for w = 1, 2, 4, ..., 32.
# Bits 0..47 of H[i] depend only on data[i - 47 .. i], and FastCDC's masks test no bit
# above 47, so H gives the same cut test as the real hash (which restarts at 0 where a
# chunk's hashing begins) everywhere except the first 47 positions after a restart.
# Those few positions are hashed exactly in Python.

# Blocks that stay in cache: on the 2-core Xeon of docs/chunking.md, 32 KiB to 64 KiB
# blocks ran at about 95 MB/s, 1 MiB blocks at 49 MB/s and 8 MiB blocks at 23 MB/s.
_PROTOTYPE_BLOCK_SIZE = 64 * 1024
_WINDOW_OVERLAP = 63


def numpy_candidates(data: np.ndarray[Any, np.dtype[np.uint8]], gear: np.ndarray, mask: int) -> Any:
    """Return the sorted positions i where the windowed hash H[i] & mask == 0."""
    found = []
    for start in range(0, len(data), _PROTOTYPE_BLOCK_SIZE):
        history = min(start, _WINDOW_OVERLAP)
        block = data[start - history : start + _PROTOTYPE_BLOCK_SIZE]
        hashes = gear[block]
        width = 1
        while width < 64:
            hashes[width:] += hashes[:-width] << np.uint64(width)
            width *= 2
        hits = np.flatnonzero((hashes[history:] & np.uint64(mask)) == 0)
        found.append(hits + start)
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def numpy_cut(data: bytes, params: ChunkerParams, seed: int) -> list[int]:
    """Cut ``data`` like pyfastcdc with a numpy-vectorized hash; return chunk lengths."""
    bits = int(np.floor(np.log2(params.avg_size) + 0.5))
    mask_s = MASKS[bits + params.normalization]
    mask_l = MASKS[bits - params.normalization]
    assert max(mask_s, mask_l) < 2**48, "prototype needs masks within bits 0..47"
    gear_list = [entry ^ seed for entry in GEAR]
    gear = np.array(gear_list, dtype=np.uint64)
    array = np.frombuffer(data, dtype=np.uint8)
    candidates_s = numpy_candidates(array, gear, mask_s)
    candidates_l = numpy_candidates(array, gear, mask_l)

    lengths = []
    offset = 0
    while offset < len(data):
        length = _prototype_chunk(data, offset, params, gear_list, candidates_s, candidates_l)
        lengths.append(length)
        offset += length
    return lengths


def _prototype_chunk(
    data: bytes,
    offset: int,
    params: ChunkerParams,
    gear: list[int],
    candidates_s: Any,
    candidates_l: Any,
) -> int:
    remaining = len(data) - offset
    if remaining <= params.min_size:
        return remaining
    limit = min(remaining, params.max_size)
    center = min(params.avg_size, limit)
    first = (params.min_size // 2) * 2
    middle = (center // 2) * 2
    end = (limit // 2) * 2
    bits = int(np.floor(np.log2(params.avg_size) + 0.5))
    mask_s = MASKS[bits + params.normalization]
    mask_l = MASKS[bits - params.normalization]

    # The first 47 positions after the restart: exact hash, one byte per step.
    gear_hash = 0
    exact_end = min(first + 47, end)
    for position in range(first, exact_end):
        gear_hash = ((gear_hash << 1) + gear[data[offset + position]]) % 2**64
        mask = mask_s if position < middle else mask_l
        if gear_hash & mask == 0:
            return position

    # Later positions: the first candidate of the windowed hash in each mask's range.
    for candidates, low, high in (
        (candidates_s, exact_end, middle),
        (candidates_l, max(exact_end, middle), end),
    ):
        index = np.searchsorted(candidates, offset + low)
        if index < len(candidates) and candidates[index] < offset + high:
            return int(candidates[index]) - offset
    return limit


def machine_info() -> dict[str, Any]:
    """Return the CPU model, core count and library versions of this machine."""
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": model,
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "pyfastcdc": pyfastcdc.__version__,
        "pyfastcdc_compiled": pyfastcdc.FastCDC.__module__.startswith("pyfastcdc.cy"),
        "blake3": blake3.__version__,
        "numpy": np.__version__,
    }


def run_all(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    """Measure every row and return them with the summary figures."""
    size = args.size_mib * MiB
    repeat = args.repeat
    weights = make_weights(size)
    view = weights.data.cast("B")
    seed = secrets.randbits(64) or 1
    keyed = Chunker(DEFAULT_PARAMS, seed)
    unkeyed = Chunker(DEFAULT_PARAMS)

    rows = [
        measure("pyfastcdc keyed, 1 thread", size, lambda: keyed.cut(view, final=True), repeat),
        measure("pyfastcdc unkeyed, 1 thread", size, lambda: unkeyed.cut(view, final=True), repeat),
        measure(
            "BLAKE3, 1 thread",
            size,
            lambda: blake3.blake3(view, max_threads=1).digest(),
            repeat,
        ),
    ]

    rows.append(measure_stream(keyed, weights.tobytes(), repeat))

    two_chunkers = [Chunker(DEFAULT_PARAMS, seed), Chunker(DEFAULT_PARAMS, seed)]
    rows.append(
        measure(
            "pyfastcdc keyed, 2 threads",
            2 * size,
            lambda: chunk_in_threads(two_chunkers, view),
            repeat,
            clock=time.process_time,
            note="each thread cuts the whole input; throughput counts both",
        )
    )

    rows.extend(measure_alternatives(args, weights, seed, keyed))
    summary = summarize(rows)
    return rows, summary


def measure_stream(chunker: Chunker, data: bytes, repeat_count: int) -> Row:
    """Measure `Chunker.iter_stream` reading ``data`` from an in-memory reader."""
    return measure(
        "pyfastcdc keyed, iter_stream",
        len(data),
        lambda: sum(1 for _ in chunker.iter_stream(io.BytesIO(data))),
        repeat_count,
        note="copies from an in-memory reader into a 20 MiB buffer",
    )


def measure_alternatives(
    args: argparse.Namespace, weights: Any, seed: int, keyed: Chunker
) -> list[Row]:
    """Measure the numpy prototype and the pure-Python implementations on prefixes."""
    numpy_input = bytes(weights.data.cast("B")[: args.numpy_mib * MiB])
    expected = keyed.cut(numpy_input, final=True)
    agrees = numpy_cut(numpy_input, DEFAULT_PARAMS, seed) == expected
    rows = [
        measure(
            "numpy prototype, 1 thread",
            len(numpy_input),
            lambda: numpy_cut(numpy_input, DEFAULT_PARAMS, seed),
            args.repeat,
            note=f"cut points equal pyfastcdc's: {agrees}",
        )
    ]

    python_input = numpy_input[: args.python_mib * MiB]
    gear = [entry ^ seed for entry in GEAR]
    pure_fastcdc = pyfastcdc.py.FastCDC(
        DEFAULT_PARAMS.avg_size,
        min_size=DEFAULT_PARAMS.min_size,
        max_size=DEFAULT_PARAMS.max_size,
        seed=seed & (2**63 - 1),
    )
    rows.append(
        measure(
            "pure Python (cas reference)",
            len(python_input),
            lambda: reference_cut_2020(python_input, DEFAULT_PARAMS, gear),
            1,
        )
    )
    rows.append(
        measure(
            "pure Python (pyfastcdc fallback)",
            len(python_input),
            lambda: list(pure_fastcdc.cut_buf(python_input)),
            1,
        )
    )
    return rows


def summarize(rows: list[Row]) -> dict[str, Any]:
    """Return the chunker/BLAKE3 ratios and the two-thread speedups (median and best)."""
    by_name = {row.name: row for row in rows}
    chunker = by_name["pyfastcdc keyed, 1 thread"]
    hasher = by_name["BLAKE3, 1 thread"]
    two_threads = by_name["pyfastcdc keyed, 2 threads"]
    numpy_row = by_name["numpy prototype, 1 thread"]
    return {
        "chunker_to_blake3_throughput": chunker.throughput_mb_s / hasher.throughput_mb_s,
        "chunker_to_blake3_cpu_per_byte": (chunker.cpu_seconds / chunker.input_size)
        / (hasher.cpu_seconds / hasher.input_size),
        "two_thread_speedup": two_threads.throughput_mb_s / chunker.throughput_mb_s,
        "two_thread_speedup_best": two_threads.best_throughput_mb_s / chunker.best_throughput_mb_s,
        "pyfastcdc_to_numpy_throughput": chunker.throughput_mb_s / numpy_row.throughput_mb_s,
    }


def format_table(rows: list[Row], summary: dict[str, Any], machine: dict[str, Any]) -> str:
    """Return the rows and the summary as a Markdown table with a caption."""
    blake3_mb_s = next(row.throughput_mb_s for row in rows if row.name == "BLAKE3, 1 thread")
    lines = [
        f"{machine['cpu_model']}, nproc {machine['nproc']}, {machine['date_utc']}, "
        f"pyfastcdc {machine['pyfastcdc']} (compiled: {machine['pyfastcdc_compiled']}), "
        f"blake3 {machine['blake3']}, numpy {machine['numpy']}, Python {machine['python']}",
        "",
        "| implementation | input | MB/s | best MB/s | wall s | CPU s | MB/s vs BLAKE3 | note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.name} | {row.input_size // MiB} MiB | {row.throughput_mb_s:,.1f} "
            f"| {row.best_throughput_mb_s:,.1f} | {row.wall_seconds:.3f} | {row.cpu_seconds:.3f} "
            f"| {row.throughput_mb_s / blake3_mb_s:.3f} | {row.note} |"
        )
    lines.append("")
    lines.append(
        "chunker/BLAKE3 throughput {chunker_to_blake3_throughput:.2f}, CPU per byte "
        "{chunker_to_blake3_cpu_per_byte:.2f}; two-thread speedup {two_thread_speedup:.2f} "
        "(best {two_thread_speedup_best:.2f}); "
        "pyfastcdc/numpy {pyfastcdc_to_numpy_throughput:.0f}x".format(**summary)
    )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="weights to chunk, in MiB")
    parser.add_argument("--json", type=Path, help="write the rows and machine facts here")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median counts")
    parser.add_argument(
        "--numpy-mib", type=int, default=64, help="input of the numpy prototype, in MiB"
    )
    parser.add_argument(
        "--python-mib", type=int, default=4, help="input of the pure-Python rows, in MiB"
    )
    args = parser.parse_args(argv)
    for name in ("size_mib", "repeat", "numpy_mib", "python_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.numpy_mib = min(args.numpy_mib, args.size_mib)
    args.python_mib = min(args.python_mib, args.numpy_mib)
    return args


def main(argv: list[str]) -> int:
    """Run the benchmark, print the table and write the JSON file if asked."""
    args = parse_args(argv)
    machine = machine_info()
    rows, summary = run_all(args)
    print(format_table(rows, summary, machine))
    if args.json is not None:
        document = {
            "command": " ".join(["python", "benchmarks/chunker_table.py", *argv]),
            "machine": machine,
            "params": asdict(DEFAULT_PARAMS),
            "rows": [asdict(row) for row in rows],
            "summary": summary,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
