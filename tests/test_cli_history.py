"""`cas log`, `cas tag`, `cas find` and `cas stats` as subprocesses: text and --json output,
filters alone and combined, the lineage graph, and the progress bar on a pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import pty
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI_TIMEOUT_SECONDS, PASSWORD, SMALL_CHUNKER, CasEnv, RunCas, fast_kdf

from cas.repository import Repository

KIB = 1 << 10
MIB = 1 << 20


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def cas_json(run_cas: RunCas, *args: str | os.PathLike[str], expect: int = 0) -> object:
    return json.loads(run_cas(*args, "--json", expect=expect).stdout)


def write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


def make_history(run_cas: RunCas, root: Path) -> dict[str, str]:
    """Take three snapshots of two folders on two hosts; return their ids by name."""
    ckpt, data = root / "ckpt", root / "data"
    write_files(ckpt, {"model.safetensors": random_bytes(64 * KIB, 1), "config.json": b"{}"})
    write_files(data, {"train.csv": b"a,b\n1,2\n"})
    ids = {}
    ids["run7"] = cas_json(
        run_cas, "snapshot", ckpt, "--tag", "run-7", "--meta", "lr=3e-4", "-m", "step 1"
    )["id"]
    write_files(ckpt, {"extra.json": b"[]"})
    ids["best"] = cas_json(
        run_cas, "snapshot", ckpt, "--tag", "run-7", "--tag", "best", "--meta", "lr=1e-3"
    )["id"]
    ids["data"] = cas_json(run_cas, "snapshot", data, "--host", "other", "--tag", "data")["id"]
    return ids


@pytest.fixture
def history(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> dict[str, str]:
    """The three snapshots of `make_history` in this test's own repository, for changes."""
    return make_history(run_cas, tmp_path)


