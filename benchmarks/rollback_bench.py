"""Time `cas checkout --overwrite` (rollback) against a checkout into an empty folder.

Run: python -m benchmarks.rollback_bench --size-gib 1

The script builds a checkpoint folder of four shard files of random bytes and snapshots
it once. Then it times, in one run, these checkouts of that snapshot:

- ``fresh``: into an empty folder, the baseline;
- ``unchanged-cold``: a rollback of a folder that already equals the snapshot, so every
  file is read to compare its digest and none is written. The fresh checkout wrote the
  shards with O_DIRECT, so they are not in the page cache and are read from the disk;
- ``unchanged-warm``: the same rollback again, now with the shards in the page cache;
- ``one-shard``: a rollback after one shard was overwritten at the same size, as a
  training step does, so one shard is written and three are read;
- ``touched``: a rollback after every shard got a new mtime only, so every shard is
  rewritten without being read, the worst case.

Each time runs until ``os.sync()`` returns. CPU seconds are this process's user plus
system time, all threads included. The script prints a table and a JSON document, each
row with its ratio to the ``fresh`` baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cas.archiver import Archiver, SnapshotOptions
from cas.crypto import KdfParams
from cas.repository import Repository
from cas.restorer import CheckoutOptions, CheckoutResult, Restorer
from cas.snapshot import Snapshot

MiB = 1 << 20
GiB = 1 << 30
SHARDS = 4
PASSWORD = b"benchmark password"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_checkout(
    repo: Repository, snapshot: Snapshot, target: Path, overwrite: bool
) -> tuple[CheckoutResult, float, float]:
    """Check out and sync; return the result, wall-clock seconds and CPU seconds."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    options = CheckoutOptions(overwrite=overwrite)
    result = Restorer(repo, snapshot, str(target), options).run()
    os.sync()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    if result.failed:
        raise SystemExit(f"checkout failed: {result.failed}")
    return result, wall, cpu


def prepare(scenario: str, target: Path, shard_size: int, rng: np.random.Generator) -> None:
    """Change the checked-out folder as the scenario describes."""
    shards = sorted(target.iterdir())
    if scenario == "one-shard":
        shards[0].write_bytes(rng.bytes(shard_size))
    elif scenario == "touched":
        for shard in shards:
            os.utime(shard)
    os.sync()


def run(work: Path, size: int) -> dict[str, object]:
    """Build the snapshot, time each scenario; return the figures."""
    shard_size = max(MiB, size // SHARDS // MiB * MiB)
    rng = np.random.default_rng(11)
    source = work / "ckpt"
    source.mkdir()
    for number in range(SHARDS):
        (source / f"model-{number:02d}.safetensors").write_bytes(rng.bytes(shard_size))
    kdf = KdfParams(salt=os.urandom(16), iterations=1, lanes=1, memory_kib=64)
    rows = []
    with Repository.init(str(work / "repo"), PASSWORD, cache_dir=work / "cache", kdf=kdf) as repo:
        snapshot = Archiver(repo, SnapshotOptions()).run([str(source)]).snapshot
        shutil.rmtree(source)
        target = work / "target"
        for scenario in ("fresh", "unchanged-cold", "unchanged-warm", "one-shard", "touched"):
            if scenario == "fresh":
                shutil.rmtree(target, ignore_errors=True)
            else:
                prepare(scenario, target, shard_size, rng)
            result, wall, cpu = timed_checkout(repo, snapshot, target, scenario != "fresh")
            rows.append(
                {
                    "scenario": scenario,
                    "wall_s": round(wall, 2),
                    "cpu_s": round(cpu, 2),
                    "unchanged": result.unchanged,
                    "rewritten": result.rewritten,
                    "bytes_written": result.bytes_written,
                }
            )
    for row in rows:
        row["wall_ratio"] = round(float(row["wall_s"]) / float(rows[0]["wall_s"]), 2)
        row["cpu_ratio"] = round(float(row["cpu_s"]) / float(rows[0]["cpu_s"]), 2)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "checkpoint_bytes": SHARDS * shard_size,
        "results": rows,
    }


def print_table(figures: dict[str, object]) -> None:
    print(f"checkpoint: {figures['checkpoint_bytes'] / MiB:.0f} MiB in {SHARDS} shards")
    print(
        f"{'scenario':<14} {'wall s':>7} {'cpu s':>6} {'wall/fresh':>10} {'cpu/fresh':>9} "
        f"{'kept':>5} {'rewritten':>9} {'MiB written':>11}"
    )
    results = figures["results"]
    assert isinstance(results, list)
    for row in results:
        print(
            f"{row['scenario']:<14} {row['wall_s']:>7.2f} {row['cpu_s']:>6.2f} "
            f"{row['wall_ratio']:>10.2f} {row['cpu_ratio']:>9.2f} {row['unchanged']:>5} "
            f"{row['rewritten']:>9} {row['bytes_written'] / MiB:>11.0f}"
        )


def main() -> None:
    """Parse the options, run the benchmark and print a table and the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size in GiB")
    parser.add_argument("--work-dir", default=None, help="folder for the data (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cas-rollback-bench-", dir=args.work_dir))
    try:
        figures = run(work, int(args.size_gib * GiB))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(figures)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
