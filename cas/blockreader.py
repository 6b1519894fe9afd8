"""Reading a file in blocks through a fixed pool of reused buffers, cut into chunks.

`BlockReader` reads with `readv` into one of a few preallocated buffers, so memory
stays bounded by the pool whatever the file size, and reusing buffers avoids faulting
in fresh pages for every block. It cuts each block with
the plain chunker or with a tensor-aligned cut function. With ``threaded`` it reads and
cuts on a background thread while the caller hashes and seals the previous block.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator

from cas.chunker import Chunker

# cut(data, file offset of data, final) -> (chunk lengths, element size of each chunk)
CutFunction = Callable[[memoryview, int, bool], tuple[list[int], list[int]]]
Block = tuple[bytearray, list[int], list[int]]


class BlockReader:
    """Reads a file in blocks and cuts chunks, optionally on a background thread."""

    def __init__(self, chunker: Chunker, block_size: int, block_count: int, threaded: bool) -> None:
        self.chunker = chunker
        self.block_size = block_size
        carry = chunker.params.max_size
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(block_count):
            self._free.put(bytearray(block_size + carry))
        self.threaded = threaded

    def release(self, buffer: bytearray) -> None:
        """Return a block buffer to the pool once its chunks are processed."""
        self._free.put(buffer)

    def _plain_cut(self, data: memoryview, base: int, final: bool) -> tuple[list[int], list[int]]:
        lengths = self.chunker.cut(data, final=final)
        return lengths, [0] * len(lengths)

    def blocks(self, fd: int, cut: CutFunction | None = None) -> Iterator[Block]:
        """Yield (buffer, chunk lengths, element sizes) for a file descriptor, in file order.

        The caller must `release` every yielded buffer. Chunk lengths cover
        the start of the buffer; bytes after them are carried to the next block.
        ``cut`` replaces the plain chunker, for tensor-aligned cutting.
        """
        cut = cut or self._plain_cut
        if not self.threaded:
            yield from self._produce(fd, cut)
            return
        # Unbounded: the pool of free buffers already bounds what is in flight.
        results: queue.Queue[Block | BaseException | None] = queue.Queue()
        stop = threading.Event()

        def run() -> None:
            try:
                for item in self._produce(fd, cut):
                    if stop.is_set():
                        self.release(item[0])
                        break
                    results.put(item)
                results.put(None)
            except BaseException as exc:  # handed to the consumer below
                results.put(exc)

        thread = threading.Thread(target=run, name="cas-read", daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    leftover = results.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(leftover, tuple):
                    self.release(leftover[0])
            thread.join()

    def _produce(self, fd: int, cut: CutFunction) -> Iterator[Block]:
        carry = b""
        offset = 0
        while True:
            buffer = self._free.get()
            view = memoryview(buffer)
            view[: len(carry)] = carry
            filled = len(carry)
            end = len(carry) + self.block_size
            while filled < end:
                count = os.readv(fd, [view[filled:end]])
                if count == 0:
                    break
                filled += count
            at_eof = filled < end
            lengths, element_sizes = cut(view[:filled], offset, at_eof)
            used = sum(lengths)
            offset += used
            carry = bytes(view[used:filled])
            view.release()
            yield buffer, lengths, element_sizes
            if at_eof:
                return
