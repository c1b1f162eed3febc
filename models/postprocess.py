"""Outputs derived from the graph's outputs after it runs, named in the spec."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from models.fields import Fields

if TYPE_CHECKING:
    from models.spec import ModelSpec
    from models.tensor import TensorSpec


def argmax_label(labels: tuple[str, ...], scores: np.ndarray) -> np.ndarray:
    """The label of the highest score in each row."""
    return _label_array(labels)[scores.argmax(axis=-1)]


@functools.cache
def _label_array(labels: tuple[str, ...]) -> np.ndarray:
    return np.asarray(labels, dtype=object)


DERIVATIONS: dict[str, Callable[[tuple[str, ...], np.ndarray], np.ndarray]] = {"argmax_label": argmax_label}


def derive(spec: ModelSpec, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Add the spec's derived outputs to what the graph produced."""
    for out in spec.derived_outputs:
        outputs[out.name] = DERIVATIONS[out.derive](spec.labels, outputs[out.source])
    return outputs


def check(spec: ModelSpec, out: TensorSpec, where: Fields) -> None:
    """Check a derived output against the spec: its source, the labels, its type and shape."""
    sources = {o.name: o for o in spec.runtime_outputs}
    source = sources.get(out.source or "")
    if source is None:
        raise where.fail("source", f"must name one of the graph's outputs ({', '.join(sources)})")
    if not spec.labels:
        raise where.fail("derive", "argmax_label needs the spec's `labels`")
    if not out.dtype.is_bytes:
        raise where.fail("dtype", "argmax_label yields strings: use dtype = \"bytes\"")
    if source.shape[-1] not in (-1, len(spec.labels)):
        raise where.fail("source", f"has {source.shape[-1]} classes but there are {len(spec.labels)} labels")
    if out.shape != source.shape[:-1]:
        raise where.fail("shape", f"must be the source's shape without its last axis, {list(source.shape[:-1])}")
