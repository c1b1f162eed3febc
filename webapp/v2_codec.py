"""Open Inference Protocol V2 bodies: JSON tensors and the binary tensor data extension."""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import numpy as np
import orjson

from models import ModelVersion
from models.dtype import BY_V2, BYTES, DType
from models.tensor import TensorSpec, elements, from_values
from webapp import wire
from webapp.errors import BadRequest

HEADER = "Inference-Header-Content-Length"
FIELDS = frozenset({"id", "parameters", "inputs", "outputs"})
_LENGTH = struct.Struct("<I")
_NONE: dict = {}


class InferRequest(NamedTuple):
    """A parsed infer request: its id, input arrays, and the outputs wanted (name, as binary?)."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]]


def parse(data: bytes, header_length: str | None, version: ModelVersion) -> InferRequest:
    """Parse a JSON or JSON-plus-binary infer request against the version's inputs and outputs."""
    split = _header_length(header_length, len(data))
    body = wire.json_object(data if split == len(data) else data[:split], version.spec.max_request_values)
    unknown = () if body.keys() <= FIELDS else set(body) - FIELDS
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r} in the infer request")
    request_id = body.get("id")
    if request_id is not None and not (isinstance(request_id, str) and _is_unicode(request_id)):
        raise BadRequest("'id' must be a string of valid Unicode")
    binary_output = _parameters(body, "request").get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest("parameter 'binary_data_output' must be a boolean")
    reader = _Binary(memoryview(data)[split:]) if split < len(data) else NO_BINARY
    # every element takes at least a byte of the body: no shape may announce more
    inputs = _inputs(body.get("inputs"), version, reader, len(data))
    reader.finish()
    outputs = _outputs(body.get("outputs"), version, binary_output)
    return InferRequest(request_id, inputs, outputs)


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8; the lenient JSON parser lets lone surrogates ("\\ud800") through."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _header_length(value: str | None, size: int) -> int:
    if value is None:
        return size
    text = value.strip()
    # isdigit() takes '²' (latin-1 in a header), which int() refuses; int() also refuses 4300+ digits
    if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) > size:
        raise BadRequest(f"{HEADER} must be a whole number no larger than the body ({size} bytes)")
    return int(text)


def _parameters(table: dict, where: str) -> dict:
    parameters = table.get("parameters")
    if parameters is None:
        return _NONE
    if not isinstance(parameters, dict):
        raise BadRequest(f"{where} 'parameters' must be an object")
    return parameters


def _inputs(entries: object, version: ModelVersion, reader: _Binary, limit: int) -> dict[str, np.ndarray]:
    if not isinstance(entries, list) or not entries:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    specs = version.spec.inputs_by_name
    inputs: dict[str, np.ndarray] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise BadRequest(f"inputs[{i}] must be an object with name, shape, datatype and data")
        name = entry.get("name")
        if not isinstance(name, str) or name not in specs:
            raise BadRequest(f"inputs[{i}]: unknown input {name!r}; inputs are {list(specs)}")
        if name in inputs:
            raise BadRequest(f"inputs[{i}]: input {name!r} given twice")
        inputs[name] = _tensor(entry, specs[name], reader, limit)
    return inputs


def _tensor(entry: dict, spec: TensorSpec, reader: _Binary, limit: int) -> np.ndarray:
    """One input's array; its shape is checked against the declaration before anything is sized by it."""
    where = spec.where
    dtype = _datatype(entry.get("datatype"), spec, where)
    shape = entry.get("shape")
    count = elements(shape, spec, dtype.is_bytes and not spec.dtype.is_bytes, limit, where)
    size = _parameters(entry, where).get("binary_data_size")
    if size is not None:
        if "data" in entry:
            raise BadRequest(f"{where}: has both 'data' and binary_data_size")
        if type(size) is not int or size < 0:
            raise BadRequest(f"{where}: binary_data_size must be a non-negative integer")
        return reader.tensor(size, dtype, shape, count, where)
    if "data" not in entry:
        raise BadRequest(f"{where}: 'data' is missing (or give parameters.binary_data_size)")
    return _json_data(entry["data"], dtype, shape, count, where)


def _json_data(data: object, dtype: DType, shape: list[int], count: int, where: str) -> np.ndarray:
    """JSON `data`, flat or nested as the shape; its top-level length is checked before it is converted."""
    length = len(data) if isinstance(data, list) else 1
    if length != count and not (len(shape) > 1 and length == shape[0]):
        raise BadRequest(f"{where}: data has {length} values at its top level, which does not fill shape {shape}")
    array = from_values(data, dtype, where)
    if array.size != count or (array.ndim > 1 and list(array.shape) != shape):
        raise BadRequest(f"{where}: data has {array.size} elements in shape {list(array.shape)}, "
                         f"which does not fill shape {shape}")
    return array.reshape(shape)


