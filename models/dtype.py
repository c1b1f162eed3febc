"""Tensor element types and their names in each protocol we speak."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type: its spec name, numpy type, V2 datatype, TF dtype and ONNX type."""

    name: str
    numpy: np.dtype
    v2: str
    tf: str
    onnx: str

    @property
    def is_bytes(self) -> bool:
        """Whether elements are byte strings rather than numbers."""
        return self.numpy.kind == "O"

    @property
    def is_float(self) -> bool:
        """Whether elements are floating point (and may be NaN or infinite)."""
        return self.numpy.kind == "f"


_TYPES = [
    DType("bool", np.dtype(np.bool_), "BOOL", "DT_BOOL", "tensor(bool)"),
    DType("uint8", np.dtype(np.uint8), "UINT8", "DT_UINT8", "tensor(uint8)"),
    DType("uint16", np.dtype(np.uint16), "UINT16", "DT_UINT16", "tensor(uint16)"),
    DType("uint32", np.dtype(np.uint32), "UINT32", "DT_UINT32", "tensor(uint32)"),
    DType("uint64", np.dtype(np.uint64), "UINT64", "DT_UINT64", "tensor(uint64)"),
    DType("int8", np.dtype(np.int8), "INT8", "DT_INT8", "tensor(int8)"),
    DType("int16", np.dtype(np.int16), "INT16", "DT_INT16", "tensor(int16)"),
    DType("int32", np.dtype(np.int32), "INT32", "DT_INT32", "tensor(int32)"),
    DType("int64", np.dtype(np.int64), "INT64", "DT_INT64", "tensor(int64)"),
    DType("float16", np.dtype(np.float16), "FP16", "DT_HALF", "tensor(float16)"),
    DType("float32", np.dtype(np.float32), "FP32", "DT_FLOAT", "tensor(float)"),
    DType("float64", np.dtype(np.float64), "FP64", "DT_DOUBLE", "tensor(double)"),
    DType("bytes", np.dtype(object), "BYTES", "DT_STRING", "tensor(string)"),
]

BY_NAME = {t.name: t for t in _TYPES} | {"string": _TYPES[-1]}
BY_V2 = {t.v2: t for t in _TYPES}
BY_ONNX = {t.onnx: t for t in _TYPES}
BY_NUMPY = {t.numpy: t for t in _TYPES}
BYTES = BY_NAME["bytes"]
