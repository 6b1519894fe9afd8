"""`cas key add|list|remove|passwd|export|import`: manage the passwords of a repository."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from cas.backend import open_backend
from cas.errors import AlreadyExistsError, UsageError
from cas.keyring import (
    KeyEntry,
    add_key,
    change_password,
    export_keys,
    import_keys,
    list_keys,
    remove_key,
)
from cas.keys import KeyInfo

from .cmd_unlock import add_wait_option
from .context import info, open_repository, print_json, repo_url

# The export is read whole; `cas.keyring.MAX_EXPORT_SIZE` bounds what it parses.
_MAX_EXPORT_FILE_SIZE = 1 << 20


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser and its subcommands."""
    parser = commands.add_parser("key", parents=[parent], help="manage keys and passwords")
    actions = parser.add_subparsers(dest="key_command", required=True, metavar="ACTION")

    add = actions.add_parser("add", parents=[parent], help="add a key with a new password")
    _add_new_password_options(add)
    add.add_argument(
        "--write-only",
        action="store_true",
        help="the new key can add snapshots but cannot read or delete anything",
    )
    add.set_defaults(run=run_add)

    listing = actions.add_parser("list", parents=[parent], help="list the keys")
    listing.set_defaults(run=run_list)

    remove = actions.add_parser("remove", parents=[parent], help="remove a key")
    remove.add_argument("key_id", metavar="KEY_ID", help="key id or a unique prefix of it")
    add_wait_option(remove)
    remove.set_defaults(run=run_remove)

    passwd = actions.add_parser(
        "passwd", parents=[parent], help="change the password of the key in use"
    )
    _add_new_password_options(passwd, labels=False)
    passwd.set_defaults(run=run_passwd)

    export = actions.add_parser(
        "export", parents=[parent], help="print the master keys for a copy kept offline"
    )
    export.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        default=None,
        help="write to FILE (mode 0600, must be new)",
    )
    export.set_defaults(run=run_export)

    imported = actions.add_parser(
        "import", parents=[parent], help="add a key with a new password from an export"
    )
    imported.add_argument("file", metavar="FILE", help="a file that `cas key export` wrote")
    _add_new_password_options(imported)
    imported.set_defaults(run=run_import)


def _add_new_password_options(parser: argparse.ArgumentParser, labels: bool = True) -> None:
    parser.add_argument(
        "--new-password-file",
        metavar="FILE",
        default=None,
        help="read the new password from FILE (default: ask twice at a prompt)",
    )
    if labels:
        parser.add_argument("--user", default=None, help="user label (default: login name)")
        parser.add_argument("--host", default=None, help="host label (default: host name)")
    add_wait_option(parser)


