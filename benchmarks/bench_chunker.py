"""pytest-benchmark loops for the chunker, on inputs small enough for a quick run.

Run: pytest benchmarks/bench_chunker.py --benchmark-enable
Without --benchmark-enable (the project default) each loop runs once, as a smoke test.
benchmarks/chunker_table.py measures the same things on 1 GiB and prints a table.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import blake3
import pytest
from pyfastcdc.py.constants import GEAR

from benchmarks.chunker_table import make_weights, numpy_cut
from cas.chunker import DEFAULT_PARAMS, Chunker, MiB, reference_cut_2020

INPUT_SIZE = 64 * MiB
NUMPY_INPUT_SIZE = 4 * MiB
PYTHON_INPUT_SIZE = 1 * MiB
SEED = 0x5DEECE66D0F1E2D3


@pytest.fixture(scope="module")
def weights() -> memoryview:
    return make_weights(INPUT_SIZE).data.cast("B")


@pytest.fixture(scope="module")
def keyed() -> Chunker:
    return Chunker(DEFAULT_PARAMS, SEED)


def test_chunk_keyed(benchmark: Any, weights: memoryview, keyed: Chunker) -> None:
    lengths = benchmark(keyed.cut, weights, final=True)
    assert sum(lengths) == INPUT_SIZE


def test_chunk_unkeyed(benchmark: Any, weights: memoryview) -> None:
    lengths = benchmark(Chunker(DEFAULT_PARAMS).cut, weights, final=True)
    assert sum(lengths) == INPUT_SIZE


def test_blake3(benchmark: Any, weights: memoryview) -> None:
    digest = benchmark(lambda: blake3.blake3(weights, max_threads=1).digest())
    assert len(digest) == 32


def test_chunk_stream(benchmark: Any, weights: memoryview, keyed: Chunker) -> None:
    data = bytes(weights)

    def stream() -> int:
        return sum(len(view) for view in keyed.iter_stream(io.BytesIO(data)))

    assert benchmark(stream) == INPUT_SIZE


def test_chunk_two_threads(benchmark: Any, weights: memoryview) -> None:
    chunkers = [Chunker(DEFAULT_PARAMS, SEED), Chunker(DEFAULT_PARAMS, SEED)]

    def chunk_twice() -> None:
        threads = [
            threading.Thread(target=chunker.cut, args=(weights,), kwargs={"final": True})
            for chunker in chunkers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    benchmark(chunk_twice)


def test_numpy_prototype(benchmark: Any, weights: memoryview, keyed: Chunker) -> None:
    data = bytes(weights[:NUMPY_INPUT_SIZE])
    lengths = benchmark.pedantic(numpy_cut, args=(data, DEFAULT_PARAMS, SEED), rounds=3)
    assert lengths == keyed.cut(data, final=True)


def test_pure_python_reference(benchmark: Any, weights: memoryview, keyed: Chunker) -> None:
    data = bytes(weights[:PYTHON_INPUT_SIZE])
    gear = [entry ^ SEED for entry in GEAR]
    chunks = benchmark.pedantic(
        reference_cut_2020, args=(data, DEFAULT_PARAMS, gear), rounds=1, iterations=1
    )
    assert [length for _, length, _ in chunks] == keyed.cut(data, final=True)
