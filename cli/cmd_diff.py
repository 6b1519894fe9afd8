"""`cas diff A B`: list the files, and the tensors in model files, that differ between snapshots."""

from __future__ import annotations

import argparse
import os

from cas.diff import FileChange, SnapshotDiff, TensorChange, diff_snapshots

from .cmd_ls import printable
from .context import human_size, open_repository, print_json

_MARKS = {"added": "+", "removed": "-", "changed": "M"}
_TENSOR_MARKS = {"added": "+", "removed": "-", "changed": "~"}


def register(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    """Add the command's parser."""
    parser = commands.add_parser(
        "diff", parents=[parent], help="list files and tensors that differ between two snapshots"
    )
    parser.add_argument("old", metavar="A", help="old snapshot: id, unique prefix, or 'latest'")
    parser.add_argument("new", metavar="B", help="new snapshot: id, unique prefix, or 'latest'")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Compare the two snapshots and print each difference."""
    with open_repository(args) as repo:
        old = repo.resolve_snapshot(args.old)
        new = repo.resolve_snapshot(args.new)
        diff = diff_snapshots(repo, old, new)
    if args.json:
        print_json(diff_json(diff))
        return 0
    for change in diff.files:
        print(_file_line(change))
        for tensor in change.tensors:
            print(_tensor_line(tensor))
        if change.tensor_error:
            print(f"    tensors not compared: {change.tensor_error}")
    if not args.quiet:
        print(
            f"{diff.count('added')} added, {diff.count('removed')} removed, "
            f"{diff.count('changed')} changed"
        )
    return 0


def diff_json(diff: SnapshotDiff) -> dict[str, object]:
    """Return the JSON document of a diff."""
    return {
        "old": diff.old.snapshot_hex,
        "new": diff.new.snapshot_hex,
        "added": diff.count("added"),
        "removed": diff.count("removed"),
        "changed": diff.count("changed"),
        "bytes_read": diff.bytes_read,
        "files": [_file_json(change) for change in diff.files],
    }


def _file_json(change: FileChange) -> dict[str, object]:
    return {
        "path": printable(os.fsencode(change.path)),
        "change": change.change,
        "type": change.type or None,
        "old_type": change.old_type or None,
        "size": change.size if change.type else None,
        "old_size": change.old_size if change.old_type else None,
        "mode": f"{change.mode:04o}" if change.type else None,
        "old_mode": f"{change.old_mode:04o}" if change.old_type else None,
        "content_changed": change.content_changed,
        "format": change.format or None,
        "tensors": [_tensor_json(tensor) for tensor in change.tensors],
        "tensor_error": change.tensor_error or None,
    }


def _tensor_json(tensor: TensorChange) -> dict[str, object]:
    document: dict[str, object] = {
        "name": tensor.name,
        "change": tensor.change,
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "size": tensor.size,
    }
    if tensor.change == "changed":
        document.update(
            old_dtype=tensor.old_dtype, old_shape=list(tensor.old_shape), old_size=tensor.old_size
        )
    return document


def _file_line(change: FileChange) -> str:
    path = printable(os.fsencode(change.path))
    line = f"{_MARKS[change.change]} {path}"
    if change.change == "added":
        return f"{line}  ({change.type}, {human_size(change.size)})"
    if change.change == "removed":
        return f"{line}  ({change.old_type}, {human_size(change.old_size)})"
    notes = []
    if change.type != change.old_type:
        notes.append(f"type {change.old_type} -> {change.type}")
    if change.mode != change.old_mode:
        notes.append(f"mode {change.old_mode:04o} -> {change.mode:04o}")
    if change.content_changed and change.type == change.old_type:
        notes.append(f"content, {human_size(change.old_size)} -> {human_size(change.size)}")
    if change.format:
        count = len(change.tensors)
        notes.append(
            f"{change.format}, {count} {'tensor differs' if count == 1 else 'tensors differ'}"
        )
    return f"{line}  ({'; '.join(notes)})"


def _tensor_line(tensor: TensorChange) -> str:
    shape = "x".join(map(str, tensor.shape)) or "scalar"
    line = f"    {_TENSOR_MARKS[tensor.change]} {tensor.name}  {tensor.dtype} {shape}"
    if tensor.change == "changed" and (tensor.old_dtype, tensor.old_shape) != (
        tensor.dtype,
        tensor.shape,
    ):
        old_shape = "x".join(map(str, tensor.old_shape)) or "scalar"
        line += f" (was {tensor.old_dtype} {old_shape})"
    return f"{line}, {tensor.size:,} bytes"
