"""The `[monitoring]` table of a model's spec: which predictions the prediction log records, and how its inputs
are judged against the reference statistics of its training data (outliers, drift)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from models.fields import Fields

RULES = ("none", "range", "z_score")


@dataclass(frozen=True)
class Monitoring:
    """Per-model monitoring settings; the defaults log nothing."""

    log_rate: float = 0.0
    """Fraction of predictions recorded in the prediction log, from 0 (none: the default) to 1 (all)."""
    features: bool = True
    """Record a logged prediction's input features; False records only their digest (big inputs). Encoded
    images are always recorded by their digest alone."""
    outliers: str = "range"
    """How a logged row is flagged as an outlier against the reference statistics: `range` (a feature outside the
    training data's [min, max]), `z_score` (a feature further than `z_score` standard deviations from its mean),
    or `none`."""
    z_score: float = 4.0
    """The distance from the mean, in standard deviations, past which `outliers = "z_score"` flags a feature."""
    drift_window: int = 1000
    """How many of the latest logged rows of a version the drift check compares with the reference; a version is
    checked once it has logged that many (at least 100: on fewer, the PSI of unchanged inputs is too noisy)."""
    drift_threshold: float = 0.2
    """The population stability index past which a feature's drift alerts."""


def parse(t: Fields) -> Monitoring:
    """The `[monitoring]` table, checked; every default when the table is absent."""
    monitoring = Monitoring(
        log_rate=_finite(t, "log_rate", t.number("log_rate", 0.0, minimum=0.0, maximum=1.0)),
        features=t.bool("features", True),
        outliers=t.choice("outliers", list(RULES), "range"),
        z_score=_positive(t, "z_score", t.number("z_score", 4.0)),
        drift_window=t.int("drift_window", 1000, minimum=100),
        drift_threshold=_positive(t, "drift_threshold", t.number("drift_threshold", 0.2)),
    )
    t.done()
    if "z_score" in t.table and monitoring.outliers != "z_score":
        raise t.fail("z_score", 'applies only with outliers = "z_score"')
    return monitoring


def _finite(t: Fields, key: str, value: float) -> float:
    if not math.isfinite(value):
        raise t.fail(key, f"must be a finite number, got {value}")
    return value


def _positive(t: Fields, key: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise t.fail(key, f"must be a finite number above 0, got {value}")
    return value
