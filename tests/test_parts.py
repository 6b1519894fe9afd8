"""Sharded checkpoints: parts written by concurrent `cas` processes, joined into one snapshot.

Each writer is a real `cas snapshot --part` subprocess with its own `--host` and cache folder,
as on separate machines. The joined snapshot is checked out and compared byte for byte, and
`cas check --read-data` must find nothing.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT_SECONDS, PASSWORD, SMALL_CHUNKER, CasEnv, RunCas, fast_kdf
from s3server import SeaweedServer, s3_server

from cas.repository import Repository

__all__ = ["s3_server"]

KIB = 1 << 10
RANK_COUNT = 4
BUCKET = "cas-parts-tests"


def write_rank_folders(step: Path, seed: int) -> dict[str, bytes]:
    """Write a torchrun-style ``rank-N`` folder per rank below ``step``; return path -> bytes."""
    rng = random.Random(seed)
    shared = rng.randbytes(64 * KIB)
    files: dict[str, bytes] = {}
    for rank in range(RANK_COUNT):
        files[f"rank-{rank}/model.safetensors"] = rng.randbytes(300 * KIB + rank)
        files[f"rank-{rank}/optimizer.pt"] = rng.randbytes(120 * KIB)
        # The same bytes in every rank: four writers race to store the same chunks.
        files[f"rank-{rank}/tokenizer.json"] = shared
    for rel, content in files.items():
        path = step / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    """Return every regular file below ``root`` as relative path -> bytes."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def cas_json(run_cas: RunCas, *args: str | os.PathLike[str], expect: int = 0) -> object:
    """Run a command with --json and return its parsed stdout."""
    return json.loads(run_cas(*args, "--json", expect=expect).stdout)


