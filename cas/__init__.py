"""cas: a content-addressed, deduplicating, encrypted store for model files.

The Python API mirrors the command line::

    import cas

    with cas.Repository.open("/backup/models", password_file="pw.txt") as repo:
        result = repo.snapshot("ckpt/", tags=["run-7"], message="step 12000")
        repo.checkout(result.snapshot, "restore/")

`Repository` (from `cas.api`) opens or creates a repository and takes, lists
and restores snapshots. Results are frozen dataclasses (`SnapshotResult`,
`Snapshot`, `CheckoutResult`) and every error is a subclass of `CasError`
(see `cas.errors`). The names below are imported on first use, so
``import cas`` stays cheap. docs/python-api.md describes the API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "Repository": "cas.api",
    "read_password": "cas.api",
    "SnapshotResult": "cas.archiver",
    "SnapshotProgress": "cas.archiver",
    "CheckoutResult": "cas.restorer",
    "CheckoutProgress": "cas.restorer",
    "Snapshot": "cas.snapshot",
    "SnapshotDiff": "cas.diff",
    "FileChange": "cas.diff",
    "TensorChange": "cas.diff",
    "CasError": "cas.errors",
    "UsageError": "cas.errors",
    "NotFoundError": "cas.errors",
    "AlreadyExistsError": "cas.errors",
    "WrongPasswordError": "cas.errors",
    "IntegrityError": "cas.errors",
    "LockedError": "cas.errors",
    "BackendError": "cas.errors",
    "TargetWriteError": "cas.errors",
    "WriteOnlyKeyError": "cas.errors",
}

__all__ = [
    "AlreadyExistsError",
    "BackendError",
    "CasError",
    "CheckoutProgress",
    "CheckoutResult",
    "FileChange",
    "IntegrityError",
    "LockedError",
    "NotFoundError",
    "Repository",
    "Snapshot",
    "SnapshotDiff",
    "SnapshotProgress",
    "SnapshotResult",
    "TargetWriteError",
    "TensorChange",
    "UsageError",
    "WriteOnlyKeyError",
    "WrongPasswordError",
    "__version__",
    "read_password",
]

if TYPE_CHECKING:
    from cas.api import Repository, read_password
    from cas.archiver import SnapshotProgress, SnapshotResult
    from cas.diff import FileChange, SnapshotDiff, TensorChange
    from cas.errors import (
        AlreadyExistsError,
        BackendError,
        CasError,
        IntegrityError,
        LockedError,
        NotFoundError,
        TargetWriteError,
        UsageError,
        WriteOnlyKeyError,
        WrongPasswordError,
    )
    from cas.restorer import CheckoutProgress, CheckoutResult
    from cas.snapshot import Snapshot


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cas' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
