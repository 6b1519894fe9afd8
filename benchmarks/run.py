"""Time cas against borg, restic and a plain copy on the benchmark corpus, in one run.

``python -m benchmarks.run --size-gib 2 [--peers] [--install-peers] [--json OUT]``

Steps per data set (fp32 and bf16 checkpoints, the small files, the real MiniLM model):

    first      first snapshot of the folder into an empty repository
    finetune   snapshot after the fine-tune changed about 20 % of the tensor bytes
    insert     snapshot after one tensor was inserted at the start of the data area
    unchanged  snapshot of the same folder again, untouched
    checkout   restore of the first snapshot into a new folder

The small files get first, unchanged and checkout; MiniLM gets first and checkout. The
baseline ``cp -r`` copies the folder (its row under "first") and then copies that copy (its
row under "checkout"). Steps are interleaved tool by tool, so each step of each tool runs
within seconds of the same step of the others, on the same files.

Each timed region is the command followed by ``sync``, so the written data is on disk when
the clock stops. Before it, the input (the folder, or the repository for a checkout) is read
once, so it comes from the page cache, and an untimed ``sync`` and a wait for an idle disk
keep earlier writes and deletions out of the region. CPU seconds
are user + sys of the command and of ``sync`` from ``os.wait4``, peak RSS is the command's
ru_maxrss, and bytes added is the growth of the repository folder (``du -sb``). MB/s is
10^6 bytes of the data set's folder per wall-clock second.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import corpus

MiB = 1 << 20
GiB = 1 << 30
PASSWORD = "benchmark password, not secret"

# Targets that the run checks for cas.
UNCHANGED_LIMIT_S = 1.0
UNCHANGED_TARGET_GIB = 4
FINETUNE_FACTOR = 1.1
INSERT_FACTOR = 2
MAX_CHUNK_SIZE = 4 * MiB
"""Largest chunk of cas's default chunker parameters (cas.chunker.DEFAULT_PARAMS)."""
RSS_LIMIT = 300 * MiB

SETTLE_TIMEOUT_S = 30.0
"""Maximum wait for an idle disk before a timed command."""

CHECKPOINT_STEPS = (("first", "base"), ("finetune", "finetune"), ("insert", "insert"))
SNAPSHOT_STEPS = ("first", "finetune", "insert", "unchanged")
ALL_DATASETS = ("fp32", "bf16", "small", "minilm")


# Measuring one command


@dataclass(frozen=True)
class Measurement:
    """Wall-clock time, CPU time and peak memory of one command and the ``sync`` after it."""

    wall_s: float
    user_s: float
    sys_s: float
    sync_s: float
    peak_rss: int
    exit_code: int


# The timed region runs in a small separate Python process, because Linux counts the RSS that
# a child inherits at fork (the parent's whole image, for a fork from this process) in the
# ru_maxrss of the program it then executes. Launched from ``python -S``, every command's
# peak RSS includes a floor of about 9 MiB (measured on CPython 3.11).
_LAUNCHER = """
import json, os, sys, time
result_path, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
sync_started = time.perf_counter()
_, sync_status, sync_usage = os.wait4(os.posix_spawnp("sync", ["sync"], os.environ), 0)
ended = time.perf_counter()
result = {
    "wall_s": ended - started,
    "user_s": usage.ru_utime + sync_usage.ru_utime,
    "sys_s": usage.ru_stime + sync_usage.ru_stime,
    "sync_s": ended - sync_started,
    "peak_rss": usage.ru_maxrss * 1024,
    "exit_code": os.waitstatus_to_exitcode(status),
    "sync_exit_code": os.waitstatus_to_exitcode(sync_status),
}
with open(result_path, "w") as out:
    json.dump(result, out)
"""


def run_measured(
    argv: list[str], env: dict[str, str], cwd: Path | None, log_stem: Path
) -> Measurement:
    """Run ``argv`` and then ``sync`` and time both, with output in ``log_stem``.out and .err.

    Wall-clock time runs from the start of the command to the end of ``sync``. CPU time and
    peak RSS come from os.wait4 of each process (ru_maxrss is in KiB on Linux).
    """
    result_path = Path(f"{log_stem}.json")
    launcher = [sys.executable, "-S", "-c", _LAUNCHER, str(result_path), *argv]
    with open(f"{log_stem}.out", "wb") as out, open(f"{log_stem}.err", "wb") as err:
        launched = subprocess.run(launcher, cwd=cwd, env=env, stdout=out, stderr=err, check=False)
    if launched.returncode != 0 or not result_path.is_file():
        message = Path(f"{log_stem}.err").read_text(errors="replace").strip()
        raise RuntimeError(f"could not run {argv[0]}: {message}")
    result = json.loads(result_path.read_text())
    if result.pop("sync_exit_code") != 0:
        raise RuntimeError("sync failed after " + " ".join(argv))
    return Measurement(**result)


