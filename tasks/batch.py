"""The batch pattern's tasks, all on the `batch` queue, which has worker pools of its own.

`batch_run` starts a run and fans it out as `batch_chunk` tasks; each claims a chunk of the run's queued
items, predicts them with one runtime call per model version, and writes them back in bulk. A chunk task
retried after losing its worker takes back, under its own claim token, what its lost attempt held.
`batch_scheduled` is what beat fires for `BATCH_SCHEDULE`; `batch_reconcile`, also fired by beat, puts back
items whose lease ran out and restarts stalled runs, which covers killed workers and lost messages.

The SQL store going away costs no item a try: a task it stops is retried with a growing wait, and a chunk
so retried takes back what it held without counting a try; the reconciler renews, rather than expires,
the leases of runs it could not look at for two of its periods, since their holders were stopped too.
`purge_expired`, fired by beat every `PURGE_INTERVAL_S`, deletes what is past its retention.
"""

from __future__ import annotations

import datetime
import logging
from collections import defaultdict
from typing import Any

import sqlalchemy as sa
from celery import Celery, Task, shared_task

import models
from models.batch import predict_json
from tasks import outage, prediction_log, retention, schedule
from tasks.config import TaskSettings
from tasks.db import now
from tasks.items import RUNNING, Claimed, Span
from tasks.prediction_log import LogSettings
from tasks.resources import engine, items, registry, runs
from tasks.runs import Run, RunRefused

log = logging.getLogger(__name__)
RETRIED: dict[str, Any] = {
    "bind": True, "acks_late": True, "max_retries": 3, "default_retry_delay": 1,  # retries after a lost worker
    "ignore_result": True,  # the SQL store holds every outcome; Flower shows the summary from the task's events
}


@shared_task(name="batch_run", **RETRIED)
def batch_run(self: Task, run_id: int) -> dict[str, Any]:
    """Start a queued run: fix its scope and total, then queue its chunks."""
    try:
        return start(self.app, run_id)
    except sa.exc.DBAPIError as exc:
        outage.retry(self, exc)


@shared_task(name="batch_scheduled", bind=True, ignore_result=True)
def batch_scheduled(self: Task, model: str, when: str) -> dict[str, Any]:
    """Create and start the run of one schedule entry; a second fire in the same period does nothing."""
    try:
        run = runs().create(model, f"schedule {when}", schedule.period(when))
    except RunRefused as exc:
        log.info("scheduled run of %s skipped: %s", model, exc)
        return {"skipped": str(exc)}
    return start(self.app, run.id)


@shared_task(name="batch_chunk", **RETRIED)
def batch_chunk(self: Task, run_id: int, first: int, last: int, resumes: int = 0) -> dict[str, Any]:
    """Claim a run's queued items with ids from `first` to `last`, predict them, write the outcomes back;
    finish the run if it is done. `resumes` numbers the retry that follows a store outage."""
    try:
        return chunk(self, run_id, (first, last), lost=self.request.retries != resumes)
    except sa.exc.DBAPIError as exc:
        outage.retry(self, exc, resumes=self.request.retries + 1)


def chunk(task: Task, run_id: int, ids: Span, lost: bool) -> dict[str, Any]:
    """Do a chunk task's work; a retry takes back what the task held before, counting a try if the attempt
    was `lost` with its worker rather than stopped by the store."""
    run, store = runs().get(run_id), items()
    if run.status != RUNNING:
        return {"run_id": run_id, "rows": 0, "skipped": f"run is {run.status}"}
    span, token = (ids[0], min(ids[1], run.high_water or 0)), task.request.id
    held = store.reclaim(run.model, span, token, count=lost) if task.request.retries else []
    claimed = held + store.claim(run.id, run.model, span, token, chunk_rows() - len(held))
    predictions, errors = _predict(run.model, claimed)
    prediction_log.log_items(registry(), run.model, claimed, predictions)
    progress = store.finish(run.id, token, predictions, errors)
    if progress.complete or not claimed:
        runs().finish_if_done(run.id)
    return {"run_id": run_id, "rows": len(claimed), "succeeded": len(predictions), "failed": len(errors),
            "run_done": progress.succeeded + progress.failed, "run_total": progress.total}  # Flower shows this


