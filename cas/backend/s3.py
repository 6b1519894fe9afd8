"""The S3 backend: objects in a bucket of Amazon S3 or of an S3-compatible server.

An object name becomes a key below the repository prefix, so ``s3://models/team-a`` stores
``data/3f/3f9a...`` under the key ``team-a/data/3f/3f9a...`` of the bucket ``models``.

Credentials come from boto3's usual sources (``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, the shared files, an instance role). The region
comes from the argument, ``AWS_REGION`` or ``AWS_DEFAULT_REGION``; the endpoint from the argument,
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``.

Writes never replace an object unless ``overwrite`` is set: a put sends ``If-None-Match: *``,
which makes the server reject the write with 412 Precondition Failed when the key exists. A
server that rejects the header switches the backend to a HEAD request before each put (see
`S3Backend.put` for the race that leaves). Objects larger than `MULTIPART_THRESHOLD` go up as
multipart uploads whose parts are sent in parallel.

botocore's own retries are off. Every request goes through `S3Backend._request`, which retries
throttling, 5xx responses, connection errors and truncated bodies with exponential backoff and
full jitter, bounded by `RetryPolicy`, and logs each retry at WARNING with the object name.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from cas.backend.base import Backend, ObjectInfo, validate_name
from cas.errors import AlreadyExistsError, BackendError, NotFoundError, UsageError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
# S3 accepts parts of 5 MiB to 5 GiB (except the last part) and at most 10,000 parts. 16 MiB parts
# split a default 32 MiB pack into two uploads in parallel and allow objects up to 156 GiB.
PART_SIZE = 16 * MiB
MULTIPART_THRESHOLD = PART_SIZE
PART_UPLOAD_THREADS = 4
CONNECT_TIMEOUT_SECONDS = 10
READ_TIMEOUT_SECONDS = 60
# Connections kept per client; more than the threads that archive or restore at once.
MAX_POOL_CONNECTIONS = 32

_THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
_TRANSIENT_CODES = _THROTTLING_CODES | {"RequestTimeout", "InternalError", "ServiceUnavailable"}
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "403",
    }
)
_MISSING_KEY_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CREDENTIAL_HINT = (
    "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, and AWS_SESSION_TOKEN "
    "for temporary credentials), and that they may use this bucket"
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a failed request is retried.

    The delay before retry ``n`` (1-based) is uniform in 0 .. ``min(max_delay, base_delay *
    2**(n-1))`` seconds ("full jitter"). No retry starts after ``time_limit`` seconds from the
    first attempt.
    """

    max_attempts: int = 6
    base_delay: float = 0.25
    max_delay: float = 8.0
    time_limit: float = 60.0


class _TruncatedBodyError(Exception):
    """A response body ended before the length the server announced or the range requested."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix, parsed from ``s3://BUCKET/PREFIX``."""

    bucket: str
    prefix: str


