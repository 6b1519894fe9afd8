"""Check that restored model files are usable: headers that agree with the files, a smoke test.

`verify_models` parses every model file below a folder. A file counts as a model file when
its first bytes match a known format or its name ends in ``.safetensors``, ``.gguf`` or
``.npz``. The parsers check that every tensor's dtype and shape give its byte size and that
every range lies inside the file without overlaps. For safetensors this module also checks,
as the safetensors library does when it loads a file, that the tensors fill the data area
exactly. Files ending in ``.pt``, ``.pth``, ``.bin`` or ``.ckpt`` that are not zip files
(pickles of PyTorch before 1.6, other binaries) are not model files here and are skipped.

`run_test_command` runs a user's command in a shell, in the restored folder.
"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from dataclasses import dataclass
from typing import IO

from cas.models import MODEL_SUFFIXES, ModelFormatError, ModelLayout, parse_file

log = logging.getLogger(__name__)

CHECKOUT_DIR_VARIABLE = "CAS_CHECKOUT_DIR"
"""Environment variable that contains the restored folder's absolute path for a test command."""

# Endings that promise a format; .pt, .pth, .bin and .ckpt also name legacy pickles.
_STRICT_SUFFIXES = {".safetensors", ".gguf", ".npz"}


@dataclass(frozen=True)
class ModelCheck:
    """The result for one model file: ``error`` is empty when the file passed."""

    path: str
    format: str
    tensor_count: int
    error: str = ""


def verify_models(root: str) -> list[ModelCheck]:
    """Parse every model file below ``root`` and return one check per file, sorted by path.

    Symbolic links are not followed.
    """
    checks: list[ModelCheck] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            check = _check_file(path, os.path.relpath(path, root))
            if check is not None:
                checks.append(check)
    log.info(
        "verified %d model files below %s, %d failed",
        len(checks),
        root,
        sum(1 for check in checks if check.error),
    )
    return checks


def _check_file(path: str, shown: str) -> ModelCheck | None:
    suffix = os.path.splitext(path)[1].lower()
    expected = MODEL_SUFFIXES.get(suffix, "")
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        layout = parse_file(path)
    except ModelFormatError as exc:
        return ModelCheck(shown, expected, 0, str(exc))
    except OSError as exc:
        return ModelCheck(shown, expected, 0, f"cannot read: {exc.strerror}")
    if layout is None:
        if suffix in _STRICT_SUFFIXES:
            return ModelCheck(shown, expected, 0, f"does not start like a {expected} file")
        return None
    error = _check_layout(layout, expected, suffix)
    return ModelCheck(shown, layout.format, len(layout.tensors), error)


def _check_layout(layout: ModelLayout, expected: str, suffix: str) -> str:
    if suffix in _STRICT_SUFFIXES and layout.format != expected:
        return f"named {suffix} but it is a {layout.format} file"
    if layout.format != "safetensors":
        return ""
    position = layout.header_regions[0].end
    for tensor in layout.tensors:
        if tensor.offset != position:
            return f"tensor {tensor.name!r} starts at {tensor.offset}, not at {position}"
        position = tensor.end
    if position != layout.file_size:
        return f"tensor data ends at {position}, but the file has {layout.file_size} bytes"
    return ""


def run_test_command(command: str, folder: str, stdout: IO[str] | None = None) -> int:
    """Run ``command`` with ``/bin/sh -c`` in ``folder`` and return its exit status.

    The command's working directory is ``folder`` and the environment variable
    `CHECKOUT_DIR_VARIABLE` contains its absolute path. Its standard input is empty and
    its standard output goes to ``stdout`` (the caller's standard output when None).
    A command killed by a signal returns 128 plus the signal number, as shells report it.
    """
    absolute = os.path.abspath(folder)
    env = {**os.environ, CHECKOUT_DIR_VARIABLE: absolute}
    log.info("running the test command %r in %s", command, absolute)
    try:
        completed = subprocess.run(
            command, shell=True, cwd=absolute, env=env, stdin=subprocess.DEVNULL, stdout=stdout
        )
    except OSError as exc:
        # The shell itself could not start; shells report a command they cannot run as 127.
        log.error("cannot run the test command %r: %s", command, exc)
        return 127
    code = completed.returncode
    return 128 - code if code < 0 else code
