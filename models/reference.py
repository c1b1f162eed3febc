"""Reference statistics of a model's training inputs, and what is measured against them: outliers per row, and
the drift of recent inputs per feature as a population stability index (PSI).

A version's statistics live beside its artefact (`<model>/<version>/reference.json`, written by `make models`
for the reference models). Every numeric input whose rows have a fixed size is monitored, one feature per value
of a row: `features[0]` ... `features[3]` for an input `features` of shape [-1, 4], `x` for a shape [-1].
Features are compared as float32, on both sides: a value read back from the log's JSON (`5.1`) falls in the
same bin as the float32 the model was fed, and a training value equal to an edge on the edge's side.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.monitoring import Monitoring
from models.registry import ModelVersion
from models.spec import ModelSpec

log = logging.getLogger(__name__)
FILE = "reference.json"
BINS = 10
"""Quantile bins per feature: their inner edges are the training data's deciles (fewer where values repeat)."""
FLOOR = 1e-4
"""A bin's share below this counts as this, so an empty bin gives a large PSI, never an infinite one."""
NUMERIC = "biuf"


@dataclass(frozen=True)
class Feature:
    """One feature's statistics: bin edges and the share of training rows in each bin, and its moments."""

    name: str
    edges: tuple[float, ...]
    """Inner edges: bin i holds values up to edges[i] (and above edges[i-1]); the last bin, values above all."""
    proportions: tuple[float, ...]
    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class Reference:
    """The statistics of every monitored feature of a model's training inputs."""

    rows: int
    features: tuple[Feature, ...]

    @functools.cached_property
    def names(self) -> list[str]:
        """The features' names, in order."""
        return [f.name for f in self.features]

    @functools.cached_property
    def columns(self) -> dict[str, np.ndarray]:
        """Each statistic as one array over the features: `mean`, `std`, `min`, `max`."""
        return {key: np.array([getattr(f, key) for f in self.features], dtype=np.float32)
                for key in ("mean", "std", "min", "max")}


def feature_names(spec: ModelSpec) -> list[str]:
    """The monitored features of a model, in order: one per value of a row of each fixed-size numeric input."""
    names = []
    for t in spec.inputs:
        if t.dtype.is_bytes or -1 in t.shape[1:]:
            continue
        size = math.prod(t.shape[1:])
        names += [t.name] if len(t.shape) == 1 else [f"{t.name}[{j}]" for j in range(size)]
    return names


def matrix(spec: ModelSpec, inputs: Mapping[str, object]) -> np.ndarray | None:
    """The monitored features of a request's rows as one float matrix (rows x features); None when some
    monitored input is missing or not numbers (encoded images), or the model has no monitored feature."""
    parts = []
    for t in spec.inputs:
        if t.dtype.is_bytes or -1 in t.shape[1:]:
            continue
        if t.name not in inputs:
            return None
        value = np.asarray(inputs[t.name])
        if value.dtype.kind not in NUMERIC or not value.ndim or value.size != value.shape[0] * math.prod(t.shape[1:]):
            return None
        parts.append(value.reshape(value.shape[0], -1).astype(np.float32))
    return np.concatenate(parts, axis=1) if parts and len({p.shape[0] for p in parts}) == 1 else None


def compute(x: np.ndarray, names: list[str], bins: int = BINS) -> Reference:
    """The statistics of the rows `x` (rows x features), one feature per name."""
    if x.ndim != 2 or x.shape[1] != len(names) or not len(x):
        raise ValueError(f"expected rows of {len(names)} features, got an array of shape {x.shape}")
    return Reference(len(x), tuple(_feature(name, x[:, j].astype(np.float32), bins) for j, name in enumerate(names)))


def _feature(name: str, values: np.ndarray, bins: int) -> Feature:
    edges = np.unique(np.quantile(values.astype(np.float64), np.linspace(0, 1, bins + 1)[1:-1]).astype(np.float32))
    wide = values.astype(np.float64)
    return Feature(name, _floats(edges), tuple(round(float(s), 6) for s in _shares(edges, values)),
                   *_floats([wide.mean(), wide.std(), values.min(), values.max()]))


def _floats(values: object) -> tuple[float, ...]:
    """Numbers as float32 and written as short as float32 allows (`5.1`, not 5.099999904632568)."""
    return tuple(float(str(v)) for v in np.asarray(values, dtype=np.float32))


def _shares(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The share of `values` in each bin the edges make."""
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def psi(feature: Feature, values: np.ndarray) -> float:
    """The population stability index of `values` against the feature's training distribution: the sum over
    bins of (actual - expected) * ln(actual / expected); about 0 for the same distribution, 0.2 a large shift."""
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0
    actual = np.maximum(_shares(np.asarray(feature.edges, dtype=np.float32), values.astype(np.float32)), FLOOR)
    expected = np.maximum(np.asarray(feature.proportions), FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def outliers(reference: Reference, monitoring: Monitoring, x: np.ndarray) -> list[dict[str, object]]:
    """The rows of `x` that are outliers by the spec's rule, each with the features that make it one."""
    if monitoring.outliers == "none" or x.shape[1] != len(reference.features):
        return []
    stats = reference.columns
    with np.errstate(divide="ignore", invalid="ignore"):
        if monitoring.outliers == "range":
            outside = (x < stats["min"]) | (x > stats["max"])
        else:
            distance = np.abs(x.astype(np.float64) - stats["mean"])
            outside = distance > monitoring.z_score * stats["std"].astype(np.float64)
    rows = np.flatnonzero(outside.any(axis=1))
    return [{"row": int(i), "features": [reference.names[j] for j in np.flatnonzero(outside[i])]} for i in rows]


def to_json(reference: Reference) -> str:
    """The statistics as the file holds them."""
    lines = [f" {json.dumps(f.name)}: " + json.dumps({"edges": f.edges, "proportions": f.proportions, "mean": f.mean,
                                                     "std": f.std, "min": f.min, "max": f.max})
             for f in reference.features]
    return f'{{"rows": {reference.rows}, "features": {{\n' + ",\n".join(lines) + "\n}}\n"


def from_json(text: str) -> Reference:
    """Statistics read back from their file's text; ValueError when it is not such a file."""
    try:
        table = json.loads(text)
        features = tuple(Feature(name, tuple(f["edges"]), tuple(f["proportions"]), f["mean"], f["std"], f["min"],
                                 f["max"]) for name, f in table["features"].items())
        reference = Reference(int(table["rows"]), features)
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not reference statistics: {exc!r}") from None
    if any(len(f.proportions) != len(f.edges) + 1 for f in features):
        raise ValueError("not reference statistics: a feature's proportions do not fit its edges")
    return reference


_loaded: dict[Path, tuple[tuple[int, int], Reference | None]] = {}


def of(version: ModelVersion) -> Reference | None:
    """A version's reference statistics, if its folder has them and they fit its spec's features; read again
    when the file changes."""
    path = version.session.path.parent / FILE
    try:
        status = os.stat(path)
    except OSError:
        return None
    stamp = (status.st_mtime_ns, status.st_size)
    cached = _loaded.get(path)
    if cached is None or cached[0] != stamp:
        cached = _loaded[path] = (stamp, _read(path, feature_names(version.spec)))
    return cached[1]


def _read(path: Path, names: list[str]) -> Reference | None:
    try:
        reference = from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        log.warning("%s cannot be read, so it is not used: %s", path, exc)
        return None
    if reference.names != names:
        log.warning("%s describes features %s, not the spec's %s, so it is not used", path, reference.names, names)
        return None
    return reference