def make_runner(env: dict[str, str]) -> RunCas:
    """Return a CLI runner with the checks of conftest's ``run_cas``, for another environment."""

    def run(
        *args: str | os.PathLike[str], expect: int | None = 0, env: dict[str, str] = env
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "cas_cli.main", *map(str, args)],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_SECONDS,
            check=False,
        )
        details = f"{args}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        if expect is not None:
            assert result.returncode == expect, details
        assert "Traceback" not in result.stderr, details
        return result

    return run


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunCas, dict[str, str], Path]:
    """One repository with `make_history` for the tests that only read: runner, ids, root.

    Taking the snapshots once per module instead of once per test saves an estimated
    60 s of subprocess runs on a 2-core VM.
    """
    root = tmp_path_factory.mktemp("history")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CAS_")}
    env.update(
        {
            "CAS_REPOSITORY": str(root / "repo"),
            "CAS_PASSWORD": PASSWORD,
            "XDG_CACHE_HOME": str(root / "xdg"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    Repository.init(
        str(root / "repo"),
        PASSWORD.encode(),
        cache_dir=root / "xdg" / "cas",
        chunker=SMALL_CHUNKER,
        kdf=fast_kdf(),
    ).close()
    run = make_runner(env)
    return run, make_history(run, root), root


def logged_ids(run_cas: RunCas, *filters: str) -> list[str]:
    return [entry["id"] for entry in cas_json(run_cas, "log", *filters)]  # type: ignore[union-attr]


# log


def test_log_json_fields(shared: tuple[RunCas, dict[str, str], Path]) -> None:
    run_cas, history, root = shared
    log = cas_json(run_cas, "log")
    assert isinstance(log, list)
    newest, middle, oldest = log

    assert [e["id"] for e in log] == [history["data"], history["best"], history["run7"]]
    assert oldest["message"] == "step 1"
    assert oldest["meta"] == {"lr": "3e-4"}
    assert oldest["paths"] == [str(root / "ckpt")]
    assert middle["parent"] == history["run7"]
    assert middle["tags"] == ["run-7", "best"]
    assert newest["host"] == "other"
    assert newest["cas_version"]
    assert oldest["user"]
    assert oldest["replaces"] == []
    assert oldest["summary"]["files"] == 2


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        (["--tag", "run-7"], ["best", "run7"]),
        (["--tag", "best,run-7"], ["best"]),
        (["--tag", "best", "--tag", "data"], ["data", "best"]),
        (["--host", "other"], ["data"]),
        (["--meta", "lr=3e-4"], ["run7"]),
        (["--tag", "run-7", "--meta", "lr=1e-3"], ["best"]),
        (["--tag", "run-7", "--host", "other"], []),
    ],
    ids=["tag", "tag-and", "tag-or", "host", "meta", "tag-meta", "tag-host"],
)
def test_log_filters(
    shared: tuple[RunCas, dict[str, str], Path], filters: list[str], expected: list[str]
) -> None:
    run_cas, history, _root = shared

    assert logged_ids(run_cas, *filters) == [history[name] for name in expected]


def test_log_path_filter(shared: tuple[RunCas, dict[str, str], Path]) -> None:
    run_cas, history, root = shared

    by_path = logged_ids(run_cas, "--path", str(root / "data"))
    combined = logged_ids(run_cas, "--path", str(root / "ckpt"), "--tag", "best")

    assert by_path == [history["data"]]
    assert combined == [history["best"]]


def test_log_text(shared: tuple[RunCas, dict[str, str], Path]) -> None:
    run_cas, history, _root = shared

    lines = run_cas("log").stdout.splitlines()

    assert lines[0].startswith(history["data"][:16])
    assert "[run-7, best]" in lines[1]
    assert "    step 1" in lines
    assert "    lr=3e-4" in lines


def test_log_graph_branches(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_files(src, {"a": b"1"})
    root = cas_json(run_cas, "snapshot", src)["id"]
    write_files(src, {"b": b"2"})
    left = cas_json(run_cas, "snapshot", src, "--parent", root)["id"]
    write_files(src, {"c": b"3"})
    right = cas_json(run_cas, "snapshot", src, "--parent", root)["id"]

    lines = run_cas("log", "--graph").stdout.splitlines()

    assert lines[0].startswith("*  " + right[:16])
    assert lines[1].startswith("| *  " + left[:16])
    assert lines[2] == "|/"
    assert lines[3].startswith("*  " + root[:16])


def test_log_invalid_meta_filter(cli_repo: CasEnv, run_cas: RunCas) -> None:
    result = run_cas("log", "--meta", "lr", expect=2)

    assert "invalid --meta 'lr'" in result.stderr


# tag


def test_tag_json_and_log(history: dict[str, str], run_cas: RunCas) -> None:
    output = cas_json(run_cas, "tag", history["run7"], "--add", "keep", "--remove", "run-7")
    assert isinstance(output, dict)
    changed = output["changed"][0]
    log = cas_json(run_cas, "log")
    assert isinstance(log, list)

    assert changed["old_id"] == history["run7"]
    assert changed["tags"] == ["keep"]
    assert output["replaced_deleted"] == 1
    assert [e["id"] for e in log][2] == changed["id"]
    assert log[1]["parent"] == changed["id"]
    assert logged_ids(run_cas, "--tag", "keep") == [changed["id"]]


def test_tag_set_and_text(history: dict[str, str], run_cas: RunCas) -> None:
    result = run_cas("tag", history["data"][:10], "--set", "x", "--set", "y")
    cleared = cas_json(run_cas, "tag", "latest", "--set", "")

    assert f"snapshot {history['data'][:16]} is now" in result.stdout
    assert "[x, y]" in result.stdout
    assert isinstance(cleared, dict)
    assert cleared["changed"][0]["tags"] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["latest"], "no tag change given"),
        (["latest", "--add", "a,b"], "invalid tag 'a,b'"),
        (["latest", "--set", "a", "--add", "b"], "--set replaces every tag"),
        (["deadbeefdead", "--add", "a"], "no snapshot matches"),
    ],
    ids=["nothing", "comma", "set-add", "unknown"],
)
def test_tag_errors(
    shared: tuple[RunCas, dict[str, str], Path], args: list[str], message: str
) -> None:
    run_cas, _history, _root = shared

    result = run_cas("tag", *args, expect=2)

    assert message in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--meta", "cas.part=x"], "set by cas itself"),
        (["--meta", "9lr=1"], "invalid --meta key '9lr'"),
        (["--meta", "noequals"], "write KEY=VALUE"),
        (["--tag", "two words"], "invalid tag 'two words'"),
        (["--host", "a\tb"], "invalid --host"),
    ],
    ids=["reserved", "key", "no-equals", "tag-space", "host"],
)
def test_snapshot_label_errors(
    cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path, args: list[str], message: str
) -> None:
    write_files(tmp_path / "s", {"a": b"1"})

    result = run_cas("snapshot", tmp_path / "s", *args, expect=2)

    assert message in result.stderr
    assert cas_json(run_cas, "log") == []