@shared_task(name="batch_reconcile", bind=True, ignore_result=True)
def batch_reconcile(self: Task) -> dict[str, int]:
    """Put back items held past their lease; restart runs whose start or chunks were lost; finish runs
    that are done."""
    return outage.skipped("batch reconcile", lambda: reconcile(self.app, TaskSettings.from_env()))


@shared_task(name="purge_expired", bind=True, ignore_result=True)
def purge_expired(self: Task) -> dict[str, int]:
    """Delete finished batch items and runs, stored inputs, and logged predictions, past their retention."""
    settings = TaskSettings.from_env()
    purged = outage.skipped("purge", lambda: retention.purge(
        engine(), settings.batch_retention_days, settings.data_retention_days, settings.task_time_limit_s / 2,
        log_days=LogSettings.from_env().retention_days))
    log.info("purged rows past their retention: %s", purged)
    return purged


def reconcile(app: Celery, settings: TaskSettings) -> dict[str, int]:
    """Renew or expire lapsed leases, restart stalled runs, finish runs that are done."""
    live = runs().live()
    away = {run.model for run in live if run.unwatched(datetime.timedelta(seconds=2 * settings.batch_reconcile_s))}
    renewed = items().renew_leases(sorted(away))
    back = items().expire_leases([run.model for run in live if run.model not in away])
    lease = datetime.timedelta(seconds=settings.batch_item_lease_s)
    sent = finished = 0
    for run in live:
        if runs().finish_if_done(run.id):
            finished += 1
        elif run.id in back or (run.updated_at or run.created_at) < now() - lease:
            sent += restart(app, run)
    runs().reconciled([run.id for run in live])
    if renewed or back or sent:
        log.warning("reconciled batch runs: %d leases renewed, %d items back in line, %d tasks sent",
                    renewed, sum(back.values()), sent)
    return {"leases renewed": renewed, "items put back": sum(back.values()), "tasks sent": sent,
            "runs finished": finished}


def restart(app: Celery, run: Run) -> int:
    """Send a stalled run's start again if it is queued, else chunks for whatever it still has queued;
    answer how many tasks went."""
    if run.status != RUNNING:
        app.tasks["batch_run"].apply_async(args=[run.id], queue="batch")
        return 1
    runs().touch(run.id)
    return fan_out(app, run)


def start(app: Celery, run_id: int) -> dict[str, Any]:
    """Start a queued run and queue one chunk task per `BATCH_CHUNK_ROWS` of its items."""
    store = runs()
    run = store.get(run_id)
    try:
        registry().get(run.model)
    except models.ModelError as exc:
        store.fail(run_id, str(exc))
        return {"run_id": run_id, "failed": str(exc)}
    started = store.start(run_id)
    if started is None:
        return {"run_id": run_id, "skipped": "not queued"}
    chunks = fan_out(app, started)
    if not started.total:
        store.finish_if_done(run_id)
    log.info("batch run %d of %s: %d items in %d chunks", run_id, run.model, started.total, chunks)
    return {"run_id": run_id, "total": started.total, "chunks": chunks}


def fan_out(app: Celery, run: Run) -> int:
    """Queue one chunk task per `BATCH_CHUNK_ROWS` of the run's queued items; answer how many."""
    spans = runs().spans(run, chunk_rows())
    for first, last in spans:
        app.tasks["batch_chunk"].apply_async(args=[run.id, first, last], queue="batch")
    return len(spans)


def chunk_rows() -> int:
    """Items one chunk task takes."""
    return TaskSettings.from_env().batch_chunk_rows


def _predict(model: str, claimed: list[Claimed]) -> tuple[dict[int, str], dict[int, str]]:
    """Predictions and errors by item id, one runtime call per model version."""
    by_version: dict[int, list[Claimed]] = defaultdict(list)
    for item in claimed:
        by_version[item.version].append(item)
    predictions: dict[int, str] = {}
    errors: dict[int, str] = {}
    for number, group in by_version.items():
        try:
            found = registry().get(model, number)
            outcomes = predict_json(found, [item.input for item in group], found.limits.batch_chunk_pixels)
        except models.ModelError as exc:
            outcomes = [(False, str(exc))] * len(group)
        for item, (ok, text) in zip(group, outcomes, strict=True):
            (predictions if ok else errors)[item.id] = text
    return predictions, errors
