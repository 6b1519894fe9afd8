"""The Python API (`import cas`): opening with each kind of password, snapshots of folders
and streams with metadata, listing, checkout, the errors it raises, and the training-loop
example in docs/examples run as a real script.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cas
from tests.conftest import PASSWORD, SMALL_CHUNKER, fast_kdf
from tests.model_files import random_tensors, write_safetensors

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "train_loop.py"


@pytest.fixture
def api_repo(tmp_path):
    repo = cas.Repository.init(
        tmp_path / "repo",
        PASSWORD,
        cache_dir=tmp_path / "cache",
        chunker=SMALL_CHUNKER,
        kdf=fast_kdf(),
    )
    with repo:
        yield repo


def make_folder(root: Path) -> dict[str, bytes]:
    files = {"model.bin": os.urandom(200_000), "config.json": b"{}", "log.txt": b"x"}
    root.mkdir(parents=True)
    for name, content in files.items():
        (root / name).write_bytes(content)
    return files


def test_import_is_cheap():
    code = "import sys, cas; print(sorted(m for m in sys.modules if m.startswith('cas.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_open_with_str_bytes_and_file(api_repo, tmp_path):
    url = tmp_path / "repo"
    password_file = tmp_path / "password"
    password_file.write_text(PASSWORD + "\n")
    for kwargs in (
        {"password": PASSWORD},
        {"password": PASSWORD.encode()},
        {"password_file": password_file},
    ):
        with cas.Repository.open(url, cache_dir=tmp_path / "cache", **kwargs) as repo:
            assert isinstance(repo, cas.Repository)
            assert repo.snapshots() == []


def test_open_wrong_password(api_repo, tmp_path):
    with pytest.raises(cas.WrongPasswordError):
        cas.Repository.open(tmp_path / "repo", "wrong", cache_dir=tmp_path / "cache")


def test_open_missing_repository(tmp_path):
    with pytest.raises(cas.NotFoundError):
        cas.Repository.open(tmp_path / "none", PASSWORD)


def test_open_without_password(api_repo, tmp_path):
    with pytest.raises(cas.UsageError, match="no password given"):
        cas.Repository.open(tmp_path / "repo")


def test_init_existing(api_repo, tmp_path):
    with pytest.raises(cas.AlreadyExistsError):
        cas.Repository.init(tmp_path / "repo", PASSWORD, kdf=fast_kdf())


def test_snapshot_and_checkout(api_repo, tmp_path):
    files = make_folder(tmp_path / "ckpt")
    result = api_repo.snapshot(
        tmp_path / "ckpt",
        tags=["run-1"],
        message="step 10",
        meta={"lr": "3e-4"},
        exclude=["*.txt"],
    )
    assert isinstance(result, cas.SnapshotResult)
    assert result.files == 2
    assert result.snapshot.tags == ("run-1",)
    assert result.snapshot.meta["lr"] == "3e-4"
    checkout = api_repo.checkout(result.snapshot, tmp_path / "restore")
    assert isinstance(checkout, cas.CheckoutResult)
    assert (tmp_path / "restore" / "model.bin").read_bytes() == files["model.bin"]
    assert not (tmp_path / "restore" / "log.txt").exists()


def test_snapshot_stream(api_repo, tmp_path):
    data = os.urandom(100_000)
    first = api_repo.snapshot_stream(io.BytesIO(data), "model.pt", tags=["stream"])
    second = api_repo.snapshot_stream(data, "model.pt")
    assert first.snapshot.meta["cas.stdin"] == "model.pt"
    assert second.new_chunks == 0
    api_repo.checkout(second.snapshot.snapshot_hex[:12], tmp_path / "restore")
    assert (tmp_path / "restore" / "model.pt").read_bytes() == data


def test_diff_lists_changed_tensor(api_repo, tmp_path):
    shapes = {"a.weight": (256, 256), "b.weight": (256, 256), "c.bias": (256,)}
    tensors = random_tensors(3, shapes)
    (tmp_path / "ckpt").mkdir()
    write_safetensors(tmp_path / "ckpt" / "model.safetensors", tensors)
    first = api_repo.snapshot(tmp_path / "ckpt")
    tensors["b.weight"] = tensors["b.weight"] + 1
    write_safetensors(tmp_path / "ckpt" / "model.safetensors", tensors)
    (tmp_path / "ckpt" / "notes.txt").write_text("new")
    second = api_repo.snapshot(tmp_path / "ckpt")

    changes = api_repo.diff(first.snapshot.snapshot_hex[:12], "latest")

    assert isinstance(changes, cas.SnapshotDiff)
    assert changes.new == second.snapshot
    by_path = {item.path: item for item in changes.files}
    assert set(by_path) == {"model.safetensors", "notes.txt"}
    assert by_path["notes.txt"].change == "added"
    model = by_path["model.safetensors"]
    assert model.change == "changed"
    assert model.format == "safetensors"
    assert [(item.name, item.change) for item in model.tensors] == [("b.weight", "changed")]
    assert isinstance(model.tensors[0], cas.TensorChange)
    assert model.tensors[0].shape == (256, 256)


def test_checkout_rollback_and_include(api_repo, tmp_path):
    files = make_folder(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "sub").mkdir()
    (tmp_path / "ckpt" / "sub" / "part.bin").write_bytes(b"part")
    result = api_repo.snapshot(tmp_path / "ckpt")
    target = tmp_path / "restore"
    api_repo.checkout(result.snapshot, target)
    (target / "model.bin").write_bytes(b"a much shorter file")
    (target / "extra.txt").write_text("not in the snapshot")

    rolled = api_repo.checkout(result.snapshot, target, overwrite=True, delete=True)

    assert (target / "model.bin").read_bytes() == files["model.bin"]
    assert not (target / "extra.txt").exists()
    assert rolled.rewritten == 1
    assert rolled.deleted == 1
    assert rolled.unchanged >= 2
    partial = api_repo.checkout(result.snapshot, tmp_path / "part", include=["sub/part.bin"])
    assert partial.files == 1
    assert (tmp_path / "part" / "sub" / "part.bin").read_bytes() == b"part"
    assert not (tmp_path / "part" / "model.bin").exists()


def test_snapshots_filters(api_repo, tmp_path):
    make_folder(tmp_path / "a")
    make_folder(tmp_path / "b")
    api_repo.snapshot(tmp_path / "a", tags=["run-1", "best"])
    api_repo.snapshot(tmp_path / "b", tags=["run-1"], host="other")
    assert len(api_repo.snapshots(tag="run-1")) == 2
    assert len(api_repo.snapshots(tag=["run-1", "best"])) == 1
    assert len(api_repo.snapshots(host="other")) == 1
    assert [s.paths for s in api_repo.snapshots(path=tmp_path / "b")] == [
        (os.fsencode(tmp_path / "b"),)
    ]


def test_invalid_arguments(api_repo, tmp_path):
    with pytest.raises(cas.UsageError, match="invalid tags"):
        api_repo.snapshot(tmp_path, tags="run-1")
    with pytest.raises(cas.UsageError, match="invalid exclude pattern"):
        api_repo.snapshot(tmp_path, exclude=[""])
    with pytest.raises(cas.UsageError, match="invalid --stdin-name"):
        api_repo.snapshot_stream(b"x", "../x")


def test_checkout_into_non_empty(api_repo, tmp_path):
    make_folder(tmp_path / "ckpt")
    result = api_repo.snapshot(tmp_path / "ckpt")
    with pytest.raises(cas.UsageError, match="not empty"):
        api_repo.checkout(result.snapshot, tmp_path / "ckpt")


def test_checkout_damaged_raises(api_repo, tmp_path):
    make_folder(tmp_path / "ckpt")
    result = api_repo.snapshot(tmp_path / "ckpt")
    for pack in (tmp_path / "repo" / "data").rglob("*"):
        if pack.is_file():
            data = bytearray(pack.read_bytes())
            data[100] ^= 0xFF
            pack.write_bytes(bytes(data))
    with pytest.raises(cas.IntegrityError, match="incomplete"):
        api_repo.checkout(result.snapshot, tmp_path / "restore")


def run_example(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAS_")}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    command = [sys.executable, str(EXAMPLE), "--repo", str(tmp_path / "example-repo")]
    command += ["--password-file", str(tmp_path / "pw.txt"), *args]
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_train_loop_example(tmp_path):
    (tmp_path / "pw.txt").write_text("example password\n")
    stdout = run_example(tmp_path, "--steps", "50", "--every", "20")
    assert stdout.count("snapshot ") == 3
    with cas.Repository.open(
        tmp_path / "example-repo", password_file=tmp_path / "pw.txt", cache_dir=tmp_path / "xdg"
    ) as repo:
        snapshots = repo.snapshots(tag="example-run")
        assert [s.meta["step"] for s in snapshots] == ["20", "40", "50"]
        assert "final" in snapshots[-1].tags
        assert "final" not in snapshots[0].tags
        repo.checkout(snapshots[-1], tmp_path / "restore")
    for name in ("weights.npy", "optimizer.npy", "state.json"):
        restored = (tmp_path / "restore" / name).read_bytes()
        assert restored == (tmp_path / "ckpt" / name).read_bytes(), name
    assert np.load(tmp_path / "restore" / "weights.npy").shape == (32,)


def test_train_loop_example_resumes(tmp_path):
    (tmp_path / "pw.txt").write_text("example password\n")
    run_example(tmp_path, "--steps", "40", "--every", "20")
    for path in (tmp_path / "ckpt").iterdir():
        path.unlink()
    (tmp_path / "ckpt").rmdir()
    stdout = run_example(tmp_path, "--steps", "60", "--every", "20")
    assert "restored 3 files" in stdout
    with cas.Repository.open(
        tmp_path / "example-repo", password_file=tmp_path / "pw.txt", cache_dir=tmp_path / "xdg"
    ) as repo:
        steps = [s.meta["step"] for s in repo.snapshots(tag="example-run")]
    assert steps == ["20", "40", "60"]