def _datatype(value: object, spec: TensorSpec, where: str) -> DType:
    dtype = BY_V2.get(value) if isinstance(value, str) else None
    if dtype is None:
        raise BadRequest(f"{where}: unknown datatype {value!r}; one of {', '.join(BY_V2)}")
    if dtype is not spec.dtype and not (dtype is BYTES and spec.image is not None):
        takes = spec.dtype.v2 + (" or BYTES (encoded images)" if spec.image is not None else "")
        raise BadRequest(f"{where}: datatype {dtype.v2} does not match the model's {takes}")
    return dtype


class _Binary:
    """Reads binary tensors appended after the JSON header, checking every length."""

    def __init__(self, data: memoryview):
        self.data, self.offset = data, 0

    def tensor(self, size: int, dtype: DType, shape: list[int], count: int, where: str) -> np.ndarray:
        if self.offset + size > len(self.data):
            raise BadRequest(f"{where}: binary_data_size {size} runs past the end of the body")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        if dtype.is_bytes:
            return _split_bytes(chunk, count, where).reshape(shape)
        if size != count * dtype.numpy.itemsize:
            raise BadRequest(f"{where}: binary_data_size {size} does not fit shape {shape} of {dtype.v2}")
        return np.frombuffer(chunk, dtype=dtype.numpy.newbyteorder("<")).reshape(shape)

    def finish(self) -> None:
        if self.offset != len(self.data):
            raise BadRequest(f"{len(self.data) - self.offset} bytes after the JSON header belong to no input")


NO_BINARY = _Binary(memoryview(b""))
"""The reader of a request with no binary part: only zero-sized binary tensors fit it."""


def _split_bytes(chunk: memoryview, count: int, where: str) -> np.ndarray:
    """The `count` length-prefixed elements of a chunk, read no further than `count` (lengths may lie)."""
    items, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(chunk):
            raise BadRequest(f"{where}: BYTES element length is truncated")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        end = offset + 4 + length
        if end > len(chunk):
            raise BadRequest(f"{where}: BYTES element runs past its binary_data_size")
        items.append(bytes(chunk[offset + 4:end]))
        offset = end
    if offset != len(chunk):
        raise BadRequest(f"{where}: {len(chunk) - offset} bytes of binary_data_size are past the {count} BYTES "
                         f"elements of its shape")
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _outputs(entries: object, version: ModelVersion, binary_default: bool) -> list[tuple[str, bool]]:
    names = version.spec.output_names
    if entries is None:
        return [(name, binary_default) for name in names]
    if not isinstance(entries, list):
        raise BadRequest("'outputs' must be a list")
    wanted = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("name") not in names:
            raise BadRequest(f"outputs[{i}]: unknown output; outputs are {names}")
        parameters = _parameters(entry, f"outputs[{i}]")
        if "classification" in parameters:
            raise BadRequest(f"outputs[{i}]: the classification extension is not supported")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise BadRequest(f"outputs[{i}]: parameter 'binary_data' must be a boolean")
        wanted.append((entry["name"], binary))
    return wanted


def response(version: ModelVersion, request: InferRequest, outputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
    """The response body, and the length of its JSON header when binary outputs follow (else 0)."""
    dtypes = version.spec.output_dtypes
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in request.outputs:
        array, dtype = outputs[name], dtypes[name]
        entry: dict[str, Any] = {"name": name, "datatype": dtype.v2, "shape": list(array.shape)}
        if binary:
            raw = _encode(array, dtype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _flat(array, dtype)
        entries.append(entry)
    head: dict[str, Any] = {"model_name": version.name, "model_version": str(version.number)}
    if request.id is not None:
        head["id"] = request.id
    head["outputs"] = entries
    header = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    return (header + b"".join(chunks), len(header)) if chunks else (header, 0)


def _flat(array: np.ndarray, dtype: DType) -> Any:
    if dtype.is_bytes:
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return array.ravel()  # C order, contiguous: a view when the array already is


def _encode(array: np.ndarray, dtype: DType) -> bytes:
    if dtype.is_bytes:
        parts = []
        for value in array.reshape(-1):
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts.append(_LENGTH.pack(len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=dtype.numpy.newbyteorder("<")).tobytes()
