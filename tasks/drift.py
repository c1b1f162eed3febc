"""Drift checks: a model version's latest logged inputs against the reference statistics of its training data.

Each feature gets a population stability index (PSI) over the latest `drift_window` logged rows (a version that
has logged fewer is not checked yet); a check alerts when some feature's PSI reaches the spec's `drift_threshold`.
Checks are stored in `drift_checks`, and each PSI is set on the `platform_model_input_drift_psi` gauge when
prometheus-client is installed.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import sqlalchemy as sa

import models
from models import reference
from tasks.db import drift_checks, iso, now
from tasks.logbook import LogBook

try:
    from prometheus_client import Gauge
except ImportError:  # the metrics are optional; the checks work without them
    PSI_GAUGE = None
else:
    PSI_GAUGE = Gauge("platform_model_input_drift_psi", "Population stability index of a model version's latest logged "
                      "inputs against its training data, per feature.", ["model", "version", "feature"],
                      multiprocess_mode="mostrecent")


@dataclass(frozen=True)
class Check:
    """One drift check of a model version: the PSI of each feature over the rows compared."""

    model: str
    version: int
    rows: int
    threshold: float
    psi: dict[str, float]
    checked_at: datetime.datetime

    @property
    def worst(self) -> float:
        """The largest PSI of any feature."""
        return max(self.psi.values(), default=0.0)

    @property
    def alert(self) -> bool:
        """Whether some feature drifted past the threshold."""
        return self.worst >= self.threshold

    def public(self) -> dict[str, Any]:
        """The check as the API shows it."""
        features = {name: {"psi": value, "alert": value >= self.threshold} for name, value in self.psi.items()}
        return {"version": self.version, "checked_at": iso(self.checked_at), "rows": self.rows,
                "threshold": self.threshold, "alert": self.alert, "worst": self.worst, "features": features}


def measure(version: models.ModelVersion, logged: list[dict[str, Any]]) -> Check | None:
    """Compare the features of logged records (newest first) with the version's reference statistics, over the
    latest `drift_window` rows; None without statistics, or with fewer rows logged than that."""
    statistics, monitoring = reference.of(version), version.spec.monitoring
    if statistics is None:
        return None
    matrices = [x for x in (reference.matrix(version.spec, inputs) for inputs in logged) if x is not None]
    if not matrices:
        return None
    x = np.concatenate(matrices)[:monitoring.drift_window]
    if len(x) < monitoring.drift_window:
        return None
    psi = {f.name: round(reference.psi(f, x[:, j]), 6) for j, f in enumerate(statistics.features)}
    return Check(version.name, version.number, len(x), monitoring.drift_threshold, psi, now())


class DriftStore:
    """Drift checks in the SQL store."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def save(self, check: Check) -> None:
        """Store one check."""
        with self.engine.begin() as connection:
            connection.execute(drift_checks.insert().values(
                model=check.model, version=check.version, row_count=check.rows, threshold=check.threshold,
                psi=orjson.dumps(check.psi).decode(), worst=check.worst, alert=check.alert,
                checked_at=check.checked_at))

    def latest(self, model: str, version: int) -> Check | None:
        """The latest check of a model version, if it was ever checked."""
        c = drift_checks.c
        select = (sa.select(c.row_count, c.threshold, c.psi, c.checked_at)
                  .where(c.model == model, c.version == version).order_by(c.id.desc()).limit(1))
        with self.engine.connect() as connection:
            found = connection.execute(select).first()
        if found is None:
            return None
        return Check(model, version, found.row_count, found.threshold, orjson.loads(found.psi), found.checked_at)


def check(version: models.ModelVersion, book: LogBook, store: DriftStore) -> Check | None:
    """Check one version's drift over its latest logged rows; store the check and set the gauge."""
    logged = book.recent_inputs(version.name, version.number, version.spec.monitoring.drift_window)
    found = measure(version, logged)
    if found is not None:
        store.save(found)
        if PSI_GAUGE is not None:
            for feature, value in found.psi.items():
                PSI_GAUGE.labels(found.model, str(found.version), feature).set(value)
    return found