def folder_size(path: Path) -> int:
    """Return ``du -sb`` of ``path`` in bytes, or 0 when it does not exist."""
    if not path.exists():
        return 0
    output = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(output.stdout.split()[0])


def read_folder(path: Path) -> int:
    """Read every regular file under ``path`` into the page cache and return the bytes read."""
    total = 0
    buffer = bytearray(16 * MiB)
    for root, _dirs, files in os.walk(path):
        for name in files:
            file_path = os.path.join(root, name)
            if os.path.islink(file_path):
                continue
            with open(file_path, "rb", buffering=0) as handle:
                while count := handle.readinto(buffer):
                    total += count
    return total


def block_stat_path(path: Path) -> Path | None:
    """Return the /sys stat file of the block device that contains ``path``, if there is one."""
    device = mount_of(path)["device"]
    if not device.startswith("/dev/"):
        return None
    stat_path = Path("/sys/class/block") / Path(os.path.realpath(device)).name / "stat"
    return stat_path if stat_path.is_file() else None


def settle_disk(stat_path: Path | None) -> None:
    """Run ``sync``, then wait until the disk has had no I/O for half a second.

    A timed region must not pay for earlier writes. Nor must it pay for the discards that a
    file system mounted with ``-o discard`` sends after the benchmark deletes a repository or
    a restored folder, which stalled the next fsync for seconds on ext4.
    """
    subprocess.run(["sync"], check=True)
    if stat_path is None:
        return
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    previous_ticks = -1
    quiet_samples = 0
    while quiet_samples < 2:
        if time.monotonic() > deadline:
            print(f"disk still busy after {SETTLE_TIMEOUT_S:.0f} s, timing anyway", file=sys.stderr)
            return
        fields = stat_path.read_text().split()
        # Fields 9 and 10 (Documentation/block/stat.rst): I/Os in flight, ms spent doing I/O.
        in_flight, io_ticks = int(fields[8]), int(fields[9])
        quiet_samples = quiet_samples + 1 if in_flight == 0 and io_ticks == previous_ticks else 0
        previous_ticks = io_ticks
        time.sleep(0.25)


# The tools


class Tool:
    """How to init, snapshot and restore with one program; subclasses fill in the commands."""

    name = ""
    steps: tuple[str, ...] = (*SNAPSHOT_STEPS, "checkout")

    def __init__(self, bench_dir: Path) -> None:
        self.bench_dir = bench_dir

    def env(self) -> dict[str, str]:
        """Return the environment of every command of this tool."""
        return dict(os.environ)

    def init_argv(self, repo: Path, dataset: str) -> list[str]:
        """Return the command that creates an empty repository at ``repo``."""
        raise NotImplementedError

    def snapshot_argv(self, repo: Path, dataset: str, folder: Path, label: str) -> list[str]:
        """Return the command that snapshots ``folder`` into ``repo``."""
        raise NotImplementedError

    def snapshot_ref(self, stdout: str, label: str) -> str:
        """Return the name by which a later checkout finds the snapshot just taken."""
        return label

    def checkout_argv(self, repo: Path, dataset: str, ref: str, dest: Path) -> list[str]:
        """Return the command that restores snapshot ``ref`` into ``dest`` (run in ``dest``)."""
        raise NotImplementedError

    def restored_root(self, dest: Path, folder: Path) -> Path:
        """Return where, under ``dest``, the restored copy of ``folder`` lies."""
        return dest / folder.relative_to(folder.anchor)

    def version(self) -> str:
        """Return the tool's version line."""
        raise NotImplementedError


