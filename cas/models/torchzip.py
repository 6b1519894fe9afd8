"""Parse a zip-based PyTorch file (``torch.save`` since PyTorch 1.6) without running its pickle.

Such a file is a zip whose members share one top folder ``P``: ``P/data.pkl`` is a pickle of
the saved object, and ``P/data/KEY`` contains the raw bytes of each storage, stored without
compression. The pickle names a storage by a persistent id
``("storage", torch.FloatStorage, "KEY", "cpu", element_count)`` and builds each tensor with
``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, ...)``.

The pickle is read by `_InertUnpickler`, whose ``find_class`` never imports anything: it
maps a fixed allow-list of names to inert stand-ins that only record their arguments, and
every other global to `_Opaque`, a class that ignores its arguments. So no code in the
file runs. Tensors are named by their path of dict keys and list indexes in the saved
object, joined by dots, as in ``model.encoder.weight``.
"""

from __future__ import annotations

import collections
import io
import pickle
import pickletools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cas.models.layout import (
    MAX_DIMS,
    MAX_TENSOR_COUNT,
    ModelFormatError,
    ModelLayout,
    ReadAt,
    Region,
    TensorInfo,
    element_count,
    make_layout,
    read_exact,
)
from cas.models.zipdir import STORED, ZipDirectory, ZipMember, read_zip_directory

MAX_PICKLE_SIZE = 64 << 20
_MAX_WALK_DEPTH = 64

# torch storage class name -> (dtype name in safetensors' spelling, bytes per element).
STORAGE_DTYPES: dict[str, tuple[str, int]] = {
    "DoubleStorage": ("F64", 8),
    "FloatStorage": ("F32", 4),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2),
    "CharStorage": ("I8", 1),
    "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1),
    "ComplexFloatStorage": ("C64", 8),
    "ComplexDoubleStorage": ("C128", 16),
    "Float8_e4m3fnStorage": ("F8_E4M3", 1),
    "Float8_e5m2Storage": ("F8_E5M2", 1),
}
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a torch storage class such as ``torch.FloatStorage``."""

    name: str


@dataclass(frozen=True)
class _StorageRef:
    """Stand-in for a storage: its member key, dtype and element count."""

    key: str
    dtype: str
    item_size: int
    element_count: int


@dataclass(frozen=True)
class _TensorRef:
    """Stand-in for a tensor: a view of a storage."""

    storage: _StorageRef
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _Opaque:
    """Stand-in for any global outside the allow-list: accepts and drops everything."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass


def _rebuild_tensor(
    storage: object, storage_offset: object, size: object, stride: object, *rest: object
) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise ModelFormatError("torch tensor refers to no storage")
    if type(storage_offset) is not int or not isinstance(size, tuple):
        raise ModelFormatError("torch tensor has an invalid offset or size")
    if not isinstance(stride, tuple) or len(stride) != len(size) or len(size) > MAX_DIMS:
        raise ModelFormatError("torch tensor has an invalid stride")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data: object, *rest: object) -> object:
    return data


def _rebuild_from_type(function: Any, new_type: object, args: object, state: object) -> object:
    # ``function`` came from find_class below, so it is one of the stand-ins.
    if not isinstance(args, tuple):
        raise ModelFormatError("torch tensor subclass has invalid arguments")
    return function(*args)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("torch", "Size"): tuple,
}


class _InertUnpickler(pickle.Unpickler):
    """Unpickler that resolves globals to stand-ins and storages to `_StorageRef`."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module in ("torch", "torch.storage") and name.endswith("Storage"):
            return _StorageType(name)
        return _Opaque

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise ModelFormatError(f"torch pickle has an unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, count = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise ModelFormatError("torch pickle has an invalid storage reference")
        if storage_type.name not in STORAGE_DTYPES:
            raise ModelFormatError(f"torch storage type {storage_type.name} is not known")
        if type(count) is not int or count < 0:
            raise ModelFormatError(f"torch storage {key!r} has an invalid size {count!r}")
        dtype, item_size = STORAGE_DTYPES[storage_type.name]
        return _StorageRef(key, dtype, item_size, count)


def find_pickle_member(directory: ZipDirectory) -> ZipMember | None:
    """Return the ``P/data.pkl`` member of a torch zip, or None when there is none."""
    found = [
        m for m in directory.members if m.name.count("/") == 1 and m.name.endswith("/data.pkl")
    ]
    return found[0] if len(found) == 1 else None


def parse_torch_zip(read_at: ReadAt, file_size: int) -> ModelLayout:
    """Parse a torch zip's directory and pickle and check every tensor against its storage."""
    directory = read_zip_directory(read_at, file_size)
    pickle_member = find_pickle_member(directory)
    if pickle_member is None:
        raise ModelFormatError("not a torch file: the zip has no single P/data.pkl member")
    if pickle_member.method != STORED or pickle_member.size > MAX_PICKLE_SIZE:
        raise ModelFormatError(f"torch data.pkl is compressed or over {MAX_PICKLE_SIZE} bytes")
    prefix = pickle_member.name[: -len("data.pkl")]
    members = {member.name: member for member in directory.members}
    _check_byteorder(read_at, members.get(prefix + "byteorder"))

    data = read_exact(read_at, pickle_member.data_offset, pickle_member.size, "torch data.pkl")
    root = _unpickle(data)
    try:
        named = _named_tensors(root)
    except (ValueError, RecursionError) as exc:
        # str() of a dict key: an int of more digits than sys.get_int_max_str_digits(),
        # or a tuple nested too deeply to print.
        raise ModelFormatError(
            f"torch pickle has a key that cannot be named: {exc!r:.200}"
        ) from exc
    storages: dict[str, tuple[_StorageRef, ZipMember]] = {}
    tensors = [_tensor(name, ref, prefix, members, storages) for name, ref in named]
    regions = [
        Region(member.data_offset, member.size, _float_size(ref.dtype, ref.item_size))
        for ref, member in storages.values()
    ]
    headers = [*directory.header_regions, Region(pickle_member.data_offset, pickle_member.size)]
    return make_layout("torch", file_size, tensors, headers, regions)


