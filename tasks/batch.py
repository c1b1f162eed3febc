"""The batch pattern's tasks, all on the `batch` queue, which has worker pools of its own.

`batch_run` starts a run and fans it out as `batch_chunk` tasks; each claims a chunk of the run's queued
items, predicts them with one runtime call per model version, and writes them back in bulk. A chunk task
retried after losing its worker takes back, under its own claim token, what its lost attempt held.
`batch_scheduled` is what beat fires for `BATCH_SCHEDULE`; `batch_reconcile`, also fired by beat, puts back
items whose lease ran out and restarts stalled runs, which covers killed workers and lost messages.
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
from tasks import schedule
from tasks.config import TaskSettings
from tasks.db import now
from tasks.items import RUNNING, Claimed
from tasks.resources import items, registry, runs
from tasks.runs import Run, RunRefused

log = logging.getLogger(__name__)
RETRIED: dict[str, Any] = {
    "bind": True, "acks_late": True, "max_retries": 3, "default_retry_delay": 1,
    "autoretry_for": (sa.exc.OperationalError,), "retry_backoff": True, "retry_backoff_max": 30,  # a database blip
    "ignore_result": True,  # the SQL store holds every outcome; Flower shows the summary from the task's events
}


@shared_task(name="batch_run", **RETRIED)
def batch_run(self: Task, run_id: int) -> dict[str, Any]:
    """Start a queued run: fix its scope and total, then queue its chunks."""
    return start(self.app, run_id)


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
def batch_chunk(self: Task, run_id: int, first: int, last: int) -> dict[str, Any]:
    """Claim a run's queued items with ids from `first` to `last`, predict them, write the outcomes back;
    finish the run if it is done."""
    run, store = runs().get(run_id), items()
    if run.status != RUNNING:
        return {"run_id": run_id, "rows": 0, "skipped": f"run is {run.status}"}
    span = (first, min(last, run.high_water or 0))
    held = store.reclaim(run.model, span, self.request.id) if self.request.retries else []
    claimed = held + store.claim(run.id, run.model, span, self.request.id, chunk_rows() - len(held))
    predictions, errors = _predict(run.model, claimed)
    progress = store.finish(run.id, self.request.id, predictions, errors)
    if progress.complete or not claimed:
        runs().finish_if_done(run.id)
    return {"run_id": run_id, "rows": len(claimed), "succeeded": len(predictions), "failed": len(errors),
            "run_done": progress.succeeded + progress.failed, "run_total": progress.total}  # Flower shows this


@shared_task(name="batch_reconcile", bind=True, ignore_result=True)
def batch_reconcile(self: Task) -> dict[str, int]:
    """Put back items held past their lease; restart runs whose start or chunks were lost; finish runs
    that are done."""
    live = runs().live()
    back = items().expire_leases([run.model for run in live])
    lease = datetime.timedelta(seconds=TaskSettings.from_env().batch_item_lease_s)
    sent = finished = 0
    for run in live:
        stale = (run.updated_at or run.created_at) < now() - lease
        if run.status != RUNNING:
            if stale:
                self.app.tasks["batch_run"].apply_async(args=[run.id], queue="batch")
                sent += 1
            continue
        if runs().finish_if_done(run.id):
            finished += 1
        elif run.id in back or stale:  # lost rows or lost messages: chunks for whatever is still queued
            sent += fan_out(self.app, run)
            runs().touch(run.id)
    if back or sent:
        log.warning("reconciled batch runs: %d items back in line, %d tasks sent", sum(back.values()), sent)
    return {"items put back": sum(back.values()), "tasks sent": sent, "runs finished": finished}


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
            outcomes = predict_json(registry().get(model, number), [item.input for item in group])
        except models.ModelError as exc:
            outcomes = [(False, str(exc))] * len(group)
        for item, (ok, text) in zip(group, outcomes, strict=True):
            (predictions if ok else errors)[item.id] = text
    return predictions, errors