class CasTool(Tool):
    """cas, with its index cache in the bench folder and the password in CAS_PASSWORD."""

    name = "cas"

    def __init__(self, bench_dir: Path, binary: str) -> None:
        super().__init__(bench_dir)
        self.binary = binary

    def env(self) -> dict[str, str]:
        """Return the environment with CAS_PASSWORD set."""
        return {**os.environ, "CAS_PASSWORD": PASSWORD}

    def _base(self, repo: Path, dataset: str) -> list[str]:
        cache = self.bench_dir / "cache" / f"cas-{dataset}"
        return [self.binary, "-r", str(repo), "--cache-dir", str(cache), "--json", "--quiet"]

    def init_argv(self, repo: Path, dataset: str) -> list[str]:
        """Return ``cas init``."""
        return [*self._base(repo, dataset), "init"]

    def snapshot_argv(self, repo: Path, dataset: str, folder: Path, label: str) -> list[str]:
        """Return ``cas snapshot FOLDER``, whose parent is the latest snapshot of the folder."""
        return [*self._base(repo, dataset), "snapshot", str(folder), "--tag", label]

    def snapshot_ref(self, stdout: str, label: str) -> str:
        """Return the snapshot id from the JSON output."""
        return str(json.loads(stdout)["id"])

    def checkout_argv(self, repo: Path, dataset: str, ref: str, dest: Path) -> list[str]:
        """Return ``cas checkout REF DEST``."""
        return [*self._base(repo, dataset), "checkout", ref, str(dest)]

    def restored_root(self, dest: Path, folder: Path) -> Path:
        """Return ``dest``: a snapshot of one folder has that folder's contents as its root."""
        return dest

    def version(self) -> str:
        """Return ``cas --version``."""
        return command_output([self.binary, "--version"])


class BorgTool(Tool):
    """borg 1.2 with ``init -e repokey`` and its defaults (lz4 compression, buzhash chunker)."""

    name = "borg"

    def env(self) -> dict[str, str]:
        """Return the environment with the passphrase and borg's cache, keys and config here."""
        return {
            **os.environ,
            "BORG_PASSPHRASE": PASSWORD,
            "BORG_BASE_DIR": str(self.bench_dir / "cache" / "borg-home"),
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes",
        }

    def init_argv(self, repo: Path, dataset: str) -> list[str]:
        """Return ``borg init -e repokey``."""
        return ["borg", "init", "-e", "repokey", str(repo)]

    def snapshot_argv(self, repo: Path, dataset: str, folder: Path, label: str) -> list[str]:
        """Return ``borg create REPO::LABEL FOLDER``."""
        return ["borg", "create", f"{repo}::{label}", str(folder)]

    def checkout_argv(self, repo: Path, dataset: str, ref: str, dest: Path) -> list[str]:
        """Return ``borg extract REPO::REF``, which writes into the working folder."""
        return ["borg", "extract", f"{repo}::{ref}"]

    def version(self) -> str:
        """Return ``borg --version``."""
        return command_output(["borg", "--version"])


class ResticTool(Tool):
    """restic 0.14 with its defaults (repository format 2, compression auto)."""

    name = "restic"

    def env(self) -> dict[str, str]:
        """Return the environment with RESTIC_PASSWORD set."""
        return {**os.environ, "RESTIC_PASSWORD": PASSWORD}

    def _base(self, repo: Path, dataset: str) -> list[str]:
        cache = self.bench_dir / "cache" / f"restic-{dataset}"
        return ["restic", "-r", str(repo), "--cache-dir", str(cache)]

    def init_argv(self, repo: Path, dataset: str) -> list[str]:
        """Return ``restic init``."""
        return [*self._base(repo, dataset), "init"]

    def snapshot_argv(self, repo: Path, dataset: str, folder: Path, label: str) -> list[str]:
        """Return ``restic backup FOLDER``, whose parent is the latest snapshot of the folder."""
        return [*self._base(repo, dataset), "--json", "-q", "backup", str(folder), "--tag", label]

    def snapshot_ref(self, stdout: str, label: str) -> str:
        """Return the snapshot id from the JSON summary line."""
        for line in stdout.splitlines():
            if line.startswith("{"):
                message = json.loads(line)
                if message.get("message_type") == "summary":
                    return str(message["snapshot_id"])
        raise RuntimeError("restic backup printed no JSON summary")

    def checkout_argv(self, repo: Path, dataset: str, ref: str, dest: Path) -> list[str]:
        """Return ``restic restore REF --target DEST``."""
        return [*self._base(repo, dataset), "restore", ref, "--target", str(dest)]

    def version(self) -> str:
        """Return ``restic version``."""
        return command_output(["restic", "version"])