def snapshot_parts_concurrently(cas_env: CasEnv, step: Path, tmp_path: Path) -> list[str]:
    """Run one `cas snapshot --part` process per rank at once; return the part ids."""
    processes = []
    for rank in range(RANK_COUNT):
        command = [
            sys.executable,
            "-m",
            "cas_cli.main",
            "snapshot",
            str(step / f"rank-{rank}"),
            "--part",
            f"rank-{rank}",
            "--host",
            f"node-{rank}",
            "--cache-dir",
            str(tmp_path / f"cache-node-{rank}"),
            "--json",
        ]
        processes.append(
            subprocess.Popen(
                command,
                env=cas_env.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    part_ids = []
    for rank, process in enumerate(processes):
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_SECONDS)
        assert process.returncode == 0, f"rank {rank} failed: {stderr}"
        part_ids.append(json.loads(stdout)["id"])
    return part_ids


def join_checkout_and_check(cas_env: CasEnv, run_cas: RunCas, step: Path, tmp_path: Path) -> None:
    """Store four parts concurrently, join them, and verify the joined checkpoint."""
    expected = write_rank_folders(step, seed=7)
    part_ids = snapshot_parts_concurrently(cas_env, step, tmp_path)
    names = [f"rank-{rank}" for rank in range(RANK_COUNT)]

    joined = cas_json(run_cas, "snapshot", "--join-parts", *names, "--tag", "step-1000")
    assert isinstance(joined, dict)
    assert [part["id"] for part in joined["parts"]] == part_ids
    assert [part["host"] for part in joined["parts"]] == [f"node-{r}" for r in range(RANK_COUNT)]

    out = tmp_path / "restored"
    run_cas("checkout", joined["id"], out)
    assert read_tree(out) == expected

    report = cas_json(run_cas, "check", "--read-data")
    assert isinstance(report, dict)
    assert report["ok"] is True, report

    log = cas_json(run_cas, "log", "--tag", "step-1000")
    assert isinstance(log, list)
    recorded = {key: value for key, value in log[0]["meta"].items() if key.startswith("cas.join.")}
    assert recorded == {
        f"cas.join.{name}": part_id for name, part_id in zip(names, part_ids, strict=True)
    }


def test_concurrent_parts_join_local(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    join_checkout_and_check(cli_repo, run_cas, tmp_path / "ckpt" / "step-1000", tmp_path)


def test_concurrent_parts_join_s3(
    cas_env: CasEnv, run_cas: RunCas, tmp_path: Path, s3_server: SeaweedServer
) -> None:
    for name in [name for name in cas_env.env if name.startswith("AWS_")]:
        del cas_env.env[name]
    cas_env.env.update(s3_server.env())
    url = f"s3://{BUCKET}/parts-{uuid.uuid4().hex[:12]}"
    cas_env.env["CAS_REPOSITORY"] = url
    with pytest.MonkeyPatch.context() as monkeypatch:
        for name, value in s3_server.env().items():
            monkeypatch.setenv(name, value)
        Repository.init(
            url,
            PASSWORD.encode(),
            cache_dir=tmp_path / "init-cache",
            chunker=SMALL_CHUNKER,
            kdf=fast_kdf(),
        ).close()
    join_checkout_and_check(cas_env, run_cas, tmp_path / "ckpt" / "step-1000", tmp_path)


def test_join_name_clash_fails(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    write_rank_folders(tmp_path / "a", seed=1)
    write_rank_folders(tmp_path / "b", seed=2)
    first = cas_json(run_cas, "snapshot", tmp_path / "a" / "rank-0", "--part", "rank-0")
    second = cas_json(
        run_cas, "snapshot", tmp_path / "b" / "rank-0", "--part", "rank-0", "--host", "other"
    )
    assert isinstance(first, dict)
    assert isinstance(second, dict)

    result = run_cas("snapshot", "--join", first["id"], second["id"], expect=2)

    assert first["id"][:16] in result.stderr
    assert second["id"][:16] in result.stderr
    assert "rank-0" in result.stderr


def test_join_rejects_plain_snapshot(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    write_rank_folders(tmp_path / "a", seed=1)
    plain = cas_json(run_cas, "snapshot", tmp_path / "a" / "rank-0")
    assert isinstance(plain, dict)

    result = run_cas("snapshot", "--join", plain["id"], expect=2)

    assert "is not a part" in result.stderr


def test_join_with_paths_fails(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    result = run_cas("snapshot", tmp_path, "--join-parts", "rank-0", expect=2)

    assert "take no PATH" in result.stderr


@pytest.mark.parametrize("name", ["a/b", "..", "."])
def test_invalid_part_name_fails(
    cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path, name: str
) -> None:
    result = run_cas("snapshot", tmp_path, "--part", name, expect=2)

    assert "invalid part name" in result.stderr


def test_part_parent_search(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    step1, step2 = tmp_path / "step-1000", tmp_path / "step-2000"
    write_rank_folders(step1, seed=1)
    write_rank_folders(step2, seed=2)
    first = cas_json(run_cas, "snapshot", step1 / "rank-0", "--part", "rank-0", "--host", "n0")
    assert isinstance(first, dict)

    # The same part name and host find the parent, even at another path.
    same = cas_json(run_cas, "snapshot", step2 / "rank-0", "--part", "rank-0", "--host", "n0")
    other_host = cas_json(run_cas, "snapshot", step2 / "rank-0", "--part", "rank-0")
    # A plain snapshot of the part's path does not take the part as its parent.
    plain = cas_json(run_cas, "snapshot", step2 / "rank-0", "--host", "n0")

    assert isinstance(same, dict)
    assert isinstance(other_host, dict)
    assert isinstance(plain, dict)
    assert same["parent"] == first["id"]
    assert other_host["parent"] is None
    assert plain["parent"] is None


def test_join_parts_by_tag(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    step1, step2 = tmp_path / "step-1000", tmp_path / "step-2000"
    write_rank_folders(step1, seed=1)
    write_rank_folders(step2, seed=2)
    old = cas_json(run_cas, "snapshot", step1 / "rank-0", "--part", "rank-0", "--tag", "s1000")
    new = cas_json(run_cas, "snapshot", step2 / "rank-0", "--part", "rank-0", "--tag", "s2000")
    assert isinstance(old, dict)
    assert isinstance(new, dict)

    latest = cas_json(run_cas, "snapshot", "--join-parts", "rank-0")
    tagged = cas_json(run_cas, "snapshot", "--join-parts", "rank-0", "--join-tag", "s1000")
    missing = run_cas("snapshot", "--join-parts", "rank-0", "--join-tag", "s3000", expect=2)

    assert isinstance(latest, dict)
    assert isinstance(tagged, dict)
    assert latest["parts"][0]["id"] == new["id"]
    assert tagged["parts"][0]["id"] == old["id"]
    assert "no part named 'rank-0' with tags s3000" in missing.stderr