def parse_s3_url(url: str) -> S3Location:
    """Split ``s3://BUCKET[/PREFIX]`` into bucket and prefix; raise `UsageError` if malformed."""
    if not url.startswith("s3://"):
        raise UsageError(f"invalid S3 URL {url!r}: expected s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket:
        raise UsageError(f"invalid S3 URL {url!r}: the bucket name is missing (s3://BUCKET/PREFIX)")
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise UsageError(f"invalid S3 URL {url!r}: the prefix has an empty, '.' or '..' part")
    return S3Location(bucket, prefix)


class S3Backend(Backend):
    """Objects as keys below a prefix of one S3 bucket.

    Safe to use from several threads: the boto3 client is created once in the constructor and
    shared, as boto3 allows for clients (not for sessions).
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        conditional_put: bool = True,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.retry = retry or RetryPolicy()
        # False once the server rejected If-None-Match; puts then check with HEAD first.
        self.conditional_put = conditional_put
        self._key_base = f"{self.prefix}/" if self.prefix else ""
        self._client = _make_client(endpoint_url, region)
        self.endpoint = self._client.meta.endpoint_url
        self._part_pool = ThreadPoolExecutor(PART_UPLOAD_THREADS, thread_name_prefix="s3-part")
        self._bucket_seen = False

    def _key(self, name: str) -> str:
        return self._key_base + validate_name(name)

    # Requests, retries and error translation

    def _request(self, operation: str, name: str, send: Callable[[], T]) -> T:
        """Call ``send`` and retry transient failures; translate the final error to `CasError`."""
        policy = self.retry
        deadline = time.monotonic() + policy.time_limit
        attempt = 1
        while True:
            try:
                return send()
            except (ClientError, BotoCoreError, _TruncatedBodyError) as exc:
                ceiling = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
                delay = random.uniform(0, ceiling)
                last = attempt >= policy.max_attempts or time.monotonic() + delay > deadline
                if not _is_transient(exc) or last:
                    raise self._translate(exc, operation, name, attempt) from exc
                log.warning(
                    "S3 %s of %s failed (%s); retry %d of %d in %.2f s",
                    operation,
                    name,
                    _describe(exc),
                    attempt,
                    policy.max_attempts - 1,
                    delay,
                )
                time.sleep(delay)
                attempt += 1

    def _translate(self, exc: Exception, operation: str, name: str, attempts: int) -> Exception:
        """Return the `CasError` for a failed request that is not retried (any more)."""
        where = f"{self.url} at {self.endpoint}"
        if isinstance(exc, NoCredentialsError):
            return BackendError(f"no S3 credentials found for {where}: {_CREDENTIAL_HINT}")
        if not isinstance(exc, ClientError):
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            return BackendError(f"S3 {operation} of {name} in {where} failed{tries}: {exc}")
        code, status = _error_code(exc), _status(exc)
        if code == "NoSuchBucket":
            return self._bucket_missing_error()
        if code in _MISSING_KEY_CODES:
            return self._missing_object_error(name)
        if code == "NoSuchUpload":
            return NotFoundError(f"the multipart upload of {name} to {self.url} no longer exists")
        if code == "PreconditionFailed" or status == 412:
            return AlreadyExistsError(f"object {name} already exists in {self.url}")
        if code in _CREDENTIAL_CODES:
            return BackendError(
                f"the S3 server at {self.endpoint} rejected the credentials or denied access "
                f"({code}) for {operation} of {name} in bucket {self.bucket}: {_CREDENTIAL_HINT}"
            )
        message = exc.response.get("Error", {}).get("Message", "")
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return BackendError(
            f"S3 {operation} of {name} in {where} failed{tries}: {code} (HTTP {status}) {message}"
        )

    def _bucket_missing_error(self) -> NotFoundError:
        return _BucketNotFoundError(
            f"bucket {self.bucket} not found at {self.endpoint}: create the repository with "
            f"`cas -r {self.url} init`, or check the bucket name and the endpoint"
        )

    def _missing_object_error(self, name: str) -> NotFoundError:
        """Return the error for a 404: the bucket's if it is missing, else the object's.

        A HEAD response has no body, so a 404 there does not say which is missing; one HEAD of
        the bucket tells, and is skipped once the bucket has been seen.
        """
        if not self._bucket_seen and not self.location_exists():
            return self._bucket_missing_error()
        return NotFoundError(f"object {name} not found in {self.url}")

    # The Backend interface

    def location_exists(self) -> bool:
        """Return whether the bucket exists; raise `BackendError` if access is denied."""
        try:
            self._request("HEAD bucket", self.bucket, self._head_bucket)
        except _BucketNotFoundError:
            return False
        self._bucket_seen = True
        return True

    def _head_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _status(exc) == 404:
                raise self._bucket_missing_error() from exc
            raise

    def create_location(self) -> None:
        """Create the bucket; an existing bucket of the same owner is fine."""
        region = self._client.meta.region_name
        arguments: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            arguments["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._request("create bucket", self.bucket, lambda: self._create_bucket(arguments))
        except BackendError as exc:
            raise BackendError(
                f"could not create bucket {self.bucket} at {self.endpoint}: {exc}. Create the "
                f"bucket yourself, or use credentials that may create buckets"
            ) from exc
        log.info("created bucket %s at %s", self.bucket, self.endpoint)
        self._bucket_seen = True

    def _create_bucket(self, arguments: dict[str, Any]) -> None:
        try:
            self._client.create_bucket(**arguments)
        except ClientError as exc:
            if _error_code(exc) != "BucketAlreadyOwnedByYou":
                raise

    def put(
        self, name: str, data: bytes | bytearray | memoryview, *, overwrite: bool = False
    ) -> None:
        """Store ``data`` under ``name``; without ``overwrite`` an existing name raises.

        S3 makes a put visible whole or not at all, for single and multipart uploads alike.
        """
        key = self._key(name)
        view = memoryview(data).cast("B")
        if not overwrite and not self.conditional_put and self.exists(name):
            # NOTE: without If-None-Match support, a writer that puts the same name between
            # this HEAD and the PUT below is overwritten. Content-addressed names make both
            # writes the same bytes; lock objects are written with overwrite anyway.
            raise AlreadyExistsError(f"object {name} already exists in {self.url}")
        conditional = not overwrite and self.conditional_put
        try:
            if len(view) > MULTIPART_THRESHOLD:
                self._put_multipart(name, key, view, conditional)
            else:
                self._put_single(name, key, view, conditional)
        except _ConditionRejectedError:
            log.warning(
                "the S3 server at %s rejected If-None-Match; checking with HEAD before each put",
                self.endpoint,
            )
            self.conditional_put = False
            self.put(name, data, overwrite=overwrite)

    def _put_single(self, name: str, key: str, view: memoryview, conditional: bool) -> None:
        body = view.tobytes()
        attempts = 0

        def send() -> None:
            nonlocal attempts
            attempts += 1
            if conditional:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*")
            else:
                self._client.put_object(Bucket=self.bucket, Key=key, Body=body)

        self._send_conditional("PUT", name, send, view, lambda: attempts)

    def _send_conditional(
        self,
        operation: str,
        name: str,
        send: Callable[[], None],
        view: memoryview,
        attempts: Callable[[], int],
    ) -> None:
        """Send a write; a conflict after a retry is our own earlier attempt if the bytes match.

        A retried write whose first attempt reached the server but whose response was lost gets
        412 (or NoSuchUpload for a multipart completion). The stored object is then compared
        with ``view`` so that this write is not reported as a conflict with itself.
        """
        try:
            self._request(operation, name, lambda: _raise_if_condition_rejected(send))
        except (AlreadyExistsError, NotFoundError):
            if attempts() > 1 and self._stored_equals(name, view):
                log.warning("S3 %s of %s was stored by an earlier attempt", operation, name)
                return
            raise

    def _stored_equals(self, name: str, view: memoryview) -> bool:
        try:
            return self.get(name) == view
        except NotFoundError:
            return False

    def _put_multipart(self, name: str, key: str, view: memoryview, conditional: bool) -> None:
        """Upload ``view`` in `PART_SIZE` parts in parallel, then complete the upload."""
        created = self._request(
            "create multipart upload",
            name,
            lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=key),
        )
        upload_id = created["UploadId"]
        try:
            offsets = range(0, len(view), PART_SIZE)
            parts = list(
                self._part_pool.map(
                    lambda offset: self._upload_part(name, key, upload_id, view, offset), offsets
                )
            )
            self._complete_multipart(name, key, upload_id, parts, view, conditional)
        except BaseException:
            self._abort_multipart(name, key, upload_id)
            raise
        log.debug("uploaded %s in %d parts", name, len(parts))

    def _upload_part(
        self, name: str, key: str, upload_id: str, view: memoryview, offset: int
    ) -> CompletedPartTypeDef:
        number = offset // PART_SIZE + 1
        body = view[offset : offset + PART_SIZE].tobytes()
        response = self._request(
            f"upload of part {number}",
            name,
            lambda: self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            ),
        )
        return {"ETag": response["ETag"], "PartNumber": number}

    def _complete_multipart(
        self,
        name: str,
        key: str,
        upload_id: str,
        parts: list[CompletedPartTypeDef],
        view: memoryview,
        conditional: bool,
    ) -> None:
        attempts = 0

        def send() -> None:
            nonlocal attempts
            attempts += 1
            arguments: dict[str, Any] = {
                "Bucket": self.bucket,
                "Key": key,
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            if conditional:
                arguments["IfNoneMatch"] = "*"
            self._client.complete_multipart_upload(**arguments)

        self._send_conditional("complete multipart upload", name, send, view, lambda: attempts)

    def _abort_multipart(self, name: str, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            # The parts stay billed until a lifecycle rule removes them; say so and go on.
            log.warning("could not abort the multipart upload of %s: %s", name, _describe(exc))

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes from ``offset`` (to the end when None).

        A range that reaches past the end of the object raises `BackendError` (a short read).
        A body shorter than announced or requested while the object is long enough is a
        transfer fault, so the request is retried.
        """
        key = self._key(name)
        if offset < 0 or (length is not None and length < 0):
            raise UsageError(f"invalid byte range of {name}: offset {offset}, length {length}")
        if length == 0:
            size = self.size(name)
            if offset > size:
                raise _short_read(name, offset, length, size)
            return b""
        return self._request("GET", name, lambda: self._get_once(name, key, offset, length))

    def _get_once(self, name: str, key: str, offset: int, length: int | None) -> bytes:
        # Always send a range, so that the Content-Range header states the object's size and
        # a body cut short is detected even when a whole object is requested.
        last = "" if length is None else str(offset + length - 1)
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={offset}-{last}"
            )
        except ClientError as exc:
            if _status(exc) != 416:
                raise
            # The range starts at or past the end: a short read, or nothing left to read.
            if length is None:
                return b""
            raise _short_read(name, offset, length, None) from exc
        body = response["Body"]
        try:
            data = body.read()
        finally:
            body.close()
        announced = response["ContentLength"]
        if len(data) != announced:
            raise _TruncatedBodyError(f"{name}: body ended after {len(data)} of {announced} bytes")
        total = _total_size(response.get("ContentRange"))
        if total is None:
            # The server ignored the range and sent the whole object.
            total = len(data)
            data = data[offset:] if length is None else data[offset : offset + length]
        if length is not None and offset + length > total:
            raise _short_read(name, offset, length, total)
        expected = max(total - offset, 0) if length is None else length
        if len(data) != expected:
            raise _TruncatedBodyError(f"{name}: got {len(data)} of {expected} bytes requested")
        return data

    def size(self, name: str) -> int:
        """Return the object's size in bytes, from a HEAD request."""
        key = self._key(name)
        response = self._request(
            "HEAD", name, lambda: self._client.head_object(Bucket=self.bucket, Key=key)
        )
        return response["ContentLength"]

    def exists(self, name: str) -> bool:
        """Return whether the object exists; a missing bucket raises `NotFoundError`."""
        try:
            self.size(name)
        except _BucketNotFoundError:
            raise
        except NotFoundError:
            return False
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Yield the objects whose names start with ``prefix``, one listing page at a time.

        Keys that are not valid object names (written by other tools) are skipped.
        """
        token: str | None = None
        while True:
            page = self._request("LIST", prefix or "/", partial(self._list_page, prefix, token))
            for item in page.get("Contents", []):
                name = item["Key"][len(self._key_base) :]
                try:
                    validate_name(name)
                except UsageError:
                    log.debug("skipping key %s: not a valid object name", item["Key"])
                    continue
                yield ObjectInfo(name, item["Size"])
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _list_page(self, prefix: str, token: str | None) -> Any:
        arguments: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self._key_base + prefix}
        if token:
            arguments["ContinuationToken"] = token
        return self._client.list_objects_v2(**arguments)

    def delete(self, name: str) -> None:
        """Delete an object; a missing object raises `NotFoundError`.

        S3 returns success for a DELETE of a missing key, so a HEAD checks first. An object
        deleted by another writer between the two requests is not reported.
        """
        key = self._key(name)
        self.size(name)
        self._request(
            "DELETE", name, lambda: self._client.delete_object(Bucket=self.bucket, Key=key)
        )

    def close(self) -> None:
        """Stop the part upload threads and close the client's connections."""
        self._part_pool.shutdown(wait=True)
        self._client.close()


