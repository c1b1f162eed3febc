"""TensorFlow Serving REST request bodies, row (`instances`) and columnar (`inputs`), as named input arrays.

The web process parses `:predict` and `:submit` bodies with it, and batch workers the stored instances.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
import orjson

from models.dtype import BYTES
from models.errors import InvalidInput
from models.registry import ModelVersion
from models.spec import ModelSpec
from models.tensor import TensorSpec, from_values

SIGNATURES = ("", "serving_default")
FIELDS = frozenset({"signature_name", "instances", "inputs"})


def parse(body: dict[str, Any], version: ModelVersion) -> tuple[dict[str, np.ndarray], bool]:
    """The request's input arrays, and whether it used the row format."""
    unknown = () if body.keys() <= FIELDS else set(body) - FIELDS
    if unknown:
        raise InvalidInput(f"unknown field {sorted(unknown)[0]!r}; a predict request has 'instances' or 'inputs'")
    signature = body.get("signature_name", "")
    if signature not in SIGNATURES:
        raise InvalidInput(f"unknown signature_name {signature!r}; this model has 'serving_default'")
    if ("instances" in body) == ("inputs" in body):
        raise InvalidInput("a predict request has exactly one of 'instances' (row format) or 'inputs' (columnar)")
    if "instances" in body:
        return _rows(body["instances"], version.spec), True
    return _columns(body["inputs"], version.spec), False


def _check_count(values: object, model: ModelSpec, where: str) -> None:
    """Refuse more rows than the model takes before any of them is read."""
    if isinstance(values, list) and len(values) > model.options.max_instances:
        raise InvalidInput(f"{where}: {len(values)} rows in one request; model {model.name!r} takes at most "
                           f"{model.options.max_instances}")


def _rows(instances: object, model: ModelSpec) -> dict[str, np.ndarray]:
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("'instances' must be a non-empty list")
    _check_count(instances, model, "instances")
    specs = model.inputs
    names = [t.name for t in specs]
    if len(specs) == 1 and not _named(instances[0], names):
        return {specs[0].name: _array(instances, specs[0], "instances")}
    columns: dict[str, list] = {name: [] for name in names}
    for i, row in enumerate(instances):
        if not isinstance(row, dict):
            raise InvalidInput(f"instances[{i}]: with several inputs each instance is an object of {names}")
        unknown = set(row) - set(names)
        if unknown:
            raise InvalidInput(f"instances[{i}]: unknown input {sorted(unknown)[0]!r}; inputs are {names}")
        for name in names:
            if name not in row:
                raise InvalidInput(f"instances[{i}]: missing input {name!r}")
            columns[name].append(row[name])
    return {t.name: _array(columns[t.name], t, f"instances ({t.name!r})") for t in specs}


def _named(instance: object, names: list[str]) -> bool:
    """Whether a value is an object of named inputs (rather than one input's {"b64": ...} value)."""
    return isinstance(instance, dict) and (set(instance) != {"b64"} or "b64" in names)


def _columns(inputs: object, model: ModelSpec) -> dict[str, np.ndarray]:
    specs = model.inputs
    names = [t.name for t in specs]
    if not isinstance(inputs, dict) or (len(specs) == 1 and not _named(inputs, names)):
        if len(specs) != 1:
            raise InvalidInput(f"'inputs' must be an object of {names}")
        _check_count(inputs, model, "inputs")
        return {specs[0].name: _array(inputs, specs[0], "inputs")}
    unknown = set(inputs) - set(names)
    if unknown:
        raise InvalidInput(f"inputs: unknown input {sorted(unknown)[0]!r}; inputs are {names}")
    for name, value in inputs.items():
        _check_count(value, model, f"inputs[{name!r}]")
    by_name = model.inputs_by_name
    return {name: _array(value, by_name[name], f"inputs[{name!r}]") for name, value in inputs.items()}


def _array(values: object, spec: TensorSpec, where: str) -> np.ndarray:
    """Values for one input; `{"b64": ...}` leaves become bytes (encoded images, strings)."""
    if not spec.dtype.is_bytes and (spec.image is None or _numeric(values)):
        return from_values(values, spec.dtype, where)
    decoded, found_bytes = _decode_b64(values, where, 0)
    if found_bytes or spec.dtype.is_bytes:
        return from_values(decoded, BYTES, where)
    return from_values(decoded, spec.dtype, where)


def _numeric(value: object) -> bool:
    """Whether the first leaf of nested lists is a number: an image input sent as a tensor, whose every
    value need not be searched for `{"b64": ...}` (a mix of both is refused by the tensor's conversion)."""
    for _ in range(33):
        if not isinstance(value, list) or not value:
            break
        value = value[0]
    return isinstance(value, int | float)


def _decode_b64(value: object, where: str, depth: int) -> tuple[object, bool]:
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise InvalidInput(f"{where}: an object value must be {{\"b64\": \"<base64 string>\"}}")
        try:
            return base64.b64decode(value["b64"], validate=True), True
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}: 'b64' is not valid base64") from None
    if isinstance(value, list) and depth < 32:
        items = [_decode_b64(v, where, depth + 1) for v in value]
        return [v for v, _ in items], any(found for _, found in items)
    return value, False


def encode(instance: object, nonfinite: bool = False) -> str:
    """One instance as it is stored: JSON; with `nonfinite`, NaN and Infinity stay tokens (orjson writes null)."""
    return json.dumps(instance, separators=(",", ":")) if nonfinite else orjson.dumps(instance).decode()


def decode(text: str | bytes) -> object:
    """A stored instance's value."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)  # NaN or Infinity tokens, which orjson does not read


def encoded(version: ModelVersion, contents: list[bytes]) -> dict[str, np.ndarray]:
    """Encoded images (files, stored raw inputs) as the arrays of the model's one image or bytes input, one
    instance each."""
    takes = [t for t in version.spec.inputs if t.image is not None or t.dtype.is_bytes]
    if len(version.spec.inputs) != 1 or not takes:
        raise InvalidInput(f"model {version.name!r} does not take a single image input; send JSON instead")
    array = np.empty(len(contents), dtype=object)
    array[:] = contents
    return {takes[0].name: array}


def from_stored(version: ModelVersion, kind: str, content: bytes) -> dict[str, np.ndarray]:
    """A stored raw input as the arrays of one instance: an encoded image for the model's one image
    input (kind `image`), or the JSON of a row-format instance (kind `instance`)."""
    if kind == "image":
        return encoded(version, [content])
    try:
        value = decode(content)
    except ValueError:
        raise InvalidInput("the stored instance is not JSON") from None
    return parse({"instances": [value]}, version)[0]