# find


def test_find_json(shared: tuple[RunCas, dict[str, str], Path]) -> None:
    run_cas, history, _root = shared

    found = cas_json(run_cas, "find", "*.json")
    assert isinstance(found, list)

    assert [item["snapshot"]["id"] for item in found] == [history["best"], history["run7"]]
    assert [m["path"] for m in found[0]["matches"]] == ["/config.json", "/extra.json"]
    assert [m["path"] for m in found[1]["matches"]] == ["/config.json"]
    assert found[1]["matches"][0]["size"] == 2


def test_find_filters_and_text(shared: tuple[RunCas, dict[str, str], Path]) -> None:
    run_cas, history, _root = shared

    only_one = cas_json(run_cas, "find", "extra.*", "--snapshot", history["best"][:8])
    none = cas_json(run_cas, "find", "*.json", "--host", "other")
    text = run_cas("find", "/train.*").stdout.splitlines()

    assert isinstance(only_one, list)
    assert [item["snapshot"]["id"] for item in only_one] == [history["best"]]
    assert none == []
    assert text[0].startswith(history["data"][:16])
    assert text[1].split() == ["file", "8", "/train.csv"]


# stats


def test_stats_snapshot_json(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    src = tmp_path / "s"
    write_files(src, {"a.bin": random_bytes(200 * KIB, 2)})
    cas_json(run_cas, "snapshot", src)
    write_files(src, {"b.bin": random_bytes(100 * KIB, 3)})
    second = cas_json(run_cas, "snapshot", src)["id"]

    one = cas_json(run_cas, "stats", "latest")
    whole = cas_json(run_cas, "stats")
    text = run_cas("stats", second[:8]).stdout
    assert isinstance(one, dict)
    assert isinstance(whole, dict)

    assert one["id"] == second
    assert one["logical_bytes"] == 300 * KIB
    assert one["files"] == 2
    assert 100 * KIB < one["unique_bytes"] < 110 * KIB
    assert one["dedup_ratio"] == 1.0
    assert one["stored_bytes"] >= one["raw_bytes"] * 0.9
    assert whole["logical_bytes"] == 500 * KIB
    assert whole["raw_bytes"] > 300 * KIB
    assert whole["dedup_ratio"] == round(500 / 300, 3)
    assert whole["compression_ratio"] <= 1.0
    assert [s["logical_bytes"] for s in whole["snapshots"]] == [200 * KIB, 300 * KIB]
    assert "unique size" in text


# progress


def run_on_terminal(cas_env: CasEnv, *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal; return exit code, stdout and stderr."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "cas_cli.main", *map(str, args)],
        env=cas_env.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    stdout = process.stdout.read().decode() if process.stdout else ""
    code = process.wait(timeout=CLI_TIMEOUT_SECONDS)
    os.close(controller)
    return code, stdout, b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_terminal(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    src = tmp_path / "big"
    write_files(src, {"w.bin": random_bytes(4 * MIB, 9)})

    code, _stdout, stderr = run_on_terminal(cli_repo, "snapshot", src)
    check_code, _out, check_stderr = run_on_terminal(cli_repo, "check", "--read-data")

    assert code == 0
    assert "MB/s" in stderr
    assert "100%" in stderr
    assert "4.0 MiB of 4.0 MiB" in stderr
    assert check_code == 0
    assert "MB/s" in check_stderr


def test_progress_quiet_off_terminal(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    src = tmp_path / "big"
    write_files(src, {"w.bin": random_bytes(MIB, 9)})

    piped = run_cas("snapshot", src)
    code, _stdout, quiet = run_on_terminal(cli_repo, "snapshot", src, "--quiet")
    _code, as_json, json_stderr = run_on_terminal(cli_repo, "snapshot", src, "--json")

    assert "MB/s" not in piped.stderr
    assert "\r" not in piped.stderr
    assert code == 0
    assert "MB/s" not in quiet
    assert "MB/s" not in json_stderr
    assert json.loads(as_json)["files"] == 1
