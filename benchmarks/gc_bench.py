"""Time `cas gc` on a repository of a few GiB: six checkpoints, a third of them pruned.

Run: python -m benchmarks.gc_bench --size-gib 2

The script builds a checkpoint folder of four shard files of random bytes, which barely
compress, like trained weights. It snapshots the folder six times and overwrites 20-40 % of
its bytes in 8 MiB regions between snapshots. Then it prunes the two oldest snapshots with
``keep-last 4`` and runs gc with the default repack threshold (10 %). ``--size-gib`` is the
approximate size of the repository before gc. The script prints gc's wall-clock and CPU
time, how long gc held the exclusive lock, and the repository size before and after. Last,
it checks that the newest snapshot restores byte for byte.

Everything lives in a temporary folder (``--work-dir`` to choose it) that is deleted at
the end unless ``--keep`` is given. Repository size is the sum of the file sizes below the
repository folder.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cas.archiver import Archiver, SnapshotOptions
from cas.crypto import KdfParams
from cas.gc import GarbageCollector, GcOptions
from cas.locks import RepositoryLock
from cas.prune import KeepPolicy, apply_policy
from cas.repository import Repository
from cas.restorer import CheckoutOptions, Restorer
from cas.snapshot import SNAPSHOT_PREFIX

MiB = 1 << 20
GiB = 1 << 30
SHARDS = 4
CHECKPOINTS = 6
REGION = 8 * MiB
PASSWORD = b"benchmark password"
# Each later checkpoint adds about 30 % new data on average, so a repository of S bytes
# contains checkpoints of S / (1 + 0.3 * 5) bytes.
GROWTH = 1 + 0.3 * (CHECKPOINTS - 1)


def folder_size(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def write_checkpoint(source: Path, shard_size: int, rng: np.random.Generator) -> None:
    source.mkdir(parents=True, exist_ok=True)
    for number in range(SHARDS):
        (source / f"model-{number:02d}.safetensors").write_bytes(rng.bytes(shard_size))


def overwrite_regions(source: Path, shard_size: int, rng: np.random.Generator) -> float:
    """Overwrite 20-40 % of the checkpoint in 8 MiB regions; return the share changed."""
    share = float(rng.uniform(0.2, 0.4))
    regions_per_shard = shard_size // REGION
    count = round(share * SHARDS * regions_per_shard)
    chosen = rng.choice(SHARDS * regions_per_shard, size=count, replace=False)
    for region in sorted(int(value) for value in chosen):
        shard, index = divmod(region, regions_per_shard)
        with open(source / f"model-{shard:02d}.safetensors", "r+b") as file:
            file.seek(index * REGION)
            file.write(rng.bytes(REGION))
    return count / (SHARDS * regions_per_shard)


def build(work: Path, size: int) -> tuple[list[str], list[float]]:
    """Create the repository with six snapshots; return their ids and the shares changed."""
    shard_size = max(REGION, int(size / GROWTH / SHARDS) // REGION * REGION)
    rng = np.random.default_rng(7)
    source = work / "ckpt"
    write_checkpoint(source, shard_size, rng)
    kdf = KdfParams(salt=os.urandom(16), iterations=1, lanes=1, memory_kib=64)
    ids, shares = [], []
    with Repository.init(str(work / "repo"), PASSWORD, cache_dir=work / "cache", kdf=kdf) as repo:
        for number in range(CHECKPOINTS):
            if number:
                shares.append(overwrite_regions(source, shard_size, rng))
            result = Archiver(repo, SnapshotOptions()).run([str(source)])
            ids.append(result.snapshot.snapshot_hex)
            print(f"snapshot {number + 1}: {result.bytes_added / MiB:.0f} MiB added")
    return ids, shares


def prune(repo: Repository) -> int:
    """Remove the snapshots that keep-last 4 does not keep; return how many."""
    with RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="prune"):
        groups = apply_policy(repo.list_snapshots(), KeepPolicy(last=CHECKPOINTS - 2))
        removed = [snap for group in groups for snap in group.removed]
        for snapshot in removed:
            repo.backend.delete(SNAPSHOT_PREFIX + snapshot.snapshot_hex)
    return len(removed)


def verify_newest(work: Path, repo: Repository, snapshot_hex: str) -> None:
    target = work / "restore"
    result = Restorer(repo, repo.load_snapshot(snapshot_hex), str(target), CheckoutOptions()).run()
    if result.failed:
        raise SystemExit(f"checkout after gc failed: {result.failed}")
    for shard in sorted((work / "ckpt").iterdir()):
        if not filecmp.cmp(shard, target / shard.name, shallow=False):
            raise SystemExit(f"{shard.name} differs after gc")
    shutil.rmtree(target)


def run(work: Path, size: int) -> dict[str, object]:
    """Build, prune, gc and verify; return the figures."""
    ids, shares = build(work, size)
    repo_path = work / "repo"
    with Repository.open(str(repo_path), PASSWORD, cache_dir=work / "cache") as repo:
        removed = prune(repo)
        size_before = folder_size(repo_path)
        wall, cpu = time.perf_counter(), time.process_time()
        result = GarbageCollector(repo, GcOptions()).run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        size_after = folder_size(repo_path)
        verify_newest(work, repo, ids[-1])
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "checkpoint_bytes": folder_size(work / "ckpt"),
        "shares_changed": [round(share, 3) for share in shares],
        "snapshots_removed": removed,
        "repository_bytes_before": size_before,
        "repository_bytes_after": size_after,
        "gc_wall_seconds": round(wall, 2),
        "gc_cpu_seconds": round(cpu, 2),
        "exclusive_seconds": round(result.exclusive_seconds, 3),
        "packs_deleted": result.packs_deleted,
        "packs_repacked": result.packs_repacked,
        "packs_written": result.packs_written,
        "bytes_repacked": result.bytes_repacked,
        "bytes_written": result.bytes_written,
    }


def main() -> None:
    """Parse the options, run the benchmark and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="repository size before gc")
    parser.add_argument("--work-dir", default=None, help="folder for the data (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cas-gc-bench-", dir=args.work_dir))
    try:
        figures = run(work, int(args.size_gib * GiB))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
