"""How far a shadow's answer agrees with the live one, row by row."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.errors import ModelError

CLASSES = {"b": "number", "i": "number", "u": "number", "O": "text", "S": "text", "U": "text", "f": "float"}
"""What a numpy kind holds: class-like numbers and text (labels, label names, flags) are compared for equality,
floats for closeness; two outputs are compared only when they hold the same."""
RTOL, ATOL = 1e-4, 1e-6
"""Float outputs agree when `numpy.isclose` says so with these tolerances."""


class Incomparable(ModelError):
    """The two answers share no output of one shape to compare."""


def compare(live: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """Rows compared, and rows on which `shadow` agrees with `live`: the same value in every class-like output
    both have (labels); when they share none, every float output close (`numpy.isclose`)."""
    shared = [n for n in live if n in shadow and _comparable(live[n], shadow[n])]
    discrete = [n for n in shared if CLASSES[live[n].dtype.kind] != "float"]
    names = discrete or shared
    if not names:
        raise Incomparable(f"no output of the same name and shape to compare (live: {sorted(live)}, "
                           f"shadow: {sorted(shadow)})")
    rows = live[names[0]].shape[0]
    agreed = np.ones(rows, dtype=bool)
    for name in names:
        same = _same(live[name], shadow[name], discrete=bool(discrete))
        agreed &= same.reshape(rows, -1).all(axis=1)
    return rows, int(agreed.sum())


def _comparable(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two outputs have rows, one shape, and hold the same kind of values."""
    holds = CLASSES.get(a.dtype.kind)
    return a.ndim > 0 and a.shape == b.shape and holds is not None and holds == CLASSES.get(b.dtype.kind)


def _same(a: np.ndarray, b: np.ndarray, discrete: bool) -> np.ndarray:
    if discrete:
        return np.asarray(a == b, dtype=bool)
    return np.isclose(a, b, rtol=RTOL, atol=ATOL)
