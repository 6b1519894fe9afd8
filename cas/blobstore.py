"""Writing blobs: compression decisions, pack buffers and the upload thread.

`BlobWriter` is the write half of a snapshot. It is fed chunk bytes and tree
bytes by one thread, seals them into a pack buffer, and hands full packs to
an upload thread so that hashing and encryption go on while a pack is being
written and fsynced. Two pack buffers alternate, so memory stays at two packs
whatever the input size.

Threading contract: `add_chunk`, `add_tree` and `finish` are called from one
thread only; the upload thread touches only the finished pack it was given.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cas.index import pack_name
from cas.pack import MAX_BLOB_RAW_SIZE, BlobType, Codec, PackWriter, compress
from cas.repository import Repository

log = logging.getLogger(__name__)

# Compression is tried on the first chunk of every window of this many chunks;
# when it saves less than `_MIN_SAVING`, the rest of the window is stored raw.
# lz4 saves about 0.4 % on fp32 weights, so trying every chunk would cost
# 1.5 GB/s of CPU for nothing.
_SAMPLE_WINDOW = 32
_MIN_SAVING = 0.03
# Publish an index object after this many packs, so an interrupted long
# snapshot leaves indexed packs that a rerun deduplicates against.
_INDEX_FLUSH_PACKS = 64


@dataclass
class WriteStats:
    """Counters of one snapshot run's writes."""

    new_chunks: int = 0
    new_chunk_bytes: int = 0
    new_trees: int = 0
    packs: int = 0
    pack_bytes: int = 0


class _Uploader:
    """Uploads finished packs on a background thread, or inline when not threaded.

    A submitted `PackWriter` is not touched by the caller until its ``ready``
    event is set again by the upload thread.
    """

    def __init__(self, repo: Repository, threaded: bool) -> None:
        self.repo = repo
        self.bytes_uploaded = 0
        self._queue: queue.Queue[PackWriter | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="cas-upload", daemon=True)
            self._thread.start()

    def _upload(self, writer: PackWriter) -> None:
        data = writer.finish()
        self.repo.backend.put(pack_name(writer.pack_id), data)
        self.repo.index.add_pack(writer.pack_id, list(writer.entries))
        self.bytes_uploaded += len(data)
        log.debug(
            "uploaded pack %s: %d blobs, %d bytes",
            writer.pack_id.hex(),
            writer.blob_count,
            len(data),
        )

    def _run(self) -> None:
        while True:
            writer = self._queue.get()
            try:
                if writer is None:
                    return
                if self._error is None:
                    self._upload(writer)
            except BaseException as exc:  # handed to the producer thread by check()
                self._error = exc
            finally:
                if writer is not None:
                    writer.ready.set()
                self._queue.task_done()

    def submit(self, writer: PackWriter) -> None:
        """Upload a finished pack; returns at once when threaded."""
        self.check()
        writer.ready.clear()
        if self._thread is None:
            try:
                self._upload(writer)
            finally:
                writer.ready.set()
        else:
            self._queue.put(writer)

    def wait_idle(self) -> None:
        """Wait until every submitted pack is uploaded; re-raise an upload error."""
        if self._thread is not None:
            self._queue.join()
        self.check()

    def check(self) -> None:
        """Re-raise an upload error in the calling thread."""
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the upload thread after the queued packs."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class BlobWriter:
    """Seals new chunks and trees into packs and uploads them; see the module docstring."""

    def __init__(
        self,
        repo: Repository,
        threaded: bool,
        before_publish: Callable[[], None] | None = None,
    ) -> None:
        self.repo = repo
        self.index = repo.index
        # Called before each index object is published; raises to stop the run.
        self._before_publish = before_publish or (lambda: None)
        self.stats = WriteStats()
        max_blob = repo.config.chunker.max_size
        self._uploader = _Uploader(repo, threaded)
        self._data_writers = [
            PackWriter(repo.keys, repo.config.pack_size, max_blob) for _ in range(2)
        ]
        self._data = self._data_writers[0]
        self._trees = PackWriter(repo.keys, 4 << 20, MAX_BLOB_RAW_SIZE)
        self._written: set[bytes] = set()
        self._window_left = 0
        self._compress_window = True
        self._packs_since_flush = 0

    @property
    def bytes_uploaded(self) -> int:
        """Bytes of packs uploaded so far."""
        return self._uploader.bytes_uploaded

    def reset_sampling(self) -> None:
        """Start a new compression sample; called at the start of each file."""
        self._window_left = 0

    def _compress_sampled(self, payload: memoryview) -> bytes | None:
        if self._window_left == 0:
            self._window_left = _SAMPLE_WINDOW
            packed = compress(payload)
            saved = 0.0 if packed is None else 1 - len(packed) / max(1, len(payload))
            self._compress_window = saved >= _MIN_SAVING
            self._window_left -= 1
            return packed if self._compress_window else None
        self._window_left -= 1
        return compress(payload) if self._compress_window else None

    def has(self, blob_id: bytes) -> bool:
        """Return whether the repository or this run already stores the blob."""
        return blob_id in self._written or self.index.has(blob_id)

    def add_chunk(self, chunk_id: bytes, payload: memoryview, element_size: int = 0) -> bool:
        """Store a chunk unless present; return whether it was new.

        ``element_size`` is the float width in bytes of the tensor the chunk belongs to
        (2, 4 or 8), or 0 when it is no float tensor data or unknown.
        """
        if self.has(chunk_id):
            return False
        packed = self._compress_sampled(payload)
        if packed is None:
            self._data.add(BlobType.CHUNK, chunk_id, payload, Codec.NONE, len(payload))
        else:
            self._data.add(BlobType.CHUNK, chunk_id, packed, Codec.LZ4, len(payload))
        self._written.add(chunk_id)
        self.stats.new_chunks += 1
        self.stats.new_chunk_bytes += len(payload)
        if self._data.full:
            self._uploader.submit(self._data)
            # Switch to the other buffer; wait if its upload is still running.
            other = (
                self._data_writers[1]
                if self._data is self._data_writers[0]
                else self._data_writers[0]
            )
            other.ready.wait()
            self._uploader.check()
            other.reset()
            self._data = other
            self._count_pack()
        return True

    def add_tree(self, tree_id: bytes, payload: bytes) -> None:
        """Store a serialized tree unless present."""
        if self.has(tree_id):
            return
        packed = compress(payload)
        if packed is None:
            self._trees.add(BlobType.TREE, tree_id, payload, Codec.NONE, len(payload))
        else:
            self._trees.add(BlobType.TREE, tree_id, packed, Codec.LZ4, len(payload))
        self._written.add(tree_id)
        self.stats.new_trees += 1
        if self._trees.full:
            self._uploader.submit(self._trees)
            self._trees.ready.wait()
            self._uploader.check()
            self._trees.reset()
            self._count_pack()

    def _count_pack(self) -> None:
        self.stats.packs += 1
        self._packs_since_flush += 1
        if self._packs_since_flush >= _INDEX_FLUSH_PACKS:
            self._uploader.wait_idle()
            self._before_publish()
            self.index.flush()
            self._packs_since_flush = 0

    def finish(self) -> None:
        """Upload the partial packs and publish the index object for this run's packs."""
        for writer in (self._data, self._trees):
            if writer.blob_count:
                self._uploader.submit(writer)
                self.stats.packs += 1
        self._uploader.wait_idle()
        self._uploader.close()
        self._before_publish()
        self.index.flush()

    def abort(self) -> None:
        """Stop the upload thread after an error; uploaded packs stay unreferenced for gc."""
        self._uploader.close()
