"""`cas copy` between real repositories, with and without shared chunker parameters and ids.

Each copy runs the CLI as a subprocess, and the target has its own password and cache folder.
Every check reads the target back. A checkout is compared byte for byte, a second copy must
add no bytes, and a snapshot taken directly into the target shows whether it deduplicates.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from pathlib import Path

import pytest
from conftest import SMALL_CHUNKER, CasEnv, RunCas, fast_kdf
from s3server import SeaweedServer, s3_server

from cas.repository import Repository

__all__ = ["s3_server"]

KIB = 1 << 10
TARGET_PASSWORD = "target password, not the source's"
BUCKET = "cas-copy-tests"
# bytes_added of a copy with nothing to copy: it writes only lock objects, which it
# deletes again and does not count.
SECOND_COPY_BYTES = 0


def write_checkpoint(root: Path, seed: int) -> dict[str, bytes]:
    """Write a small checkpoint folder of random (incompressible) files; return path -> bytes."""
    rng = random.Random(seed)
    files = {
        "model.safetensors": rng.randbytes(600 * KIB),
        "optimizer.pt": rng.randbytes(300 * KIB),
        "config.json": b'{"layers": 4}\n',
    }
    for rel, content in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    """Return every regular file below ``root`` as relative path -> bytes."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def cas_json(
    run_cas: RunCas, *args: str | os.PathLike[str], env: dict[str, str] | None = None
) -> dict[str, object]:
    """Run a command with --json and return its parsed stdout object."""
    value = json.loads(run_cas(*args, "--json", env=env).stdout)
    assert isinstance(value, dict)
    return value


def target_env(cas_env: CasEnv, target: str, cache: Path) -> dict[str, str]:
    """Return the CLI environment that addresses ``target`` as the repository."""
    env = dict(cas_env.env)
    env.update({"CAS_REPOSITORY": target, "CAS_PASSWORD": TARGET_PASSWORD})
    env["XDG_CACHE_HOME"] = str(cache)
    return env


def copy_env(cas_env: CasEnv) -> dict[str, str]:
    """Return the CLI environment of the source with the target's password set."""
    return {**cas_env.env, "CAS_TO_PASSWORD": TARGET_PASSWORD}


def init_unshared_target(url: str, cache: Path) -> None:
    """Create a target with its own random keys and the same small chunker sizes."""
    Repository.init(
        url, TARGET_PASSWORD.encode(), cache_dir=cache, chunker=SMALL_CHUNKER, kdf=fast_kdf()
    ).close()


def snapshot_two_steps(run_cas: RunCas, tmp_path: Path) -> tuple[dict[str, bytes], list[str]]:
    """Snapshot two checkpoints into the source; return the second's files and both ids."""
    write_checkpoint(tmp_path / "ckpt", seed=1)
    first = cas_json(run_cas, "snapshot", tmp_path / "ckpt")
    files = write_checkpoint(tmp_path / "ckpt", seed=2)
    second = cas_json(run_cas, "snapshot", tmp_path / "ckpt")
    return files, [str(first["id"]), str(second["id"])]


def copy_and_verify(
    cas_env: CasEnv, run_cas: RunCas, tmp_path: Path, target: str
) -> tuple[dict[str, object], dict[str, str]]:
    """Copy every snapshot to ``target``, check out the latest there, copy again.

    Returns the first copy's summary and the target's CLI environment.
    """
    files, source_ids = snapshot_two_steps(run_cas, tmp_path)
    env = target_env(cas_env, target, tmp_path / "target-xdg")

    first = cas_json(run_cas, "copy", "--to", target, env=copy_env(cas_env))
    assert first["snapshots_copied"] == 2
    assert first["snapshots_skipped"] == 0
    assert int(str(first["bytes_added"])) > sum(len(content) for content in files.values())

    run_cas("checkout", "latest", tmp_path / "restored", env=env)
    assert read_tree(tmp_path / "restored") == files
    report = cas_json(run_cas, "check", "--read-data", env=env)
    assert report["ok"] is True, report

    second = cas_json(run_cas, "copy", "--to", target, env=copy_env(cas_env))
    assert second["snapshots_copied"] == 0
    assert second["snapshots_skipped"] == 2
    assert second["blobs_copied"] == 0
    assert second["bytes_added"] == SECOND_COPY_BYTES
    assert [item["source"] for item in second["skipped"]] == source_ids  # type: ignore[attr-defined]
    return first, env


