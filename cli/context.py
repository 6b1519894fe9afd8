"""Helpers shared by every command: passwords, opening the repository, printing results."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cas.errors import UsageError, WriteOnlyKeyError
from cas.repository import Repository


def add_global_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """Add the options accepted before or after the command name.

    On subcommand parsers the defaults are suppressed, so a value given before
    the command name is not reset by the subcommand's parser.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("global options")
    group.add_argument(
        "-r", "--repo", default=default(None), help="repository path or URL (or CAS_REPOSITORY)"
    )
    group.add_argument(
        "--s3-endpoint",
        default=default(None),
        metavar="URL",
        help="endpoint URL of an S3-compatible server for s3:// repositories "
        "(or AWS_ENDPOINT_URL_S3)",
    )
    group.add_argument(
        "--password-file",
        default=default(None),
        help="read the password from this file (or CAS_PASSWORD_FILE)",
    )
    group.add_argument(
        "--password-command",
        default=default(None),
        help="run this shell command and use its output as the password",
    )
    group.add_argument(
        "--cache-dir",
        default=default(None),
        help="local cache folder (default $XDG_CACHE_HOME/cas or ~/.cache/cas)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print exactly one JSON document on stdout",
    )
    group.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        default=default(False),
        help="print no progress and no summary",
    )
    group.add_argument(
        "--threads", type=int, default=default(0), help="threads to use (default 0: all cores)"
    )


MIN_MEMORY_MIB = 64


def memory_limit(mib: int) -> int:
    """Return a --memory value in bytes; below 64 MiB not even one pack buffer fits."""
    if mib < MIN_MEMORY_MIB:
        raise UsageError(f"invalid --memory {mib}: use {MIN_MEMORY_MIB} MiB or more")
    return mib << 20


def repo_url(args: argparse.Namespace) -> str:
    """Return the repository URL from -r/--repo or CAS_REPOSITORY.

    Every command finds its repository through this function, so it also applies
    --s3-endpoint: it sets ``AWS_ENDPOINT_URL_S3`` in this process, where the S3 backend
    reads it.
    """
    url = args.repo or os.environ.get("CAS_REPOSITORY", "")
    if not url:
        raise UsageError("no repository given: pass -r/--repo PATH or set CAS_REPOSITORY")
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = args.s3_endpoint
    return str(url)


def cache_dir(args: argparse.Namespace) -> Path | None:
    """Return the --cache-dir value, or None for the default."""
    return Path(args.cache_dir) if args.cache_dir else None


def read_password(args: argparse.Namespace, confirm: bool = False) -> bytes:
    """Return the password from the options, the environment, or a prompt."""
    password_file = args.password_file or os.environ.get("CAS_PASSWORD_FILE")
    if args.password_command:
        result = subprocess.run(args.password_command, shell=True, capture_output=True, check=False)
        if result.returncode != 0:
            raise UsageError(
                f"--password-command {args.password_command!r} failed with exit code "
                f"{result.returncode}"
            )
        return _strip_newline(result.stdout)
    if password_file:
        try:
            return _strip_newline(Path(password_file).read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read password file {password_file}: {exc.strerror}") from None
    if "CAS_PASSWORD" in os.environ:
        if not os.environ["CAS_PASSWORD"]:
            raise UsageError("CAS_PASSWORD is set but empty; set it to the password or unset it")
        return os.environ["CAS_PASSWORD"].encode()
    if not sys.stdin.isatty():
        raise UsageError(
            "no password given: set CAS_PASSWORD or CAS_PASSWORD_FILE, or pass "
            "--password-file or --password-command"
        )
    password = getpass.getpass("repository password: ").encode()
    if confirm and getpass.getpass("repeat password: ").encode() != password:
        raise UsageError("the two passwords differ; nothing was created")
    return password


def _strip_newline(data: bytes) -> bytes:
    password = data.rstrip(b"\r\n")
    if not password:
        raise UsageError("the password is empty")
    return password


# Commands that a write-only key may run. Every other command reads snapshots,
# trees or chunks, or deletes data, so `open_repository` rejects a write-only key
# for it before it does anything. Commands added later are rejected by default.
WRITE_ONLY_COMMANDS = frozenset({"snapshot", "log", "key", "unlock", "watch"})


def open_repository(args: argparse.Namespace) -> Repository:
    """Open the repository named by the global options.

    Raises `WriteOnlyKeyError` when the password opens a write-only key and the
    command is not in `WRITE_ONLY_COMMANDS`.
    """
    repo = Repository.open(repo_url(args), read_password(args), cache_dir=cache_dir(args))
    command = getattr(args, "command", None)
    if repo.keys.write_only and command not in WRITE_ONLY_COMMANDS:
        repo.close()
        raise WriteOnlyKeyError.for_action(f"run `cas {command}`, which reads or deletes data")
    return repo


def print_json(value: Any) -> None:
    """Print one JSON document on stdout."""
    json.dump(value, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def plural(count: int, noun: str) -> str:
    """Return ``count`` and ``noun``, with an "s" unless the count is 1: "1 file", "2 files"."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_size(size: float) -> str:
    """Return a size in B, KiB, MiB, GiB or TiB with one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def info(args: argparse.Namespace, message: str) -> None:
    """Print a human summary line to stdout unless --json or --quiet."""
    if not args.json and not args.quiet:
        print(message)
