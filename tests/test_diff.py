"""`cas diff` and `cas checkout --verify-models --test-command`, through the library and the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from conftest import CasEnv, RunCas
from model_files import random_tensors, write_safetensors, write_torch

from cas.archiver import Archiver, SnapshotOptions
from cas.diff import diff_snapshots
from cas.repository import Repository
from cas.snapshot import Snapshot

SHAPES = {"a.weight": (200, 64), "a.bias": (64,), "b.weight": (64, 300), "c.weight": (100, 100)}


def take(repo: Repository, folder: Path, align: bool = True) -> Snapshot:
    options = SnapshotOptions(threads=1, tensor_align=align)
    return Archiver(repo, options).run([str(folder)]).snapshot


def test_diff_files_and_modes(repo: Repository, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "same.txt").write_text("same")
    (source / "edit.txt").write_text("old")
    (source / "gone.txt").write_text("gone")
    (source / "mode.sh").write_text("echo")
    (source / "sub" / "kind").write_text("file")
    old = take(repo, source)
    (source / "edit.txt").write_text("new content")
    (source / "gone.txt").unlink()
    (source / "sub" / "new.txt").write_text("new")
    os.chmod(source / "mode.sh", 0o755)
    (source / "sub" / "kind").unlink()
    (source / "sub" / "kind").symlink_to("same.txt")
    new = take(repo, source)
    diff = diff_snapshots(repo, old, new)
    changes = {item.path: item for item in diff.files}

    assert set(changes) == {"edit.txt", "gone.txt", "mode.sh", "sub/kind", "sub/new.txt"}
    assert changes["edit.txt"].change == "changed"
    assert changes["edit.txt"].content_changed
    assert changes["edit.txt"].tensors == ()
    assert changes["gone.txt"].change == "removed"
    assert changes["sub/new.txt"].change == "added"
    assert changes["mode.sh"].change == "changed"
    assert not changes["mode.sh"].content_changed
    assert (changes["mode.sh"].old_mode, changes["mode.sh"].mode) == (0o644, 0o755)
    assert (changes["sub/kind"].old_type, changes["sub/kind"].type) == ("file", "symlink")
    assert diff_snapshots(repo, new, new).files == ()


def model_change_pair(repo: Repository, tmp_path: Path, align: bool) -> tuple[Snapshot, Snapshot]:
    """Snapshot a model, then change, add and remove tensors and snapshot again."""
    source = tmp_path / f"src-{align}"
    source.mkdir()
    arrays = random_tensors(1, SHAPES)
    write_safetensors(source / "m.safetensors", arrays)
    old = take(repo, source, align)
    arrays["b.weight"] = arrays["b.weight"] + np.float32(1)
    arrays["a.bias"] = arrays["a.bias"] * np.float32(2)
    arrays["d.weight"] = random_tensors(2, {"d": (50, 50)})["d"]
    del arrays["c.weight"]
    write_safetensors(source / "m.safetensors", arrays)
    return old, take(repo, source, align)


def test_diff_tensors(repo: Repository, tmp_path: Path) -> None:
    old, new = model_change_pair(repo, tmp_path, align=True)
    diff = diff_snapshots(repo, old, new)
    (change,) = diff.files
    tensors = {tensor.name: tensor for tensor in change.tensors}

    assert change.format == "safetensors"
    assert {name: tensor.change for name, tensor in tensors.items()} == {
        "a.bias": "changed",
        "b.weight": "changed",
        "c.weight": "removed",
        "d.weight": "added",
    }
    assert tensors["b.weight"].shape == (64, 300)
    assert tensors["b.weight"].size == 64 * 300 * 4
    assert tensors["d.weight"].dtype == "F32"
    # The unchanged a.weight (51,200 bytes) is found equal by its chunk ids, without reading it.
    assert diff.bytes_read < (new.summary["bytes_total"] + old.summary["bytes_total"]) // 2


def test_diff_tensors_unaligned(repo: Repository, tmp_path: Path) -> None:
    old, new = model_change_pair(repo, tmp_path, align=False)
    (change,) = diff_snapshots(repo, old, new).files

    assert {tensor.name: tensor.change for tensor in change.tensors} == {
        "a.bias": "changed",
        "b.weight": "changed",
        "c.weight": "removed",
        "d.weight": "added",
    }


def test_diff_across_formats_same_tensors(repo: Repository, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    arrays = random_tensors(3, SHAPES)
    write_safetensors(source / "model", arrays)
    old = take(repo, source)
    (source / "model").unlink()
    write_torch(source / "model", arrays)
    (change,) = diff_snapshots(repo, old, take(repo, source)).files

    assert change.format == "safetensors/torch"
    assert change.tensors == ()


def test_diff_cli_json(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    arrays = random_tensors(4, SHAPES)
    write_safetensors(source / "m.safetensors", arrays)
    first = json.loads(run_cas("snapshot", source, "--json").stdout)["id"]
    arrays["c.weight"] = arrays["c.weight"] * np.float32(3)
    write_safetensors(source / "m.safetensors", arrays)
    (source / "notes.txt").write_text("added")
    run_cas("snapshot", source)
    document = json.loads(run_cas("diff", first, "latest", "--json").stdout)
    text = run_cas("diff", first[:12], "latest").stdout

    assert document["old"] == first
    assert (document["added"], document["removed"], document["changed"]) == (1, 0, 1)
    files = {item["path"]: item for item in document["files"]}
    assert files["notes.txt"]["change"] == "added"
    model = files["m.safetensors"]
    assert model["format"] == "safetensors"
    assert model["tensors"] == [
        {
            "name": "c.weight",
            "change": "changed",
            "dtype": "F32",
            "shape": [100, 100],
            "size": 40000,
            "old_dtype": "F32",
            "old_shape": [100, 100],
            "old_size": 40000,
        }
    ]
    assert "~ c.weight  F32 100x100, 40,000 bytes" in text
    assert "safetensors, 1 tensor differs" in text
    assert "+ notes.txt" in text


def test_diff_cli_unknown_snapshot(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    run_cas("snapshot", tmp_path / "f")
    result = run_cas("diff", "latest", "deadbeefdeadbeef", "--json", expect=2)

    assert json.loads(result.stdout)["exit_code"] == 2


def test_checkout_verify_models(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    write_safetensors(source / "m.safetensors", random_tensors(5, SHAPES))
    good = (source / "m.safetensors").read_bytes()
    run_cas("snapshot", source)
    document = json.loads(
        run_cas("checkout", "latest", tmp_path / "out", "--verify-models", "--json").stdout
    )

    assert document["models"] == [
        {"path": "m.safetensors", "format": "safetensors", "tensors": 4, "error": None}
    ]
    (source / "m.safetensors").write_bytes(good[:-8])
    run_cas("snapshot", source)
    failed = run_cas("checkout", "latest", tmp_path / "bad", "--verify-models", expect=6)
    assert "m.safetensors" in failed.stderr
    assert "failed verification" in failed.stderr


def test_checkout_test_command(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "data.txt").write_text("payload")
    run_cas("snapshot", source)
    script = 'test "$(cat data.txt)" = payload && test "$CAS_CHECKOUT_DIR" = "$PWD"'
    passed = run_cas("checkout", "latest", tmp_path / "ok", "--test-command", script, "--json")
    failed = run_cas(
        "checkout",
        "latest",
        tmp_path / "fail",
        "--test-command",
        "echo hi; exit 3",
        "--json",
        expect=6,
    )

    assert json.loads(passed.stdout)["test_command"] == {"command": script, "exit_code": 0}
    document = json.loads(failed.stdout)
    assert document["exit_code"] == 6
    assert "exit code 3" in document["error"]
    # With --json the command's output goes to stderr, so stdout stays one JSON document.
    assert "hi" in failed.stderr
    assert (tmp_path / "fail" / "data.txt").read_text() == "payload"


def test_checkout_failed_check_report(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    write_safetensors(source / "m.safetensors", random_tensors(6, SHAPES))
    (source / "m.safetensors").write_bytes((source / "m.safetensors").read_bytes()[:-8])
    run_cas("snapshot", source)
    bad_model = run_cas(
        "checkout", "latest", tmp_path / "bad", "--verify-models", "--json", expect=6
    )
    (source / "m.safetensors").unlink()
    (source / "data.txt").write_text("payload")
    run_cas("snapshot", source)
    bad_command = run_cas(
        "checkout", "latest", tmp_path / "fail", "--test-command", "exit 3", "--json", expect=6
    )

    # A script must learn which model failed and what the test command returned.
    model_document = json.loads(bad_model.stdout)
    assert model_document["exit_code"] == 6
    assert model_document["files"] == 1
    assert model_document["models"][0]["path"] == "m.safetensors"
    assert model_document["models"][0]["error"]
    command_document = json.loads(bad_command.stdout)
    assert command_document["exit_code"] == 6
    assert "exit code 3" in command_document["error"]
    assert command_document["test_command"] == {"command": "exit 3", "exit_code": 3}
