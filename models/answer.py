"""A prediction's outputs as JSON answers, in TensorFlow Serving's row or columnar form.

Both the web process (`:predict`, a job's result) and the workers (a job's callback) answer this way.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np


def rows(outputs: Mapping[str, np.ndarray], wanted: list[str]) -> dict[str, Any]:
    """Row-format answer (`instances` in): the bare value per row with one output, else an object per row."""
    columns = [_rows_of(outputs[name]) for name in wanted]
    if len(columns) == 1:
        return {"predictions": columns[0]}
    return {"predictions": [dict(zip(wanted, row, strict=True)) for row in zip(*columns, strict=True)]}


def columns(outputs: Mapping[str, np.ndarray], wanted: list[str]) -> dict[str, Any]:
    """Columnar answer (`inputs` in): the bare tensor with one output, else an object of tensors."""
    if len(wanted) == 1:
        return {"outputs": _jsonable(outputs[wanted[0]])}
    return {"outputs": {name: _jsonable(outputs[name]) for name in wanted}}


def _rows_of(array: np.ndarray) -> list:
    """One JSON value per row; float rows stay numpy so orjson writes float32 as float32."""
    if array.dtype.kind == "O":
        return _jsonable(array)
    return list(array) if array.ndim > 1 or array.dtype.kind == "f" else array.tolist()


def _jsonable(array: np.ndarray) -> object:
    if array.dtype.kind == "O":
        return [_text(v) for v in array.reshape(-1)] if array.ndim == 1 else [_jsonable(a) for a in array]
    return array


def _text(value: object) -> object:
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode()}
    return value
