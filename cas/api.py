"""The Python API: one `Repository` class with the everyday operations as methods.

    import cas

    repo = cas.Repository.open("/backup/models", password_file="~/.cas-password")
    result = repo.snapshot("ckpt/", tags=["run-7"], meta={"step": "12000"})
    for snapshot in repo.snapshots(tag="run-7"):
        print(snapshot.snapshot_hex, snapshot.time)
    repo.checkout(result.snapshot, "restore/")

`Repository` extends `cas.repository.Repository`, so an instance also works with
the lower-level classes (`cas.archiver.Archiver`, `cas.restorer.Restorer`,
`cas.checker`). Every method raises the classes of `cas.errors` and returns a
frozen dataclass: `SnapshotResult`, `Snapshot`, `CheckoutResult` or `SnapshotDiff`.
docs/python-api.md describes it with examples.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO, cast

from cas import repository
from cas.archiver import (
    DEFAULT_MEMORY_LIMIT,
    Archiver,
    SnapshotOptions,
    SnapshotProgress,
    SnapshotResult,
)
from cas.backend import Backend
from cas.chunker import ChunkerParams
from cas.codecs import DEFAULT_COMPRESSION, Compression
from cas.crypto import KdfParams, MasterKeys
from cas.diff import SnapshotDiff, diff_snapshots
from cas.errors import IntegrityError, TargetWriteError, UsageError
from cas.excludes import check_pattern, read_exclude_file
from cas.restorer import CheckoutOptions, CheckoutProgress, CheckoutResult, Restorer
from cas.snapshot import Snapshot
from cas.streaminput import ReadableStream, StreamArchiver

PathLike = str | os.PathLike[str]
Password = str | bytes


def read_password(password: Password | None, password_file: PathLike | None) -> bytes:
    """Return the password as bytes, from ``password`` or else from ``password_file``.

    A str is encoded as UTF-8. A file's trailing line endings (``\\n`` or ``\\r\\n``)
    are removed and other whitespace is kept, as the command line does.
    """
    if password is not None and password_file is not None:
        raise UsageError("give either password or password_file, not both")
    if password_file is not None:
        path = Path(password_file).expanduser()
        try:
            data = path.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read password file {path}: {exc.strerror}") from None
    elif password is not None:
        data = password.encode() if isinstance(password, str) else bytes(password)
    else:
        raise UsageError("no password given: pass password= or password_file=")
    if not data:
        raise UsageError("the password is empty")
    return data


def _cache_path(cache_dir: PathLike | None) -> Path | None:
    return Path(cache_dir).expanduser() if cache_dir is not None else None


class Repository(repository.Repository):
    """An open repository with snapshot, list and checkout methods; close it or use ``with``."""

    @classmethod
    def open(
        cls,
        url: str | os.PathLike[str],
        password: Password | None = None,
        *,
        password_file: PathLike | None = None,
        cache_dir: PathLike | None = None,
        backend: Backend | None = None,
    ) -> Repository:
        """Open the repository at ``url``, a folder or ``s3://BUCKET/PREFIX``.

        Raises `WrongPasswordError` when no key opens with the password and
        `NotFoundError` when there is no repository at ``url``.
        """
        opened = super().open(
            os.fspath(url),
            read_password(password, password_file),
            cache_dir=_cache_path(cache_dir),
            backend=backend,
        )
        return cast(Repository, opened)

    @classmethod
    def init(
        cls,
        url: str | os.PathLike[str],
        password: Password | None = None,
        *,
        password_file: PathLike | None = None,
        cache_dir: PathLike | None = None,
        chunker: ChunkerParams | None = None,
        pack_size: int = repository.DEFAULT_PACK_SIZE,
        kdf: KdfParams | None = None,
        backend: Backend | None = None,
        keys: MasterKeys | None = None,
        compression: Compression = DEFAULT_COMPRESSION,
    ) -> Repository:
        """Create a repository at ``url`` and return it open.

        ``compression`` is the default codec and byte grouping of new blobs, as
        `cas init --compression` sets it. Raises `AlreadyExistsError` when one exists there
        already.
        """
        created = super().init(
            os.fspath(url),
            read_password(password, password_file),
            cache_dir=_cache_path(cache_dir),
            chunker=chunker,
            pack_size=pack_size,
            kdf=kdf,
            backend=backend,
            keys=keys,
            compression=compression,
        )
        return cast(Repository, created)

    def __enter__(self) -> Repository:
        return self

    def snapshot(
        self,
        paths: PathLike | Iterable[PathLike],
        *,
        tags: Iterable[str] = (),
        message: str = "",
        meta: Mapping[str, str] | None = None,
        exclude: Iterable[str] = (),
        exclude_files: Iterable[PathLike] = (),
        dereference: bool = False,
        parent: str | None = None,
        host: str = "",
        threads: int = 0,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        progress: Callable[[SnapshotProgress], None] | None = None,
    ) -> SnapshotResult:
        """Store files and folders as a new snapshot, as `cas snapshot` does.

        ``paths`` is one path or several. ``exclude`` takes gitignore-style
        patterns, applied after those of ``exclude_files`` (see `cas.excludes`).
        A file that cannot be read is skipped and named in the result's
        ``warnings``; the snapshot is still written.
        """
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        patterns: list[str] = []
        for path in exclude_files:
            patterns.extend(read_exclude_file(path))
        patterns.extend(check_pattern(pattern, "exclude pattern") for pattern in exclude)
        options = self._options(tags, message, meta, host, threads, memory_limit, parent)
        options.exclude = patterns
        options.dereference = dereference
        return Archiver(self, options, progress).run([os.fspath(path) for path in paths])

    def snapshot_stream(
        self,
        stream: BinaryIO | ReadableStream | bytes,
        name: str,
        *,
        tags: Iterable[str] = (),
        message: str = "",
        meta: Mapping[str, str] | None = None,
        host: str = "",
        threads: int = 0,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        progress: Callable[[SnapshotProgress], None] | None = None,
    ) -> SnapshotResult:
        """Store a binary stream (or bytes) as the one file ``name`` of a new snapshot.

        The stream is read to its end; ``name`` is a file name or a relative path
        such as ``ckpt/model.pt`` (see `cas.streaminput`).
        """
        source = io.BytesIO(stream) if isinstance(stream, bytes) else stream
        options = self._options(tags, message, meta, host, threads, memory_limit, None)
        return StreamArchiver(self, options, source, name, progress).run_stream()

    @staticmethod
    def _options(
        tags: Iterable[str],
        message: str,
        meta: Mapping[str, str] | None,
        host: str,
        threads: int,
        memory_limit: int,
        parent: str | None,
    ) -> SnapshotOptions:
        if isinstance(tags, str):
            raise UsageError(f"invalid tags {tags!r}: give a list of tags, such as [{tags!r}]")
        items = dict(meta or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in items.items()):
            raise UsageError("invalid meta: keys and values must be strings")
        return SnapshotOptions(
            tags=list(tags),
            message=message,
            meta=items,
            parent=parent,
            threads=threads,
            memory_limit=memory_limit,
            host=host,
        )

    def snapshots(
        self,
        *,
        tag: str | Iterable[str] = (),
        host: str | None = None,
        path: PathLike | None = None,
    ) -> list[Snapshot]:
        """Return the readable snapshots, oldest first, that match every filter given.

        ``tag`` keeps snapshots that have each of the tags; ``path`` keeps those
        whose source paths include that path (made absolute).
        """
        tags = {tag} if isinstance(tag, str) else set(tag)
        source_path = os.fsencode(os.path.abspath(path)) if path is not None else None
        return [
            snap
            for snap in self.list_snapshots()
            if tags <= set(snap.tags)
            and (host is None or snap.host == host)
            and (source_path is None or source_path in snap.paths)
        ]

    def checkout(
        self,
        snapshot: Snapshot | str,
        dest: PathLike,
        *,
        overwrite: bool = False,
        delete: bool = False,
        include: Iterable[str] = (),
        threads: int = 0,
        memory_limit: int = 256 << 20,
        wait: float = 0.0,
        check: bool = True,
        progress: Callable[[CheckoutProgress], None] | None = None,
    ) -> CheckoutResult:
        """Restore a snapshot (object, id, prefix or ``latest``) into ``dest``, verified.

        ``overwrite``, ``delete`` and ``include`` work as `cas checkout --overwrite`,
        ``--delete`` and ``--include PATH``: roll an existing folder back, remove what the
        snapshot lacks, and restore only these snapshot paths (as `cas ls` shows them).
        With ``check`` (the default), a path that could not be restored raises
        `IntegrityError` when data failed verification or was missing, and
        `TargetWriteError` when only writes into ``dest`` failed. Without it,
        the result's ``failed`` lists them.
        """
        if isinstance(snapshot, str):
            snapshot = self.resolve_snapshot(snapshot)
        options = CheckoutOptions(
            overwrite=overwrite,
            threads=threads,
            memory_limit=memory_limit,
            wait=wait,
            delete=delete,
            include=tuple(include),
        )
        result = Restorer(self, snapshot, os.fspath(dest), options, progress).run()
        if check and result.failed:
            listed = "; ".join(f"{path}: {error}" for path, error in result.failed[:5])
            message = (
                f"checkout of snapshot {snapshot.snapshot_hex[:16]} into {os.fspath(dest)} is "
                f"incomplete: {len(result.failed)} paths failed ({listed})"
            )
            if all(error.startswith("write failed") for _, error in result.failed):
                raise TargetWriteError(message)
            raise IntegrityError(message)
        return result

    def diff(self, old: Snapshot | str, new: Snapshot | str) -> SnapshotDiff:
        """Compare two snapshots (objects, ids, prefixes or ``latest``), as `cas diff` does.

        The result lists the files added, removed and changed, and for model files that
        `cas` recognises on both sides the tensors added, removed and changed.
        """
        if isinstance(old, str):
            old = self.resolve_snapshot(old)
        if isinstance(new, str):
            new = self.resolve_snapshot(new)
        return diff_snapshots(self, old, new)