def read_new_password(args: argparse.Namespace) -> bytes:
    """Return the new password from --new-password-file, or from a prompt asked twice."""
    if args.new_password_file:
        try:
            password = Path(args.new_password_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(
                f"cannot read --new-password-file {args.new_password_file}: {exc.strerror}"
            ) from None
        if not password:
            raise UsageError(f"--new-password-file {args.new_password_file} is empty")
        return password
    if not sys.stdin.isatty():
        raise UsageError(
            "no new password given: pass --new-password-file FILE or run in a terminal"
        )
    password = getpass.getpass("new password: ").encode()
    if not password:
        raise UsageError("the new password is empty; nothing was changed")
    if getpass.getpass("repeat new password: ").encode() != password:
        raise UsageError("the two new passwords differ; nothing was changed")
    return password


def key_json(key: KeyInfo, in_use: bool = False) -> dict[str, object]:
    """Return a key's public fields as its JSON object."""
    return {
        "id": key.key_hex,
        "user": key.user,
        "host": key.host,
        "created": key.created,
        "write_only": key.write_only,
        "in_use": in_use,
    }


def run_add(args: argparse.Namespace) -> int:
    """Add a full or write-only key."""
    password = read_new_password(args)
    with open_repository(args) as repo:
        key = add_key(
            repo,
            password,
            write_only=args.write_only,
            user=args.user,
            host=args.host,
            wait=args.wait,
        )
    if args.json:
        print_json(key_json(key))
    kind = "write-only" if key.write_only else "full"
    info(args, f"added {kind} key {key.key_hex[:16]} for {key.user}@{key.host}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    """List the key objects; the one in use is marked with `*`."""
    with open_repository(args) as repo:
        entries = list_keys(repo)
    if args.json:
        print_json([_entry_json(entry) for entry in entries])
        return 0
    for entry in entries:
        print(_entry_line(entry))
    return 0


def _entry_json(entry: KeyEntry) -> dict[str, object]:
    if entry.info is None:
        return {"id": entry.key_hex, "in_use": entry.in_use, "error": entry.problem}
    return key_json(entry.info, entry.in_use)


def _entry_line(entry: KeyEntry) -> str:
    marker = "*" if entry.in_use else " "
    if entry.info is None:
        return f"{marker} {entry.key_hex[:16]}  unreadable: {entry.problem}"
    kind = "write-only" if entry.info.write_only else "full"
    who = f"{entry.info.user}@{entry.info.host}"
    return f"{marker} {entry.key_hex[:16]}  {kind:10}  {entry.info.created[:19]}  {who}"


def run_remove(args: argparse.Namespace) -> int:
    """Remove one key object."""
    with open_repository(args) as repo:
        key = remove_key(repo, args.key_id, wait=args.wait)
        in_use = key.name == repo.key_name
    if args.json:
        print_json(key_json(key, in_use))
    info(args, f"removed key {key.key_hex[:16]}")
    if in_use and not args.quiet:
        print(
            "note: that was the key in use; its password no longer opens the repository",
            file=sys.stderr,
        )
    return 0


def run_passwd(args: argparse.Namespace) -> int:
    """Replace the key in use by a key with a new password."""
    password = read_new_password(args)
    with open_repository(args) as repo:
        old_name = repo.key_name
        key = change_password(repo, password, wait=args.wait)
    if args.json:
        print_json({**key_json(key, True), "replaced": (old_name or "").removeprefix("keys/")})
    info(args, f"changed the password: key {key.key_hex[:16]} replaces the old key")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Print or write the armored master keys."""
    with open_repository(args) as repo:
        text = export_keys(repo)
        repo_hex = repo.config.repo_id.hex()
    if args.output is None:
        if args.json:
            print_json({"repository": repo_hex, "export": text})
        else:
            sys.stdout.write(text)
        return 0
    _write_new_private_file(args.output, text)
    if args.json:
        print_json({"repository": repo_hex, "file": str(Path(args.output).resolve())})
    info(args, f"wrote the master keys of repository {repo_hex[:16]} to {args.output}")
    return 0


def _write_new_private_file(path: str, text: str) -> None:
    """Create ``path`` with mode 0600 and write ``text``; never replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AlreadyExistsError(
            f"-o {path} already exists; choose a new file name, an export never overwrites"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot create -o {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def run_import(args: argparse.Namespace) -> int:
    """Add a key with a new password for the key material of an export file."""
    try:
        with open(args.file, "rb") as handle:
            data = handle.read(_MAX_EXPORT_FILE_SIZE + 1)
    except OSError as exc:
        raise UsageError(f"cannot read key export {args.file}: {exc.strerror}") from None
    if len(data) > _MAX_EXPORT_FILE_SIZE:
        raise UsageError(f"invalid key export {args.file}: over 1 MiB, not an export")
    text = data.decode("utf-8", errors="replace")
    password = read_new_password(args)
    backend = open_backend(repo_url(args))
    try:
        key = import_keys(
            backend, text, args.file, password, user=args.user, host=args.host, wait=args.wait
        )
    finally:
        backend.close()
    if args.json:
        print_json(key_json(key))
    kind = "write-only" if key.write_only else "full"
    info(args, f"imported the key material as {kind} key {key.key_hex[:16]}")
    return 0
