"""`cas snapshot --dereference` on a folder laid out like a Hugging Face cache, whose model
files are symlinks into a blob folder, and on symlink loops.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

from cas.archiver import Archiver, SnapshotOptions

WEIGHTS = random.Random(7).randbytes(300_000)
CONFIG = b'{"hidden_size": 64}\n'
TOKENIZER = b'{"vocab": ["a", "b"]}\n'
REVISION = "0123456789abcdef0123456789abcdef01234567"


def make_hf_cache(hub: Path) -> Path:
    """Create ``models--org--name`` below ``hub`` as huggingface_hub lays it out.

    The revision folder contains relative symlinks into ``blobs/``, and one symlink to a
    folder (``extra``, pointing at a shared folder of tokenizer files). Return the
    revision folder.
    """
    model = hub / "models--org--name"
    blobs = model / "blobs"
    blobs.mkdir(parents=True)
    for content in (WEIGHTS, CONFIG, TOKENIZER):
        (blobs / f"sha-{len(content)}").write_bytes(content)
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(REVISION)
    shared = model / "shared-tokenizer"
    shared.mkdir()
    (shared / "tokenizer.json").symlink_to(f"../blobs/sha-{len(TOKENIZER)}")
    revision = model / "snapshots" / REVISION
    revision.mkdir(parents=True)
    (revision / "model.safetensors").symlink_to(f"../../blobs/sha-{len(WEIGHTS)}")
    (revision / "config.json").symlink_to(f"../../blobs/sha-{len(CONFIG)}")
    # A second link to the same blob, as two revisions that share a file have.
    (revision / "pytorch_model.safetensors").symlink_to(f"../../blobs/sha-{len(WEIGHTS)}")
    (revision / "extra").symlink_to("../../shared-tokenizer")
    return revision


def test_dereference_round_trip(cli_repo, run_cas, tmp_path):
    revision = make_hf_cache(tmp_path / "hub")
    out = json.loads(run_cas("snapshot", revision, "--dereference", "--json").stdout)
    # Two links to one blob: it is read once.
    assert out["bytes_read"] == len(WEIGHTS) + len(CONFIG) + len(TOKENIZER)
    assert out["files"] == 4
    dest = tmp_path / "restore"
    run_cas("checkout", out["id"], dest)
    for name, content in [
        ("model.safetensors", WEIGHTS),
        ("pytorch_model.safetensors", WEIGHTS),
        ("config.json", CONFIG),
        ("extra/tokenizer.json", TOKENIZER),
    ]:
        path = dest / name
        assert not path.is_symlink(), name
        assert path.read_bytes() == content, name
    assert (dest / "extra").is_dir()
    assert not (dest / "extra").is_symlink()


def test_without_dereference_links_stay(cli_repo, run_cas, tmp_path):
    revision = make_hf_cache(tmp_path / "hub")
    out = json.loads(run_cas("snapshot", revision, "--json").stdout)
    assert out["bytes_read"] == 0
    dest = tmp_path / "restore"
    run_cas("checkout", out["id"], dest)
    link = dest / "model.safetensors"
    assert link.is_symlink()
    assert os.readlink(link) == f"../../blobs/sha-{len(WEIGHTS)}"


def test_dereference_unchanged_not_read(repo, tmp_path):
    revision = make_hf_cache(tmp_path / "hub")
    options = SnapshotOptions(dereference=True)
    first = Archiver(repo, options).run([str(revision)])
    second = Archiver(repo, options).run([str(revision)])
    assert first.bytes_read > 0
    assert second.bytes_read == 0
    assert second.unchanged_files == second.files == 4
    assert second.snapshot.tree_id == first.snapshot.tree_id


def test_dereference_changed_target_read(repo, tmp_path):
    revision = make_hf_cache(tmp_path / "hub")
    options = SnapshotOptions(dereference=True)
    Archiver(repo, options).run([str(revision)])
    blob = revision.parent.parent / "blobs" / f"sha-{len(CONFIG)}"
    blob.write_bytes(b'{"hidden_size": 128}\n')
    second = Archiver(repo, options).run([str(revision)])
    assert second.bytes_read == blob.stat().st_size
    assert second.unchanged_files == 3


def test_whole_cache_reads_blob_once(repo, tmp_path):
    hub = tmp_path / "hub"
    make_hf_cache(hub)
    result = Archiver(repo, SnapshotOptions(dereference=True)).run([str(hub)])
    assert result.bytes_read == len(WEIGHTS) + len(CONFIG) + len(TOKENIZER) + len(REVISION)
    assert result.warnings == ()


def test_symlink_loop_stored_as_link(cli_repo, run_cas, tmp_path):
    root = tmp_path / "ckpt"
    (root / "inner").mkdir(parents=True)
    (root / "inner" / "weights.bin").write_bytes(b"w" * 1000)
    (root / "inner" / "up").symlink_to("..")
    (root / "inner" / "self").symlink_to(".")
    result = run_cas("snapshot", root, "--dereference", "--json", expect=1)
    out = json.loads(result.stdout)
    assert out["files"] == 1
    assert len(out["warnings"]) == 2
    assert all("points to a folder that contains it" in w for w in out["warnings"])
    dest = tmp_path / "restore"
    run_cas("checkout", out["id"], dest)
    assert os.readlink(dest / "inner" / "up") == ".."
    assert (dest / "inner" / "weights.bin").read_bytes() == b"w" * 1000


def test_dangling_link_stored_as_link(cli_repo, run_cas, tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "gone").symlink_to("missing-blob")
    out = json.loads(run_cas("snapshot", root, "--dereference", "--json", expect=1).stdout)
    assert "cannot follow symlink" in out["warnings"][0]
    dest = tmp_path / "restore"
    run_cas("checkout", out["id"], dest)
    assert os.readlink(dest / "gone") == "missing-blob"
