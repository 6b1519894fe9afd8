"""`cas copy --to REPO [SNAPSHOT...]`: copy snapshots into another repository."""

from __future__ import annotations

import argparse
import getpass
import os
import subprocess
import sys
from pathlib import Path

from cas.copy import Copier
from cas.errors import UsageError
from cas.repository import Repository

from .context import cache_dir, human_size, info, open_repository, plural, print_json


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "copy",
        parents=[parent],
        help="copy snapshots into another repository, sending only the blobs it lacks",
    )
    parser.add_argument(
        "snapshots",
        nargs="*",
        metavar="SNAPSHOT",
        help="snapshot ids, unique prefixes or 'latest' (default: every snapshot)",
    )
    parser.add_argument("--to", required=True, metavar="REPO", help="target repository path or URL")
    parser.add_argument(
        "--to-password-file", default=None, help="read the target's password from this file"
    )
    parser.add_argument(
        "--to-password-command",
        default=None,
        help="run this shell command and use its output as the target's password",
    )
    parser.add_argument(
        "--to-cache-dir",
        default=None,
        help="local cache folder of the target (default: --cache-dir)",
    )
    parser.set_defaults(run=run)


def read_other_password(
    repository: str, password_file: str | None, command: str | None, env_name: str, prefix: str
) -> bytes:
    """Return the password of a second repository: command, file, environment, then prompt.

    ``prefix`` starts the names of its options, such as ``--to`` for ``--to-password-file``.
    """
    if command:
        result = subprocess.run(command, shell=True, capture_output=True, check=False)
        if result.returncode != 0:
            raise UsageError(
                f"password command of the {repository} failed with exit code {result.returncode}"
            )
        return _strip_newline(result.stdout, repository)
    if password_file:
        try:
            return _strip_newline(Path(password_file).read_bytes(), repository)
        except OSError as exc:
            raise UsageError(f"cannot read password file {password_file}: {exc.strerror}") from None
    if env_name in os.environ:
        return os.environ[env_name].encode()
    if not sys.stdin.isatty():
        raise UsageError(
            f"no password given for the {repository}: set {env_name}, or pass "
            f"{prefix}-password-file FILE or {prefix}-password-command CMD"
        )
    return getpass.getpass(f"password of the {repository}: ").encode()


def _strip_newline(data: bytes, repository: str) -> bytes:
    password = data.rstrip(b"\r\n")
    if not password:
        raise UsageError(f"the password of the {repository} is empty")
    return password


def run(args: argparse.Namespace) -> int:
    """Copy the snapshots and print a summary."""
    password = read_other_password(
        "target repository",
        args.to_password_file,
        args.to_password_command,
        "CAS_TO_PASSWORD",
        "--to",
    )
    target_cache = Path(args.to_cache_dir) if args.to_cache_dir else cache_dir(args)
    with (
        open_repository(args) as source,
        Repository.open(args.to, password, cache_dir=target_cache) as target,
    ):
        copier = Copier(source, target)
        result = copier.run(copier.select(args.snapshots))
    if args.json:
        print_json(
            {
                "shared_ids": result.shared_ids,
                "snapshots_copied": len(result.copied),
                "snapshots_skipped": len(result.skipped),
                "blobs_copied": result.blobs_copied,
                "bytes_added": result.bytes_added,
                "copied": [{"source": src, "target": dst} for src, dst in result.copied],
                "skipped": [{"source": src, "target": dst} for src, dst in result.skipped],
            }
        )
    info(
        args,
        f"copied {plural(len(result.copied), 'snapshot')} "
        f"({len(result.skipped)} already in the target): "
        f"{plural(result.blobs_copied, 'blob')}, {human_size(result.bytes_added)} added",
    )
    return 0
