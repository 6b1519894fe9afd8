"""Smoke runs of the benchmarks, so that they keep working between measurements.

The real runs are by hand (see docs/benchmarks.md); these use tiny inputs and
check only that every step ran and produced its figures, never the speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runner_tiny_corpus(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    command = [sys.executable, "-m", "benchmarks.run", "--size-gib", "0.01"]
    command += ["--datasets", "fp32", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    steps = {row["step"] for row in rows if row["tool"] == "cas"}
    assert steps == {"first", "finetune", "insert", "unchanged", "checkout"}
    assert all(row["exit_code"] == 0 for row in rows)
    assert all(row["cpu_s"] > 0 for row in rows if row["tool"] == "cas")


def test_inner_loop_benchmarks_run() -> None:
    files = ["benchmarks/bench_pipeline.py", "benchmarks/bench_chunker.py"]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "--benchmark-disable",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(command + files, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stdout[-2000:]
    assert " passed" in result.stdout


def test_rollback_benchmark_tiny() -> None:
    command = [sys.executable, "-m", "benchmarks.rollback_bench", "--size-gib", "0.01"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads(result.stdout[result.stdout.index("{") :])
    rows = {row["scenario"]: row for row in document["results"]}
    assert list(rows) == ["fresh", "unchanged-cold", "unchanged-warm", "one-shard", "touched"]
    assert rows["unchanged-warm"]["bytes_written"] == 0
    assert rows["one-shard"]["rewritten"] == 1
    assert rows["touched"]["rewritten"] == 4
