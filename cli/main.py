"""The `cas` entry point: parse arguments, run a command, map errors to exit codes.

Exit codes: 0 success, 1 finished with warnings, 2 usage or operational
error (including refused operations), 3 integrity error found, 4 wrong
password, 5 repository locked, 6 a user's verification command failed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from typing import NoReturn

from cas import __version__
from cas.errors import (
    CasError,
    IntegrityError,
    LockedError,
    VerificationFailedError,
    WrongPasswordError,
)

from . import (
    cmd_check,
    cmd_checkout,
    cmd_copy,
    cmd_debug,
    cmd_diff,
    cmd_dump,
    cmd_find,
    cmd_gc,
    cmd_init,
    cmd_key,
    cmd_log,
    cmd_ls,
    cmd_prune,
    cmd_repair,
    cmd_snapshot,
    cmd_stats,
    cmd_tag,
    cmd_unlock,
    cmd_watch,
)
from .context import add_global_options, print_json

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_EXIT_CODES: list[tuple[type[CasError], int]] = [
    (IntegrityError, 3),
    (WrongPasswordError, 4),
    (LockedError, 5),
    (VerificationFailedError, 6),
]
_COMMANDS = [
    cmd_init,
    cmd_snapshot,
    cmd_log,
    cmd_tag,
    cmd_find,
    cmd_ls,
    cmd_checkout,
    cmd_dump,
    cmd_copy,
    cmd_diff,
    cmd_stats,
    cmd_check,
    cmd_repair,
    cmd_prune,
    cmd_gc,
    cmd_unlock,
    cmd_key,
    cmd_watch,
    cmd_debug,
]


_PARSER_ATTRIBUTE = "_innermost_parser"


class _Parser(argparse.ArgumentParser):
    """An argument parser that also reports a usage error as the JSON document under --json."""

    json_requested = False

    def error(self, message: str) -> NoReturn:
        """Print the error (as JSON too when --json was given) and exit with code 2."""
        if _Parser.json_requested:
            print_json({"error": f"{self.prog}: {message}", "exit_code": EXIT_ERROR})
        super().error(message)

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse, and record on the result the innermost parser that ran.

        A subcommand's parser runs inside its parent's and finishes first, so the first
        parser to record itself is the one of the command given, as in ``cas key add``.
        """
        parsed, extras = super().parse_known_args(args, namespace)
        if not hasattr(parsed, _PARSER_ATTRIBUTE):
            setattr(parsed, _PARSER_ATTRIBUTE, self)
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every command."""
    parser = _Parser(prog="cas", description="Deduplicating, encrypted snapshots of model files.")
    parser.add_argument("--version", action="version", version=f"cas {__version__}")
    parser.add_argument("--verbose", "-v", action="count", default=0, help="log more (repeatable)")
    add_global_options(parser, suppress=False)
    parent = _Parser(add_help=False)
    add_global_options(parent, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(commands, parent)
    return parser


def exit_code_of(error: CasError) -> int:
    """Return the exit code for an error class."""
    for kind, code in _EXIT_CODES:
        if isinstance(error, kind):
            return code
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    _Parser.json_requested = "--json" in (sys.argv[1:] if argv is None else argv)
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        # Reported by the command's own parser, so the usage shown is that command's.
        getattr(args, _PARSER_ATTRIBUTE).error(f"unrecognized arguments: {' '.join(unknown)}")
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s: %(message)s")
    # SIGTERM (systemd, kill, a job scheduler) unwinds like Ctrl-C, so locks
    # are released and temporary files removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code: int = args.run(args)
    except CasError as error:
        print(f"cas: {error}", file=sys.stderr)
        return _fail(args, exit_code_of(error), str(error))
    except KeyboardInterrupt:
        print("cas: interrupted", file=sys.stderr)
        return _fail(args, EXIT_INTERRUPTED, "interrupted")
    except BrokenPipeError:
        # The reader of stdout went away (`cas log | head`): not an error of cas.
        sys.stderr.close()
        return code_on_broken_pipe()
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _fail(args: argparse.Namespace, code: int, message: str) -> int:
    """Return ``code``; with --json, first print the error as the one JSON document."""
    if getattr(args, "json", False):
        print_json({"error": message, "exit_code": code})
    return code


def code_on_broken_pipe() -> int:
    """Silence the interpreter's flush of a closed stdout and return success."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