def test_copy_unshared_keys(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    target = str(tmp_path / "target")
    init_unshared_target(target, tmp_path / "target-init-cache")

    first, env = copy_and_verify(cli_repo, run_cas, tmp_path, target)

    assert first["shared_ids"] is False
    copied = first["copied"]
    assert isinstance(copied, list)
    assert all(item["source"] != item["target"] for item in copied)
    log = json.loads(run_cas("log", "--json", env=env).stdout)
    assert {entry["meta"]["cas.copied_from"] for entry in log} == {i["source"] for i in copied}

    # Other cut points and ids: the same files snapshotted into the target store again.
    # Another host, so the copied snapshot is not the parent and every file is read.
    direct = cas_json(run_cas, "snapshot", tmp_path / "ckpt", "--host", "elsewhere", env=env)
    assert int(str(direct["new_chunks"])) > 0
    assert int(str(direct["bytes_added"])) > 800 * KIB


def test_copy_shared_chunker_params(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    target = str(tmp_path / "target")
    init_env = {
        **target_env(cli_repo, target, tmp_path / "target-xdg"),
        "CAS_FROM_PASSWORD": cli_repo.password,
    }
    run_cas("init", "--copy-chunker-params-from", cli_repo.repo, env=init_env)

    first, env = copy_and_verify(cli_repo, run_cas, tmp_path, target)

    assert first["shared_ids"] is True
    copied = first["copied"]
    assert isinstance(copied, list)
    assert all(item["source"] == item["target"] for item in copied)

    # Same cut points and ids: the files snapshotted directly deduplicate against the copy.
    # Another host, so the copied snapshot is not the parent and every file is read.
    direct = cas_json(run_cas, "snapshot", tmp_path / "ckpt", "--host", "elsewhere", env=env)
    assert direct["new_chunks"] == 0
    assert int(str(direct["bytes_added"])) < 16 * KIB


def test_shared_keys_differ_in_secrets(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    target = str(tmp_path / "target")
    init_env = {
        **target_env(cli_repo, target, tmp_path / "target-xdg"),
        "CAS_FROM_PASSWORD": cli_repo.password,
    }
    run_cas("init", "--copy-chunker-params-from", cli_repo.repo, env=init_env)

    with (
        Repository.open(str(cli_repo.repo), cli_repo.password.encode(), cache_dir=tmp_path) as src,
        Repository.open(target, TARGET_PASSWORD.encode(), cache_dir=tmp_path) as dst,
    ):
        assert dst.keys.id_key == src.keys.id_key
        assert dst.keys.chunker_key == src.keys.chunker_key
        assert dst.config.chunker == src.config.chunker
        assert dst.keys.data_key != src.keys.data_key
        assert dst.keys.index_key != src.keys.index_key
        assert dst.keys.x25519_public != src.keys.x25519_public
        assert dst.config.repo_id != src.config.repo_id


def test_init_chunk_sizes_with_copy_fail(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    env = {**cli_repo.env, "CAS_REPOSITORY": str(tmp_path / "t"), "CAS_FROM_PASSWORD": "x"}

    result = run_cas(
        "init",
        "--copy-chunker-params-from",
        cli_repo.repo,
        "--chunk-avg",
        "8192",
        env=env,
        expect=2,
    )

    assert "cannot be combined" in result.stderr


def test_copy_back_skips_originals(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    target = str(tmp_path / "target")
    init_unshared_target(target, tmp_path / "target-init-cache")
    write_checkpoint(tmp_path / "ckpt", seed=1)
    run_cas("snapshot", tmp_path / "ckpt")
    cas_json(run_cas, "copy", "--to", target, env=copy_env(cli_repo))
    env = target_env(cli_repo, target, tmp_path / "target-xdg")
    back_env = {**env, "CAS_TO_PASSWORD": cli_repo.password}

    back = cas_json(run_cas, "copy", "--to", cli_repo.repo, env=back_env)

    assert back["snapshots_copied"] == 0
    assert back["snapshots_skipped"] == 1


def test_copy_joined_names_copied_parts(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    target = str(tmp_path / "target")
    init_unshared_target(target, tmp_path / "target-init-cache")
    for rank in range(2):
        write_checkpoint(tmp_path / f"rank-{rank}", seed=rank)
        run_cas("snapshot", tmp_path / f"rank-{rank}", "--part", f"rank-{rank}")
    run_cas("snapshot", "--join-parts", "rank-0", "rank-1", "--tag", "joined")

    summary = cas_json(run_cas, "copy", "--to", target, env=copy_env(cli_repo))

    env = target_env(cli_repo, target, tmp_path / "target-xdg")
    log = json.loads(run_cas("log", "--tag", "joined", "--json", env=env).stdout)
    parts = {entry["id"] for entry in json.loads(run_cas("log", "--json", env=env).stdout)}
    joined_meta = log[0]["meta"]
    assert summary["snapshots_copied"] == 3
    assert joined_meta["cas.join.rank-0"] in parts
    assert joined_meta["cas.join.rank-1"] in parts
    run_cas("checkout", "latest", tmp_path / "restored", env=env)
    assert read_tree(tmp_path / "restored" / "rank-1") == read_tree(tmp_path / "rank-1")


def test_copy_to_s3(
    cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path, s3_server: SeaweedServer
) -> None:
    for name in [name for name in cli_repo.env if name.startswith("AWS_")]:
        del cli_repo.env[name]
    cli_repo.env.update(s3_server.env())
    target = f"s3://{BUCKET}/copy-{uuid.uuid4().hex[:12]}"
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in s3_server.env().items():
            monkeypatch.setenv(name, value)
        init_unshared_target(target, tmp_path / "target-init-cache")

    first, _env = copy_and_verify(cli_repo, run_cas, tmp_path, target)

    assert first["shared_ids"] is False


def test_copy_target_password_missing(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    target = str(tmp_path / "target")
    init_unshared_target(target, tmp_path / "target-xdg")

    result = run_cas("copy", "--to", target, expect=2)

    # The message names the options to pass, not only the environment variable.
    assert "CAS_TO_PASSWORD" in result.stderr
    assert "--to-password-file FILE" in result.stderr
    assert "--to-password-command CMD" in result.stderr