def command_output(argv: list[str]) -> str:
    """Return the first line that ``argv`` prints, or the error when it cannot run."""
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as error:
        return f"not runnable: {error}"
    return (result.stdout or result.stderr).strip().splitlines()[0]


def find_cas() -> str:
    """Return the cas script next to this interpreter, else the one on PATH."""
    beside = Path(sys.executable).with_name("cas")
    if beside.is_file():
        return str(beside)
    found = shutil.which("cas")
    if found is None:
        raise SystemExit("cas not found next to the interpreter nor on PATH; give --cas PATH")
    return found


def install_peers() -> None:
    """Install borg and restic from the distribution with apt-get (needs root)."""
    if os.geteuid() != 0:
        raise SystemExit("--install-peers runs apt-get and must run as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "borgbackup", "restic"], check=True, env=env)


# Data sets and results


@dataclass(frozen=True)
class Dataset:
    """A sequence of folders to snapshot. ``steps`` pairs each step with the variant it reads."""

    name: str
    variants: dict[str, Path]
    steps: tuple[tuple[str, str | None], ...]
    data_bytes: int


@dataclass
class StepResult:
    """One tool's measurement of one step. ``bytes_added`` is None for a checkout."""

    dataset: str
    step: str
    tool: str
    data_bytes: int
    wall_s: float
    cpu_s: float
    user_s: float
    sys_s: float
    sync_s: float
    peak_rss: int
    bytes_added: int | None
    exit_code: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        """Throughput in MB/s (10^6 bytes per second) of the data set's folder."""
        return self.data_bytes / 1e6 / self.wall_s if self.wall_s > 0 else 0.0


def build_datasets(corpus_dir: Path, manifest: dict[str, Any], names: list[str]) -> list[Dataset]:
    """Return the requested data sets that the corpus contains, in the requested order."""
    datasets = []
    for name in names:
        if name in manifest["checkpoints"]:
            variants = manifest["checkpoints"][name]["variants"]
            folders = {key: corpus_dir / value["path"] for key, value in variants.items()}
            steps: tuple[tuple[str, str | None], ...] = (*CHECKPOINT_STEPS, ("unchanged", None))
            datasets.append(Dataset(name, folders, steps, variants["base"]["bytes"]))
        elif name == "small":
            small = manifest["small"]
            steps = (("first", "base"), ("unchanged", None))
            folders = {"base": corpus_dir / small["path"]}
            datasets.append(Dataset(name, folders, steps, small["bytes"]))
        elif name == "minilm" and "skipped" not in manifest["minilm"]:
            minilm = manifest["minilm"]
            folders = {"base": corpus_dir / minilm["path"]}
            datasets.append(Dataset(name, folders, (("first", "base"),), minilm["bytes"]))
        elif name == "minilm":
            print(f"minilm skipped: {manifest['minilm']['skipped']}", file=sys.stderr)
    return datasets


def link_variant(source: Path, work: Path) -> None:
    """Make ``work`` a fresh folder of hard links to the files of ``source``.

    New links give every file a new inode, so every tool reads every file again, as after a
    trainer wrote a new checkpoint, and the corpus files stay untouched.
    """
    if work.exists():
        shutil.rmtree(work)
    for root, _dirs, files in os.walk(source):
        target = work / Path(root).relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            os.link(Path(root) / name, target / name)


def same_tree(expected: Path, restored: Path) -> str:
    """Compare two folders byte for byte and return "" when equal, else the first difference."""
    for root, _dirs, files in os.walk(expected):
        relative = Path(root).relative_to(expected)
        for name in files:
            other = restored / relative / name
            if not other.is_file():
                return f"{relative / name} missing"
            if not filecmp.cmp(Path(root) / name, other, shallow=False):
                return f"{relative / name} differs"
    expected_count = sum(len(files) for _, _, files in os.walk(expected))
    restored_count = sum(len(files) for _, _, files in os.walk(restored))
    if expected_count != restored_count:
        return f"{restored_count} files restored, {expected_count} expected"
    return ""


# Running the steps


class Bench:
    """Runs every step of every tool on each data set and collects the results.

    Per data set, each tool gets a new repository under ``workdir/repos``, and the folder it
    snapshots is ``workdir/work/DATASET``, the same path for every step, so that the tools
    find their parent snapshot or files cache by path.
    """

    def __init__(self, workdir: Path, tools: list[Tool], verify: bool, keep: bool) -> None:
        self.workdir = workdir
        self.tools = tools
        self.verify = verify
        self.keep = keep
        self.results: list[StepResult] = []
        self.log_dir = workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stat_path = block_stat_path(workdir)
        self._log_count = 0

    def run_dataset(self, dataset: Dataset) -> None:
        """Run all steps of ``dataset`` for every tool and the copy baseline."""
        work = self.workdir / "work" / dataset.name
        copy = self.workdir / "copy" / dataset.name
        repos = {tool.name: self._repo(tool, dataset) for tool in self.tools}
        self._remove(*repos.values(), copy, *self._caches(dataset))
        link_variant(dataset.variants["base"], work)
        for tool in self.tools:
            self._init(tool, repos[tool.name], dataset.name)

        refs: dict[str, str] = {}
        for step, variant in dataset.steps:
            if variant is not None and step != "first":
                link_variant(dataset.variants[variant], work)
            for tool in self.tools:
                ref = self._snapshot(tool, dataset, step, repos[tool.name], work)
                if step == "first" and ref is not None:
                    refs[tool.name] = ref
            if step == "first":
                self._copy(dataset, "first", work, copy)

        for tool in self.tools:
            if tool.name in refs:
                self._checkout(tool, dataset, repos[tool.name], refs[tool.name], work)
        self._copy(dataset, "checkout", copy, self.workdir / "restore" / f"copy-{dataset.name}")
        if not self.keep:
            self._remove(*repos.values(), copy, work, *self._caches(dataset))

    def _repo(self, tool: Tool, dataset: Dataset) -> Path:
        return self.workdir / "repos" / f"{tool.name}-{dataset.name}"

    def _caches(self, dataset: Dataset) -> list[Path]:
        cache = self.workdir / "cache"
        return [
            cache / f"cas-{dataset.name}",
            cache / f"restic-{dataset.name}",
            cache / "borg-home",
        ]

    @staticmethod
    def _remove(*paths: Path) -> None:
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)

    def _log_stem(self, dataset: str, step: str, tool: str) -> Path:
        self._log_count += 1
        return self.log_dir / f"{self._log_count:03d}-{dataset}-{step}-{tool}"

    def _init(self, tool: Tool, repo: Path, dataset: str) -> None:
        repo.parent.mkdir(parents=True, exist_ok=True)
        argv = tool.init_argv(repo, dataset)
        result = subprocess.run(argv, env=tool.env(), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.strip()}")

    def _snapshot(
        self, tool: Tool, dataset: Dataset, step: str, repo: Path, work: Path
    ) -> str | None:
        """Time one snapshot and return the new snapshot's reference, or None when it failed."""
        label = f"{dataset.name}-{step}"
        read_folder(work)
        settle_disk(self.stat_path)
        before = folder_size(repo)
        stem = self._log_stem(dataset.name, step, tool.name)
        argv = tool.snapshot_argv(repo, dataset.name, work, label)
        measurement = run_measured(argv, tool.env(), None, stem)
        added = folder_size(repo) - before
        stdout = Path(f"{stem}.out").read_text()
        note = exit_note(measurement.exit_code, stem)
        extra: dict[str, Any] = {}
        if tool.name == "cas" and measurement.exit_code in (0, 1):
            report = json.loads(stdout)
            keys = ("bytes_read", "bytes_added", "new_chunks", "unchanged_files", "seconds")
            extra = {f"cas_{key}": report[key] for key in keys}
        self._record(dataset, step, tool.name, measurement, added, note, extra)
        if measurement.exit_code not in (0, 1):
            return None
        return tool.snapshot_ref(stdout, label)

    def _checkout(self, tool: Tool, dataset: Dataset, repo: Path, ref: str, work: Path) -> None:
        dest = self.workdir / "restore" / f"{tool.name}-{dataset.name}"
        self._remove(dest)
        dest.mkdir(parents=True)
        read_folder(repo)
        settle_disk(self.stat_path)
        stem = self._log_stem(dataset.name, "checkout", tool.name)
        argv = tool.checkout_argv(repo, dataset.name, ref, dest)
        measurement = run_measured(argv, tool.env(), dest, stem)
        note = exit_note(measurement.exit_code, stem)
        if self.verify and not note:
            note = same_tree(dataset.variants["base"], tool.restored_root(dest, work))
        self._record(dataset, "checkout", tool.name, measurement, None, note, {})
        self._remove(dest)

    def _copy(self, dataset: Dataset, step: str, source: Path, dest: Path) -> None:
        """Time ``cp -r`` of ``source`` to the new folder ``dest``, kept only after step "first"."""
        self._remove(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        read_folder(source)
        settle_disk(self.stat_path)
        stem = self._log_stem(dataset.name, step, "copy")
        measurement = run_measured(
            ["cp", "-r", str(source), str(dest)], dict(os.environ), None, stem
        )
        note = exit_note(measurement.exit_code, stem)
        added = folder_size(dest) if step == "first" else None
        if step == "checkout":
            if self.verify and not note:
                note = same_tree(dataset.variants["base"], dest)
            self._remove(dest)
        self._record(dataset, step, "copy", measurement, added, note, {})

    def _record(
        self,
        dataset: Dataset,
        step: str,
        tool: str,
        measurement: Measurement,
        added: int | None,
        note: str,
        extra: dict[str, Any],
    ) -> None:
        result = StepResult(
            dataset=dataset.name,
            step=step,
            tool=tool,
            data_bytes=dataset.data_bytes,
            wall_s=measurement.wall_s,
            cpu_s=measurement.user_s + measurement.sys_s,
            user_s=measurement.user_s,
            sys_s=measurement.sys_s,
            sync_s=measurement.sync_s,
            peak_rss=measurement.peak_rss,
            bytes_added=added,
            exit_code=measurement.exit_code,
            note=note,
            extra=extra,
        )
        self.results.append(result)
        print(
            f"{dataset.name:6} {step:9} {tool:6} {result.mb_per_s:8.1f} MB/s "
            f"{result.wall_s:7.2f} s wall {result.cpu_s:7.2f} s CPU {note}",
            file=sys.stderr,
            flush=True,
        )


def exit_note(exit_code: int, stem: Path) -> str:
    """Return "" for exit code 0, else the code and the last line the command wrote to stderr."""
    if exit_code == 0:
        return ""
    lines = Path(f"{stem}.err").read_text(errors="replace").strip().splitlines()
    last = lines[-1] if lines else "no output"
    return f"exit {exit_code}: {last}"


# Ratios, targets and the report


def ratios(results: list[StepResult]) -> list[dict[str, Any]]:
    """Compare each cas row with the other tools' rows of the same step: cas value ÷ theirs.

    A speed ratio above 1 means cas is faster, a CPU or bytes-added ratio below 1 means cas
    spends or stores less.
    """
    rows = []
    cas_rows = {(row.dataset, row.step): row for row in results if row.tool == "cas"}
    for row in results:
        cas = cas_rows.get((row.dataset, row.step))
        if cas is None or row.tool == "cas":
            continue
        entry: dict[str, Any] = {"dataset": row.dataset, "step": row.step, "versus": row.tool}
        entry["speed"] = divide(cas.mb_per_s, row.mb_per_s)
        entry["cpu"] = divide(cas.cpu_s, row.cpu_s)
        if cas.bytes_added is not None and row.bytes_added:
            entry["bytes_added"] = divide(cas.bytes_added, row.bytes_added)
        rows.append(entry)
    return rows


def divide(numerator: float, denominator: float) -> float | None:
    """Return the rounded quotient, or None when the denominator is 0."""
    return round(numerator / denominator, 3) if denominator else None


@dataclass(frozen=True)
class TargetCheck:
    """One target of cas, measured in this run."""

    target: str
    scope: str
    measured: float
    limit: float
    unit: str

    @property
    def passed(self) -> bool:
        """Whether the measured value is within the limit."""
        return self.measured <= self.limit


def check_targets(results: list[StepResult], manifest: dict[str, Any]) -> list[TargetCheck]:
    """Check the unchanged re-snapshot, fine-tune, insertion and memory targets of cas."""
    checks = []
    cas = {(row.dataset, row.step): row for row in results if row.tool == "cas"}
    for dtype, checkpoint in manifest["checkpoints"].items():
        variants = checkpoint["variants"]
        size_gib = variants["base"]["bytes"] / GiB
        unchanged = cas.get((dtype, "unchanged"))
        if unchanged is not None:
            scope = (
                f"{dtype}, {size_gib:.2f} GiB folder (target set for {UNCHANGED_TARGET_GIB} GiB)"
            )
            target = "unchanged re-snapshot under 1 s"
            checks.append(TargetCheck(target, scope, unchanged.wall_s, UNCHANGED_LIMIT_S, "s"))
        finetune = cas.get((dtype, "finetune"))
        if finetune is not None and finetune.bytes_added is not None:
            changed = variants["finetune"]["changed_tensor_bytes"]
            target = f"fine-tune adds at most {FINETUNE_FACTOR} x the changed tensor bytes"
            scope = f"{dtype}, {changed / MiB:.1f} MiB changed"
            limit = FINETUNE_FACTOR * changed / MiB
            checks.append(TargetCheck(target, scope, finetune.bytes_added / MiB, limit, "MiB"))
        insert = cas.get((dtype, "insert"))
        if insert is not None and insert.bytes_added is not None:
            inserted = variants["insert"]["inserted_tensor_bytes"]
            target = f"insertion adds at most {INSERT_FACTOR} x tensor + one max chunk (4 MiB)"
            scope = f"{dtype}, {inserted / MiB:.1f} MiB tensor"
            limit = (INSERT_FACTOR * inserted + MAX_CHUNK_SIZE) / MiB
            checks.append(TargetCheck(target, scope, insert.bytes_added / MiB, limit, "MiB"))
    cas_rows = [row for row in results if row.tool == "cas"]
    if cas_rows:
        peak = max(cas_rows, key=lambda row: row.peak_rss)
        fp32_gib = manifest["checkpoints"]["fp32"]["variants"]["base"]["bytes"] / GiB
        scope = (
            f"all cas steps, fp32 checkpoint {fp32_gib:.2f} GiB (max at {peak.dataset} {peak.step})"
        )
        checks.append(
            TargetCheck(
                "cas peak RSS under 300 MiB", scope, peak.peak_rss / MiB, RSS_LIMIT / MiB, "MiB"
            )
        )
    return checks


def format_table(results: list[StepResult]) -> str:
    """Return the results as a Markdown table with cas's speed ratio to each other tool."""
    others = [tool for tool in ("borg", "restic", "copy") if any(r.tool == tool for r in results)]
    header = ["data", "step", "tool", "MB/s", "wall s", "CPU s", "peak RSS MiB", "added MiB"]
    header += [f"cas/{tool}" for tool in others]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    speed = {(row.dataset, row.step, row.tool): row.mb_per_s for row in results}
    for row in results:
        added = "" if row.bytes_added is None else f"{row.bytes_added / MiB:.1f}"
        cells = [row.dataset, row.step, row.tool, f"{row.mb_per_s:.1f}", f"{row.wall_s:.2f}"]
        cells += [f"{row.cpu_s:.2f}", f"{row.peak_rss / MiB:.0f}", added]
        for tool in others:
            other = speed.get((row.dataset, row.step, tool))
            cell = f"{row.mb_per_s / other:.2f}" if row.tool == "cas" and other else ""
            cells.append(cell)
        if row.note:
            cells[2] += f" ({row.note})"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_targets(checks: list[TargetCheck]) -> str:
    """Return one PASS or FAIL line per target."""
    return "\n".join(
        f"{'PASS' if check.passed else 'FAIL'}  {check.target} [{check.scope}]: "
        f"{check.measured:.2f} {check.unit}, limit {check.limit:.2f} {check.unit}"
        for check in checks
    )


def machine_info(path: Path) -> dict[str, Any]:
    """Describe the machine: cores, CPU model, memory, kernel and the file system of ``path``."""
    cpu_model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(memory_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "filesystem": mount_of(path),
        "python": platform.python_version(),
    }


def mount_of(path: Path) -> dict[str, str]:
    """Return the mount point, device and file system type that contain ``path``."""
    real = os.path.realpath(path)
    best = {"mount_point": "/", "device": "", "type": ""}
    for line in Path("/proc/mounts").read_text().splitlines():
        device, mount_point, fs_type = line.split()[:3]
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best["mount_point"]):
            best = {"mount_point": mount_point, "device": device, "type": fs_type}
    return best


