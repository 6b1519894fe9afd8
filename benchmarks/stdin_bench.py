"""Time `cas snapshot --stdin` against `cas snapshot` of the same bytes as a file.

Run: python -m benchmarks.stdin_bench --size-mib 1024

The script writes one file of float32 normal(0, 0.02) values, like trained weights, and
reads it once so that it sits in the page cache. Then, each into a fresh repository, it
runs the CLI as a subprocess three ways: ``cas snapshot DIR`` (the file path, with the
background reader thread), ``cas snapshot --stdin`` with the file as standard input, and
``cat FILE | cas snapshot --stdin`` through a pipe. A stream is read on the caller
thread, so the ratio to the file path shows what the missing read-ahead costs. Each
figure is wall-clock and CPU seconds (user + system of the child processes), and MB/s
is 10^6 bytes per second of wall-clock time.

Everything lives in a temporary folder (``--work-dir``) that is deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from cas.crypto import KdfParams
from cas.repository import Repository

MiB = 1 << 20
PASSWORD = "benchmark password"


def write_weights(path: Path, size: int) -> None:
    """Write ``size`` bytes of float32 normal(0, 0.02) values in 64 MiB pieces."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as file:
        left = size
        while left:
            count = min(left, 64 * MiB) // 4
            file.write(rng.normal(0, 0.02, count).astype(np.float32).tobytes())
            left -= count * 4


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: str, env: dict[str, str]) -> tuple[float, float]:
    """Run a shell command; return (wall-clock seconds, CPU seconds of its processes)."""
    cpu_before = children_cpu()
    started = time.perf_counter()
    subprocess.run(command, shell=True, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, children_cpu() - cpu_before


def run(size_mib: int, work: Path) -> dict[str, object]:
    source = work / "src"
    source.mkdir()
    data = source / "model.bin"
    write_weights(data, size_mib * MiB)
    data.read_bytes()

    cas = f"{sys.executable} -m cas_cli.main"
    cases = {
        "snapshot FILE (baseline)": f"{cas} snapshot {source} --quiet",
        "snapshot --stdin < FILE": f"{cas} snapshot --stdin --stdin-name m.bin --quiet < {data}",
        "cat FILE | snapshot --stdin": (
            f"cat {data} | {cas} snapshot --stdin --stdin-name m.bin --quiet"
        ),
    }

    results = []
    for number, (name, command) in enumerate(cases.items()):
        repo = work / f"repo-{number}"
        kdf = KdfParams(salt=os.urandom(16), iterations=1, lanes=1, memory_kib=64)
        Repository.init(str(repo), PASSWORD.encode(), cache_dir=work / "cache", kdf=kdf).close()
        env = {**os.environ, "CAS_REPOSITORY": str(repo), "CAS_PASSWORD": PASSWORD}
        env["XDG_CACHE_HOME"] = str(work / "xdg")
        wall, cpu = timed(command, env)
        results.append({"case": name, "seconds": wall, "cpu_seconds": cpu})

    baseline = results[0]["seconds"]
    for result in results:
        result["mb_per_s"] = size_mib * MiB / 1e6 / float(result["seconds"])
        result["time_ratio"] = float(result["seconds"]) / float(baseline)
    return {
        "size_bytes": size_mib * MiB,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.now(UTC).isoformat(),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="file size in MiB")
    parser.add_argument("--work-dir", default=None, help="folder for the data and repositories")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cas-stdin-bench-", dir=args.work_dir))
    try:
        report = run(args.size_mib, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.size_mib} MiB of float32 weights, {report['machine']}; MB/s = 10^6 B/s")
    print("| case | wall s | CPU s | MB/s | time / baseline |")
    print("| --- | --- | --- | --- | --- |")
    for result in report["results"]:  # type: ignore[attr-defined]
        print(
            f"| {result['case']} | {result['seconds']:.2f} | {result['cpu_seconds']:.2f} "
            f"| {result['mb_per_s']:.0f} | {result['time_ratio']:.2f} |"
        )
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