def _check_byteorder(read_at: ReadAt, member: ZipMember | None) -> None:
    if member is None:
        return
    if member.method != STORED or member.size > 16:
        raise ModelFormatError("torch byteorder member is invalid")
    order = read_exact(read_at, member.data_offset, member.size, "torch byteorder")
    if order != b"little":
        raise ModelFormatError(f"torch file byte order {order!r} is not supported")


_MEMO_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _check_memo_indexes(data: bytes) -> None:
    """Reject a pickle whose memo indexes are not numbered in order, as picklers number them.

    The C unpickler grows its memo array to twice the largest index it stores, so a
    12-byte pickle with ``LONG_BINPUT 2**28`` would allocate 4 GiB. Python's and torch's
    picklers number the memo from 0 upwards, so a real file has no index above the count
    of memo writes before it.
    """
    writes = 0
    try:
        for opcode, argument, position in pickletools.genops(data):
            if opcode.name == "MEMOIZE":
                writes += 1
            elif opcode.name in _MEMO_PUT_OPCODES:
                if not isinstance(argument, int) or not 0 <= argument <= writes:
                    raise ModelFormatError(
                        f"torch data.pkl stores memo index {argument!r} at byte {position} "
                        f"after {writes} memo writes"
                    )
                writes += 1
    except (ValueError, RecursionError) as exc:
        raise ModelFormatError(f"torch data.pkl cannot be read: {exc!r:.200}") from exc


def _unpickle(data: bytes) -> object:
    _check_memo_indexes(data)
    try:
        return _InertUnpickler(io.BytesIO(data)).load()
    except ModelFormatError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        TypeError,
        ValueError,
        AttributeError,
        IndexError,
        KeyError,
        OverflowError,
        RecursionError,
        MemoryError,
        struct.error,
    ) as exc:
        raise ModelFormatError(f"torch data.pkl cannot be read: {exc!r:.200}") from exc


def _named_tensors(root: object) -> list[tuple[str, _TensorRef]]:
    """Walk dicts, lists and tuples from the root; return each tensor with its dotted path.

    The walk keeps one iterator per open container, not a list of every child, so a list
    of millions of items costs no more memory than the pickle already took.
    """
    found: list[tuple[str, _TensorRef]] = []
    seen: set[int] = set()
    stack: list[tuple[str, Iterator[tuple[object, object]]]] = [("", iter([("", root)]))]
    while stack:
        path, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            continue
        key, value = child
        child_path = f"{path}.{key}" if path else str(key)
        if isinstance(value, _TensorRef):
            # A list may repeat one memoized tensor millions of times: stop before the
            # names of all of them take gigabytes.
            if len(found) >= MAX_TENSOR_COUNT:
                raise ModelFormatError(f"torch pickle has more than {MAX_TENSOR_COUNT} tensors")
            found.append((child_path, value))
        elif len(stack) <= _MAX_WALK_DEPTH and id(value) not in seen:
            if isinstance(value, dict):
                seen.add(id(value))
                stack.append((child_path, iter(value.items())))
            elif isinstance(value, list | tuple):
                seen.add(id(value))
                stack.append((child_path, enumerate(value)))
    return found


def _tensor(
    name: str,
    ref: _TensorRef,
    prefix: str,
    members: dict[str, ZipMember],
    storages: dict[str, tuple[_StorageRef, ZipMember]],
) -> TensorInfo:
    subject = f"torch tensor {name!r}"
    storage = ref.storage
    member = members.get(f"{prefix}data/{storage.key}")
    if member is None or member.method != STORED:
        raise ModelFormatError(f"{subject}: storage {storage.key!r} is missing or compressed")
    if member.size != storage.element_count * storage.item_size:
        raise ModelFormatError(
            f"{subject}: storage {storage.key!r} has {member.size} bytes, but "
            f"{storage.element_count} elements of {storage.dtype} need "
            f"{storage.element_count * storage.item_size}"
        )
    storages.setdefault(storage.key, (storage, member))

    count = element_count(ref.shape, subject)
    for step in ref.stride:
        if type(step) is not int or step < 0:
            raise ModelFormatError(f"{subject} has an invalid stride {ref.stride}")
    # Elements from the first to one past the last that the view reaches.
    span = 0
    if count:
        span = 1 + sum((dim - 1) * step for dim, step in zip(ref.shape, ref.stride, strict=True))
    if ref.storage_offset < 0 or ref.storage_offset + span > storage.element_count:
        raise ModelFormatError(
            f"{subject}: elements {ref.storage_offset}..{ref.storage_offset + span} lie outside "
            f"its storage of {storage.element_count}"
        )
    offset = member.data_offset + ref.storage_offset * storage.item_size
    element_size = _float_size(storage.dtype, storage.item_size)
    size = span * storage.item_size
    return TensorInfo(name, storage.dtype, tuple(ref.shape), offset, size, element_size)


def _float_size(dtype: str, item_size: int) -> int:
    return item_size if dtype in _FLOAT_DTYPES else 0
