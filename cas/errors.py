"""The error classes of `cas`.

Every error that the library raises on purpose derives from `CasError`, so a
caller can catch by meaning whatever the backend or the operation. The command
line maps each class to an exit code; the library never exits.
"""

from __future__ import annotations


class CasError(Exception):
    """Root of every error that `cas` raises on purpose."""


class UsageError(CasError):
    """An argument or option is invalid, or an operation was refused."""


class NotFoundError(CasError):
    """A repository, object, snapshot or path does not exist."""


class AlreadyExistsError(CasError):
    """An object or repository that must be new already exists."""


class AmbiguousNameError(UsageError):
    """A snapshot prefix matches more than one snapshot."""


class WrongPasswordError(CasError):
    """No key object of the repository opens with the given password."""


class IntegrityError(CasError):
    """Stored data failed authentication, a size bound, or a structural check."""


class UnsupportedFormatError(CasError):
    """The repository or an object uses a format version this `cas` cannot read."""


class LockedError(CasError):
    """The repository is locked by another operation that conflicts with this one."""


class BackendError(CasError):
    """The storage below the repository failed to read, write, list or delete."""


class NoSpaceError(BackendError):
    """The storage has no space left for a write."""


class WriteOnlyKeyError(UsageError):
    """The operation needs to read data, but the key can only write."""

    @classmethod
    def for_action(cls, action: str) -> WriteOnlyKeyError:
        """Return the error for a refused ``action``, such as ``"check out snapshots"``."""
        return cls(
            f"this key is write-only: it can add snapshots but cannot {action}; open the "
            f"repository with a full key (the owner's password) for that"
        )


class VerificationFailedError(CasError):
    """A user's verification command failed on restored files."""


class TargetWriteError(CasError):
    """Files of a checkout could not be written into the target folder (full, not writable)."""
