"""Turning client values into checked numpy arrays of the dtype and shape a model declares."""

from __future__ import annotations

import functools
import hashlib
import math
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import orjson

from models.dtype import DType
from models.errors import InvalidInput
from models.image import ImagePipeline


@dataclass(frozen=True)
class TensorSpec:
    """One declared input or output: name, element type and shape (-1 where any size goes)."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    description: str = ""
    allow_nonfinite: bool = False
    image: ImagePipeline | None = None
    derive: str | None = None
    source: str | None = None

    @functools.cached_property
    def where(self) -> str:
        """How messages about this tensor name it, e.g. input 'features'."""
        return f"input {self.name!r}"

    @functools.cached_property
    def fixed_axes(self) -> tuple[tuple[int, int], ...]:
        """(axis, size) of every dimension that is not -1."""
        return tuple((axis, size) for axis, size in enumerate(self.shape) if size != -1)

    def shape_text(self) -> str:
        """The shape as clients read it in messages, e.g. [-1, 4]."""
        return "[" + ", ".join(str(d) for d in self.shape) + "]"


ENCODED_SHAPES = ((-1,), (-1, 1))
"""The shapes a list of encoded images may take: one per row, as a vector or a column."""


def elements(shape: object, spec: TensorSpec, encoded: bool, limit: int, where: str) -> int:
    """The element count of a shape a client declares, checked against `spec` before any product or allocation.

    Each check costs O(rank of the declaration): the rank first, then the dimensions (non-negative integers,
    the fixed ones as declared; `encoded` images are a vector or a column), then the product, which may not pass
    `limit`. Raises InvalidInput saying which.
    """
    if not isinstance(shape, list):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    declared = ENCODED_SHAPES if encoded else (spec.shape,)
    if not any(len(shape) == len(d) for d in declared):  # before anything walks a shape of any length
        raise _mismatch(shape, declared, where)
    if not all(type(d) is int and d >= 0 for d in shape):
        raise InvalidInput(f"{where}: 'shape' must be a list of non-negative integers")
    if not any(_fits(shape, d) for d in declared):
        raise _mismatch(shape, declared, where)
    return _product(shape, limit, where)


def _fits(shape: list[int], declared: tuple[int, ...]) -> bool:
    return len(shape) == len(declared) and all(d in (-1, s) for s, d in zip(shape, declared, strict=True))


def _mismatch(shape: list, declared: tuple[tuple[int, ...], ...], where: str) -> InvalidInput:
    found = shape if len(shape) <= 8 else f"a shape of {len(shape)} dimensions"
    return InvalidInput(f"{where}: expected shape {' or '.join(_text(d) for d in declared)}, got {found}")


def _product(shape: list[int], limit: int, where: str) -> int:
    """The product of the dimensions, none of which (nor the product) may pass `limit`."""
    count = math.prod(shape) if all(size <= limit for size in shape) else limit + 1
    if count > limit:
        raise InvalidInput(f"{where}: shape {shape} announces more elements than the request can carry ({limit})")
    return count


def _text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def from_values(values: object, dtype: DType, where: str) -> np.ndarray:
    """Convert (nested) JSON numbers or strings to an array of `dtype`, refusing lossy conversions."""
    if dtype.is_bytes:
        return _bytes_array(values, where)
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{where}: nested lists are ragged or mix types") from None
    return cast(array, dtype, where)


def cast(array: np.ndarray, dtype: DType, where: str) -> np.ndarray:
    """Cast an inferred array to `dtype` when no value changes meaning; raise InvalidInput otherwise."""
    kind, target = array.dtype.kind, dtype.numpy
    if array.dtype == target:
        return array
    if kind not in "biuf" or (kind == "b") != (target.kind == "b"):
        found = "booleans" if kind == "b" else "text" if kind in "USO" else f"{array.dtype} values"
        raise InvalidInput(f"{where}: expected {dtype.name} values, got {found}")
    if target.kind in "iu":
        if kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise InvalidInput(f"{where}: expected {dtype.name} values, got numbers with a fraction")
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InvalidInput(f"{where}: values out of the {dtype.name} range")
    with np.errstate(over="ignore"):  # floats beyond the target's range become inf, which check() refuses
        return array.astype(target)


def check(array: np.ndarray, spec: TensorSpec, where: str) -> None:
    """Check an array's shape against the declaration and, for floats, that values are finite."""
    shape = array.shape
    if len(shape) != len(spec.shape) or any(shape[axis] != size for axis, size in spec.fixed_axes):
        raise InvalidInput(f"{where}: expected shape {spec.shape_text()}, got {list(shape)}")
    if 0 in shape:
        raise InvalidInput(f"{where}: shape {list(shape)} holds no elements")
    if spec.dtype.is_float and not spec.allow_nonfinite and not np.isfinite(array).all():
        raise InvalidInput(f"{where}: NaN or infinite values (or values out of the {spec.dtype.name} range)")


