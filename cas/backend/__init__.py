"""Backends: where a repository's objects live.

`open_backend` turns a repository URL into a backend: a plain path or a ``file://`` URL is a
local folder, ``s3://BUCKET/PREFIX`` a prefix in an S3 bucket.
"""

from __future__ import annotations

from urllib.parse import urlparse

from cas.backend.base import Backend, ObjectInfo, validate_name
from cas.backend.local import LocalBackend
from cas.errors import UsageError

__all__ = ["Backend", "LocalBackend", "ObjectInfo", "open_backend", "validate_name"]

_ACCEPTED_FORMS = "a folder path, file://PATH or s3://BUCKET/PREFIX"


def open_backend(url: str, s3_endpoint: str | None = None) -> Backend:
    """Return the backend for a repository URL.

    ``s3_endpoint`` is the endpoint URL of an S3-compatible server for ``s3://`` URLs. When it
    is None, the S3 backend reads ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, and without
    those it uses Amazon S3.
    """
    if not url:
        raise UsageError("no repository given: pass -r/--repo or set CAS_REPOSITORY")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalBackend(parsed.path)
    if parsed.scheme == "s3":
        # Imported here so that local repositories work without loading boto3 (about 0.3 s).
        from cas.backend.s3 import S3Backend, parse_s3_url

        location = parse_s3_url(url)
        return S3Backend(location.bucket, location.prefix, endpoint_url=s3_endpoint)
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return LocalBackend(url)
    raise UsageError(f"unsupported repository URL {url!r}: use {_ACCEPTED_FORMS}")