class _BucketNotFoundError(NotFoundError):
    """The bucket itself is missing, as opposed to one object in it."""


class _ConditionRejectedError(Exception):
    """The server rejected the If-None-Match header as not implemented."""


def _raise_if_condition_rejected(send: Callable[[], None]) -> None:
    try:
        send()
    except ClientError as exc:
        if _status(exc) == 501 or _error_code(exc) == "NotImplemented":
            raise _ConditionRejectedError(str(exc)) from exc
        raise


def _make_client(endpoint_url: str | None, region: str | None) -> S3Client:
    """Create the S3 client: botocore retries off, path-style keys for custom endpoints."""
    session = boto3.session.Session()
    endpoint = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = region or os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
    config = Config(
        region_name=region,
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
        max_pool_connections=MAX_POOL_CONNECTIONS,
        s3={"addressing_style": "path"} if endpoint else {},
        # Checksums only where S3 requires them: the repository authenticates every object
        # itself, and several S3-compatible servers reject the newer trailing checksums.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return session.client("s3", endpoint_url=endpoint or None, config=config)


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, _TruncatedBodyError | BotoConnectionError | HTTPClientError):
        return True
    if isinstance(exc, IncompleteReadError):
        return True
    if isinstance(exc, ClientError):
        status = _status(exc)
        return status >= 500 or status in (408, 429) or _error_code(exc) in _TRANSIENT_CODES
    return False


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _describe(exc: Exception) -> str:
    if isinstance(exc, ClientError):
        return f"{_error_code(exc)}, HTTP {_status(exc)}"
    return f"{type(exc).__name__}: {exc}"


def _total_size(content_range: str | None) -> int | None:
    """Return the object size from a ``Content-Range: bytes A-B/SIZE`` value, if it has one."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None


def _short_read(name: str, offset: int, length: int, size: int | None) -> BackendError:
    known = f"; the object is {size} bytes" if size is not None else ""
    return BackendError(
        f"short read of {name}: wanted {length} bytes at offset {offset}, past the end{known}"
    )