def _bytes_array(values: object, where: str) -> np.ndarray:
    shape: list[int] = []
    flat = _flatten_bytes(values, 0, shape, where)
    array = np.empty(len(flat), dtype=object)
    array[:] = flat
    return array.reshape(shape[:-1] if shape and shape[-1] == -1 else shape)


def _flatten_bytes(value: object, depth: int, shape: list[int], where: str) -> list[bytes]:
    """Flatten nested strings, recording each depth's length in `shape` (-1 marks the leaves)."""
    leaf = isinstance(value, bytes | str)
    if not leaf and not isinstance(value, list | tuple):
        raise InvalidInput(f"{where}: expected strings or base64 values, got {type(value).__name__}")
    size = -1 if leaf else len(value)
    if depth > 32:
        raise InvalidInput(f"{where}: nested more than 32 levels deep")
    if depth == len(shape):
        shape.append(size)
    elif shape[depth] != size:
        raise InvalidInput(f"{where}: nested lists are ragged")
    if leaf:
        return [_utf8(value, where) if isinstance(value, str) else value]
    out: list[bytes] = []
    for item in value:
        out.extend(_flatten_bytes(item, depth + 1, shape, where))
    return out


def _utf8(text: str, where: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError:  # a lone surrogate: JSON can carry one as an escape such as "\ud800"
        raise InvalidInput(f"{where}: text that is not valid Unicode") from None


_LENGTH = struct.Struct("<I")
_LITTLE = frozenset("<|=" if sys.byteorder == "little" else "<|")
"""Byte orders stored as they are (`|`: one byte per item)."""


def digest(arrays: Mapping[str, np.ndarray]) -> str:
    """A canonical hash of named arrays: names, dtypes, shapes and bytes, whatever order they came in.

    Two requests get the same digest exactly when the model would be fed the same tensors.
    """
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(arrays):
        array = arrays[name]
        h.update(_LENGTH.pack(len(name)) + name.encode() + array.dtype.str.encode() + repr(array.shape).encode())
        if array.dtype.kind == "O":
            for item in array.reshape(-1):
                data = item if isinstance(item, bytes) else str(item).encode()
                h.update(_LENGTH.pack(len(data)) + data)
        else:
            h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def pack(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays into one buffer: a JSON header, then each array's little-endian bytes.

    Arrays of byte strings (encoded images, labels) are stored element by element, each with its length.
    """
    header, chunks = [], []
    for name, array in arrays.items():
        dtype = array.dtype
        if dtype.kind == "O":
            items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
            raw, kind = b"".join(_LENGTH.pack(len(v)) + v for v in items), "bytes"
        else:
            if dtype.byteorder not in _LITTLE:
                dtype = dtype.newbyteorder("<")
                array = array.astype(dtype)
            raw, kind = array.tobytes(), dtype.str  # C order, whatever the array's strides
        header.append({"name": name, "dtype": kind, "shape": array.shape, "size": len(raw)})
        chunks.append(raw)
    head = orjson.dumps(header)
    return _LENGTH.pack(len(head)) + head + b"".join(chunks)


def unpack(data: bytes) -> dict[str, np.ndarray]:
    """The named arrays `pack` serialised (byte-string arrays come back as arrays of bytes)."""
    (length,) = _LENGTH.unpack_from(data, 0)
    offset = 4 + length
    arrays: dict[str, np.ndarray] = {}
    for entry in orjson.loads(data[4:offset]):
        raw = memoryview(data)[offset:offset + entry["size"]]
        offset += entry["size"]
        if entry["dtype"] == "bytes":
            arrays[entry["name"]] = _unpack_bytes(raw, entry["shape"])
        else:
            arrays[entry["name"]] = np.frombuffer(raw, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"])
    return arrays


def _unpack_bytes(raw: memoryview, shape: list[int]) -> np.ndarray:
    items, offset = [], 0
    while offset < len(raw):
        (size,) = _LENGTH.unpack_from(raw, offset)
        items.append(bytes(raw[offset + 4:offset + 4 + size]))
        offset += 4 + size
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)
