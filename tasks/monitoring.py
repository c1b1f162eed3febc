"""The prediction log's tasks, fired by beat on the `batch` queue (they write to the SQL store).

`drain_prediction_log` moves the Redis stream into the SQL store every `PREDICTION_LOG_DRAIN_S`; `check_drift`
compares each monitored version's latest logged inputs with its reference statistics every `DRIFT_CHECK_S`.
A fire the SQL store or Redis cannot serve is skipped: the stream keeps the records for the next one.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task, shared_task

from tasks import drift, outage
from tasks.config import TaskSettings
from tasks.logbook import LogBook, drain
from tasks.prediction_log import LogSettings
from tasks.resources import engine, jobs, registry

log = logging.getLogger(__name__)


def beat_entries(settings: LogSettings) -> dict[str, dict[str, Any]]:
    """The beat schedule's entries of the prediction log; a fire not started within its period is dropped."""
    return {
        "drain-prediction-log": {"task": "drain_prediction_log", "schedule": settings.drain_s,
                                 "options": {"queue": "batch", "expires": max(settings.drain_s, 10.0)}},
        "check-drift": {"task": "check_drift", "schedule": settings.drift_check_s,
                        "options": {"queue": "batch", "expires": settings.drift_check_s}},
    }


@shared_task(name="drain_prediction_log", bind=True, ignore_result=True)
def drain_prediction_log(self: Task) -> dict[str, int]:
    """Move the prediction log's records from the Redis stream to the SQL store."""
    settings = TaskSettings.from_env()
    try:
        return outage.skipped("prediction log drain", lambda: {"records": drain(
            jobs().client, LogBook(engine()), settings.task_time_limit_s / 2, settings.visibility_timeout_s)})
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.warning("prediction log drain skipped: Redis is unavailable (%s)", exc)
        return {}


@shared_task(name="check_drift", bind=True, ignore_result=True)
def check_drift(self: Task) -> dict[str, int]:
    """Check the drift of every version of every model that logs its predictions."""
    return outage.skipped("drift check", check_all)


def check_all() -> dict[str, int]:
    """Check every logged model version that has reference statistics; answer how many were checked and alert."""
    book, store = LogBook(engine()), drift.DriftStore(engine())
    checked = alerts = 0
    for model in registry().models():
        if model.spec.monitoring.log_rate <= 0:
            continue
        for version in model.versions.values():
            found = drift.check(version, book, store)
            checked += found is not None
            alerts += found is not None and found.alert
    if alerts:
        log.warning("drift checks: %d of %d model versions drifted past their threshold", alerts, checked)
    return {"checked": checked, "alerts": alerts}