def corpus_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Return the manifest without its file lists."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: strip(item) for key, item in value.items() if key != "files"}
        return value

    return dict(strip(manifest))


# The command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--size-gib", type=float, default=2.0, help="fp32 checkpoint size in GiB (default 2)"
    )

    parser.add_argument("--peers", action="store_true", help="also time borg and restic")
    parser.add_argument(
        "--install-peers",
        action="store_true",
        help="first run apt-get update and apt-get install -y borgbackup restic (as root); "
        "implies --peers",
    )

    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/bench-cas"),
        help="folder for the corpus, repositories and logs (default /tmp/bench-cas)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        help="corpus folder, reused when its manifest matches (default WORKDIR/corpus)",
    )
    parser.add_argument(
        "--datasets",
        default=",".join(ALL_DATASETS),
        help=f"comma-separated data sets to run (default {','.join(ALL_DATASETS)})",
    )

    parser.add_argument("--seed", type=int, default=0, help="corpus generator seed (default 0)")
    parser.add_argument("--cas", help="cas executable (default: the one next to this Python)")
    parser.add_argument("--keep", action="store_true", help="keep repositories and copies")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip the byte-for-byte check of each checkout"
    )
    return parser.parse_args(argv)


def prepare_corpus(corpus_dir: Path, size_gib: float, seed: int) -> dict[str, Any]:
    """Return the corpus manifest, generating the corpus unless a matching one exists."""
    manifest = corpus.load_manifest(corpus_dir)
    expected = corpus.corpus_parameters(size_gib, seed)
    if manifest is not None and all(manifest.get(key) == value for key, value in expected.items()):
        print(f"reusing the corpus in {corpus_dir}", file=sys.stderr)
        return manifest
    print(f"generating a {size_gib} GiB corpus in {corpus_dir}", file=sys.stderr)
    return corpus.generate_corpus(corpus_dir, size_gib, seed)


