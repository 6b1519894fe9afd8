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


def test_codec_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    command = [sys.executable, "-m", "benchmarks.codec_bench", "--synthetic-mib", "1"]
    command += ["--repeat", "1", "--datasets", "fp32,bf16", "--snapshot-datasets", "bf16"]
    command += ["--codecs", "none,zstd-1", "--workdir", str(tmp_path), "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads(out.read_text())
    rows = {(row["dataset"], row["codec"], row["byte_group"]): row for row in document["codecs"]}
    assert len(rows) == 8
    assert rows[("bf16", "zstd-1", True)]["saved_percent"] > 0
    assert rows[("fp32", "none", False)]["saved_percent"] == 0
    snapshots = document["snapshots"]
    assert [row["byte_group"] for row in snapshots] == ["off", "off", "always:2"]
    assert all(row["snapshot_cpu_s"] > 0 for row in snapshots)


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


def test_model_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "model.json"
    command = [sys.executable, "-m", "benchmarks.model_bench", "--synthetic-mib", "2"]
    command += ["--no-minilm", "--scenarios", "changed", "inserted", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(row["scenario"], row["aligned"]) for row in rows} == {
        ("changed", True),
        ("changed", False),
        ("inserted", True),
        ("inserted", False),
    }
    assert all(row["bytes_added"] >= row["touched_bytes"] for row in rows)
    assert all(row["cpu_s"] > 0 for row in rows)
    assert "| synthetic-2mib | changed | on |" in result.stdout
