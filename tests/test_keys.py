"""`cas key`: add, list, remove, passwd, export and import, through the real CLI.

Interrupted password changes run through the library with `FaultyBackend`, which
fails every write from a chosen one on, as if the process had died there.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from conftest import PASSWORD, SMALL_CHUNKER, CasEnv, RunCas, fast_kdf
from faulty_backend import FaultyBackend

from cas.backend import LocalBackend
from cas.errors import BackendError, WrongPasswordError
from cas.keyring import change_password
from cas.locks import RepositoryLock
from cas.repository import Repository


def cas_json(
    run_cas: RunCas,
    *args: str | os.PathLike[str],
    expect: int = 0,
    env: dict[str, str] | None = None,
) -> object:
    """Run a command with --json and return the parsed stdout."""
    return json.loads(run_cas(*args, "--json", expect=expect, env=env).stdout)


def password_file(folder: Path, name: str, password: str) -> Path:
    """Write ``password`` to a new file and return its path."""
    path = folder / name
    path.write_text(password + "\n")
    return path


def with_password(env: CasEnv, password: str) -> dict[str, str]:
    """Return the CLI environment with another CAS_PASSWORD."""
    return {**env.env, "CAS_PASSWORD": password}


def key_list(run_cas: RunCas, env: dict[str, str] | None = None) -> list[dict[str, object]]:
    """Return `cas key list --json`."""
    keys = cas_json(run_cas, "key", "list", env=env)
    assert isinstance(keys, list)
    return keys


def test_key_add_and_list(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    new = password_file(tmp_path, "new", "second password")
    added = cas_json(
        run_cas, "key", "add", "--new-password-file", new, "--user", "alice", "--host", "gpu-7"
    )
    assert isinstance(added, dict)
    assert added["user"] == "alice"
    assert added["host"] == "gpu-7"
    assert added["write_only"] is False
    keys = key_list(run_cas)
    assert len(keys) == 2
    assert [key["in_use"] for key in keys].count(True) == 1
    listed = {key["id"]: key for key in keys}
    assert listed[added["id"]]["user"] == "alice"
    assert listed[added["id"]]["in_use"] is False
    for key in keys:
        assert set(key) == {"id", "user", "host", "created", "write_only", "in_use"}
    # The new password opens the repository, and then its key is the one in use.
    keys = key_list(run_cas, env=with_password(cli_repo, "second password"))
    in_use = [key["id"] for key in keys if key["in_use"]]
    assert in_use == [added["id"]]
    text = run_cas("key", "list").stdout
    assert "*" in text
    assert "alice@gpu-7" in text


def test_key_add_without_new_password(cli_repo: CasEnv, run_cas: RunCas) -> None:
    result = run_cas("key", "add", expect=2)
    assert "--new-password-file" in result.stderr
    assert len(key_list(run_cas)) == 1


def test_key_add_empty_password_file(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = run_cas("key", "add", "--new-password-file", empty, expect=2)
    assert "is empty" in result.stderr


def test_key_remove_by_prefix(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    new = password_file(tmp_path, "new", "second password")
    added = cas_json(run_cas, "key", "add", "--new-password-file", new)
    assert isinstance(added, dict)
    key_id = str(added["id"])
    removed = cas_json(run_cas, "key", "remove", key_id[:10])
    assert isinstance(removed, dict)
    assert removed["id"] == key_id
    assert [key["id"] for key in key_list(run_cas)] != [key_id]
    assert len(key_list(run_cas)) == 1
    result = run_cas("key", "list", env=with_password(cli_repo, "second password"), expect=4)
    assert "wrong password" in result.stderr


def test_key_remove_unknown_and_invalid(cli_repo: CasEnv, run_cas: RunCas) -> None:
    (only,) = key_list(run_cas)
    unknown = "0" if not str(only["id"]).startswith("0") else "1"
    result = run_cas("key", "remove", unknown * 12, expect=2)
    assert "no key matches" in result.stderr
    result = run_cas("key", "remove", "not-hex", expect=2)
    assert "invalid key id" in result.stderr


def test_key_remove_last_full_key(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    (only,) = key_list(run_cas)
    result = run_cas("key", "remove", str(only["id"])[:12], expect=2)
    assert "last full key" in result.stderr
    assert "cas key add" in result.stderr
    assert [key["id"] for key in key_list(run_cas)] == [only["id"]]
    # A write-only key does not count as a key that can read the repository.
    writer = password_file(tmp_path, "writer", "writer password")
    run_cas("key", "add", "--write-only", "--new-password-file", writer)
    result = run_cas("key", "remove", str(only["id"])[:12], expect=2)
    assert "last full key" in result.stderr
    assert len(key_list(run_cas)) == 2


def test_key_remove_in_use(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    new = password_file(tmp_path, "new", "second password")
    run_cas("key", "add", "--new-password-file", new)
    (in_use,) = [key for key in key_list(run_cas) if key["in_use"]]
    result = run_cas("key", "remove", str(in_use["id"]))
    assert "no longer opens" in result.stderr
    run_cas("key", "list", expect=4)
    keys = key_list(run_cas, env=with_password(cli_repo, "second password"))
    assert len(keys) == 1


def test_key_passwd(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    (old,) = key_list(run_cas)
    new = password_file(tmp_path, "new", "changed password")
    changed = cas_json(run_cas, "key", "passwd", "--new-password-file", new)
    assert isinstance(changed, dict)
    assert changed["replaced"] == old["id"]
    assert changed["id"] != old["id"]
    assert changed["user"] == old["user"]
    run_cas("key", "list", expect=4)
    keys = key_list(run_cas, env=with_password(cli_repo, "changed password"))
    assert [key["id"] for key in keys] == [changed["id"]]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_key_passwd_interrupted(tmp_path: Path, fail_at: int) -> None:
    """Write 1 is the new key object, write 2 the deletion of the old one."""
    url = str(tmp_path / "repo")
    Repository.init(url, PASSWORD.encode(), cache_dir=tmp_path / "cache", kdf=fast_kdf()).close()
    faulty = FaultyBackend(LocalBackend(url), fail_at=fail_at)
    with (
        Repository.open(url, PASSWORD.encode(), backend=faulty) as repo,
        pytest.raises(BackendError),
    ):
        change_password(repo, b"new password", kdf=fast_kdf())
    assert faulty.log[0].startswith("put keys/")
    # The old password still opens the repository, whichever step failed.
    with Repository.open(url, PASSWORD.encode(), cache_dir=tmp_path / "cache") as repo:
        assert repo.key_name is not None
    if fail_at == 1:
        with pytest.raises(WrongPasswordError):
            Repository.open(url, b"new password", cache_dir=tmp_path / "cache")
    else:
        with Repository.open(url, b"new password", cache_dir=tmp_path / "cache") as repo:
            assert repo.key_name is not None
    # Once the storage works again, a second change completes and removes the old key.
    with Repository.open(url, PASSWORD.encode(), cache_dir=tmp_path / "cache") as repo:
        change_password(repo, b"third password", kdf=fast_kdf())
    with pytest.raises(WrongPasswordError):
        Repository.open(url, PASSWORD.encode(), cache_dir=tmp_path / "cache")


def test_key_command_locked(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    new = password_file(tmp_path, "new", "second password")
    url = str(cli_repo.repo)
    with (
        Repository.open(url, PASSWORD.encode(), cache_dir=cli_repo.cache) as repo,
        RepositoryLock(repo.backend, repo.keys, exclusive=True, operation="prune"),
    ):
        result = run_cas("key", "add", "--new-password-file", new, expect=5)
        assert "prune" in result.stderr
    assert len(key_list(run_cas)) == 1


def test_key_export_file(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    target = tmp_path / "keys.txt"
    done = cas_json(run_cas, "key", "export", "-o", target)
    assert isinstance(done, dict)
    assert done["file"] == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    text = target.read_text()
    assert text.startswith("-----BEGIN CAS MASTER KEYS-----\n")
    assert f"Repository: {done['repository']}\n" in text
    assert "Checksum: sha256:" in text
    assert text.endswith("-----END CAS MASTER KEYS-----\n")
    # An export never replaces a file.
    result = run_cas("key", "export", "-o", target, expect=2)
    assert "already exists" in result.stderr
    assert target.read_text() == text
    printed = run_cas("key", "export").stdout
    assert printed == text


def test_key_import(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "weights.bin").write_bytes(os.urandom(100_000))
    run_cas("snapshot", source)
    export = tmp_path / "keys.txt"
    run_cas("key", "export", "-o", export)
    # Lose the only password: import needs none, only the export and a new password.
    (only,) = key_list(run_cas)
    key_file = cli_repo.repo / "keys" / str(only["id"])
    key_file.unlink()
    new = password_file(tmp_path, "new", "recovered password")
    imported = cas_json(
        run_cas,
        "key",
        "import",
        export,
        "--new-password-file",
        new,
        env=cli_repo.without("CAS_PASSWORD"),
    )
    assert isinstance(imported, dict)
    assert imported["write_only"] is False
    env = with_password(cli_repo, "recovered password")
    run_cas("checkout", "latest", tmp_path / "out", env=env)
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (source / "weights.bin").read_bytes()


def damaged_export(text: str) -> str:
    """Return ``text`` with one character of its base64 block changed."""
    lines = text.splitlines(keepends=True)
    body = lines.index("\n") + 1
    line = lines[body]
    lines[body] = ("B" if line[5] != "B" else "C").join([line[:5], line[6:]])
    return "".join(lines)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("damaged", "checksum mismatch"),
        ("no block", "no -----BEGIN CAS MASTER KEYS-----"),
        ("other version", "version '2'"),
    ],
)
def test_key_import_invalid(
    cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path, content: str, message: str
) -> None:
    text = run_cas("key", "export").stdout
    if content == "damaged":
        text = damaged_export(text)
    elif content == "no block":
        text = "hello\n"
    else:
        text = text.replace("Version: 1", "Version: 2")
    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    new = password_file(tmp_path, "new", "another password")
    result = run_cas("key", "import", bad, "--new-password-file", new, expect=2)
    assert message in result.stderr
    assert str(bad) in result.stderr
    assert len(key_list(run_cas)) == 1


def test_key_import_other_repository(cli_repo: CasEnv, run_cas: RunCas, tmp_path: Path) -> None:
    other = tmp_path / "other"
    Repository.init(
        str(other),
        PASSWORD.encode(),
        cache_dir=cli_repo.cache,
        chunker=SMALL_CHUNKER,
        kdf=fast_kdf(),
    ).close()
    export = tmp_path / "other-keys.txt"
    run_cas("-r", other, "key", "export", "-o", export)
    new = password_file(tmp_path, "new", "another password")
    result = run_cas("key", "import", export, "--new-password-file", new, expect=2)
    assert "does not belong" in result.stderr
    assert len(key_list(run_cas)) == 1
