"""`cas watch DIR`: snapshot a folder each time a checkpoint in it is complete, until stopped."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from cas.codecs import LEGACY_COMPRESSION
from cas.errors import CasError
from cas.watch import Watcher, WatchEvent, WatchOptions

from .context import human_size, open_repository, plural
from .snapshot_options import add_snapshot_options, snapshot_compression, snapshot_options


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "watch",
        parents=[parent],
        help="snapshot a folder whenever its files stop changing or a marker file appears",
    )
    parser.add_argument("dir", metavar="DIR", help="folder to watch")
    trigger = parser.add_mutually_exclusive_group()
    trigger.add_argument(
        "--settle",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="snapshot DIR once every file has kept its size and mtime this long (default 5)",
    )
    trigger.add_argument(
        "--marker",
        default="",
        metavar="NAME",
        help="snapshot the folder of each new or rewritten file named NAME (such as DONE), "
        "and ignore other changes",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between two looks at the files (default 1)",
    )
    parser.add_argument(
        "--retry-after",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="after a failed snapshot, try again this much later even if no file changed "
        "(default 60)",
    )
    parser.add_argument(
        "--once", action="store_true", help="take one snapshot when complete, then exit"
    )
    add_snapshot_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Watch until SIGINT or SIGTERM (or one snapshot with --once); exit 0 when stopped."""
    options = WatchOptions(
        settle=args.settle,
        marker=args.marker,
        interval=args.interval,
        once=args.once,
        retry_after=args.retry_after,
    )
    options.validate()
    stored = snapshot_options(args)
    # Parsed before the repository opens, so a typo costs no password prompt.
    snapshot_compression(args, LEGACY_COMPRESSION)
    _timestamp_logs()
    stop = threading.Event()
    with _stop_on_signals(stop), open_repository(args) as repo:
        stored.compression = snapshot_compression(args, repo.config.compression)
        watcher = Watcher(repo, args.dir, options, stored, lambda event: _report(args, event), stop)
        watcher.run()
    return 0


def _report(args: argparse.Namespace, event: WatchEvent) -> None:
    """Print an event: a line on stderr and, with --json, one JSON line on stdout."""
    if args.json:
        sys.stdout.write(json.dumps(_event_json(event)) + "\n")
        sys.stdout.flush()
    result = event.result
    if result is not None:
        for warning in result.warnings:
            print(f"{event.time} warning: {warning}", file=sys.stderr)
    if args.quiet or event.kind == "error":
        # The watcher logs each error itself.
        return
    if result is not None:
        message = (
            f"snapshot {result.snapshot.snapshot_hex[:16]} of {event.path}: {result.files} "
            f"files, {human_size(result.bytes_read)} read, {human_size(result.bytes_added)} added"
        )
    elif event.kind == "start":
        message = f"watching {event.path}"
    else:
        message = f"stopped watching {event.path} after {plural(event.snapshot_count, 'snapshot')}"
    print(f"{event.time} {message}", file=sys.stderr, flush=True)


def _event_json(event: WatchEvent) -> dict[str, object]:
    data: dict[str, object] = {"event": event.kind, "time": event.time, "path": event.path}
    result = event.result
    if result is not None:
        data.update(
            {
                "id": result.snapshot.snapshot_hex,
                "files": result.files,
                "unchanged_files": result.unchanged_files,
                "bytes_read": result.bytes_read,
                "bytes_added": result.bytes_added,
                "bytes_total": result.bytes_total,
                "new_chunks": result.new_chunks,
                "seconds": round(result.seconds, 3),
                "warnings": list(result.warnings),
            }
        )
    if event.error is not None:
        data["error"] = str(event.error)
        data["exit_code"] = _exit_code(event.error)
    if event.kind == "stop":
        data["snapshots"] = event.snapshot_count
    return data


def _exit_code(error: Exception) -> int:
    """Return the exit code a command would end with on ``error``."""
    from .main import EXIT_ERROR, exit_code_of

    return exit_code_of(error) if isinstance(error, CasError) else EXIT_ERROR


def _timestamp_logs() -> None:
    """Put the time in front of each log line, for a process that runs for days."""
    formatter = logging.Formatter("%(asctime)s %(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Make the first SIGINT or SIGTERM set ``stop``, and a second one interrupt at once."""

    def handle(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        print(
            f"cas watch: {signal.Signals(signum).name} received; stopping after the current "
            f"snapshot (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