def select_tools(args: argparse.Namespace, workdir: Path) -> list[Tool]:
    """Return cas and, when requested and installed, borg and restic."""
    tools: list[Tool] = [CasTool(workdir, args.cas or find_cas())]
    if not (args.peers or args.install_peers):
        return tools
    for tool_class, binary in ((BorgTool, "borg"), (ResticTool, "restic")):
        if shutil.which(binary):
            tools.append(tool_class(workdir))
        else:
            print(f"{binary} is not installed; run with --install-peers", file=sys.stderr)
    return tools


def check_run_space(workdir: Path, tools: list[Tool], datasets: Iterable[Dataset]) -> None:
    """Exit when the file system lacks room for the repositories, the copy and a checkout."""
    largest = max((dataset.data_bytes for dataset in datasets), default=0)
    # Estimate: each repository takes about 1.25 x the folder (fine-tune and insertion included).
    needed = int((1.25 * len(tools) + 2) * largest)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise SystemExit(
            f"the run needs about {needed / GiB:.1f} GiB free in {workdir}, "
            f"but {free / GiB:.1f} GiB are free; choose a smaller --size-gib"
        )


def source_version() -> dict[str, Any]:
    """Return the git commit of this checkout and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    commit = command_output(["git", "-C", str(root), "rev-parse", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {"commit": commit, "uncommitted_changes": bool(status.stdout.strip())}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and the targets, and write the JSON report."""
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    if args.install_peers:
        install_peers()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    corpus_dir = (args.corpus or workdir / "corpus").resolve()
    manifest = prepare_corpus(corpus_dir, args.size_gib, args.seed)
    tools = select_tools(args, workdir)
    datasets = build_datasets(corpus_dir, manifest, args.datasets.split(","))
    check_run_space(workdir, tools, datasets)
    versions = {tool.name: tool.version() for tool in tools}
    print("; ".join(versions.values()), file=sys.stderr)

    bench = Bench(workdir, tools, verify=not args.no_verify, keep=args.keep)
    for dataset in datasets:
        bench.run_dataset(dataset)

    checks = check_targets(bench.results, manifest)
    print("MB/s = 10^6 bytes per wall-clock second; cas/X = cas MB/s divided by X's MB/s")
    print(format_table(bench.results))
    print()
    print(format_targets(checks))
    if args.json:
        report = {
            "command": ["python", "-m", "benchmarks.run", *(argv or sys.argv[1:])],
            "date": started.isoformat(timespec="seconds"),
            "machine": machine_info(workdir),
            "versions": versions,
            "source": source_version(),
            "corpus": corpus_summary(manifest),
            "results": [
                {**dataclasses.asdict(row), "mb_per_s": round(row.mb_per_s, 2)}
                for row in bench.results
            ],
            "ratios": ratios(bench.results),
            "targets": [{**dataclasses.asdict(check), "passed": check.passed} for check in checks],
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
