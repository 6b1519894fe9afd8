"""Backends: where a repository's objects live.

`open_backend` turns a repository URL into a backend: a plain path or a
``file://`` URL is a local folder.
"""

from __future__ import annotations

from urllib.parse import urlparse

from cas.backend.base import Backend, ObjectInfo, validate_name
from cas.backend.local import LocalBackend
from cas.errors import UsageError

__all__ = ["Backend", "LocalBackend", "ObjectInfo", "open_backend", "validate_name"]


def open_backend(url: str) -> Backend:
    """Return the backend for a repository URL (a path or ``file://PATH``)."""
    if not url:
        raise UsageError("no repository given: pass -r/--repo or set CAS_REPOSITORY")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBackend(parsed.path)
    if parsed.scheme in ("", "/") or len(parsed.scheme) == 1:
        return LocalBackend(url)
    raise UsageError(f"unsupported repository URL {url!r}: use a folder path or file://PATH")
