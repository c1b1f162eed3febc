"""Retention: what the SQL store deletes once it is old enough, a bounded batch of rows at a time.

Finished batch items (`succeeded` or `failed`) and ended runs go `BATCH_RETENTION_DAYS` after they finished;
stored inputs of the data cache `DATA_RETENTION_DAYS` after they were stored; logged predictions and drift checks
`PREDICTION_LOG_RETENTION_DAYS` after they were made; 0 keeps them. A queued or
running item and a queued or running run are never deleted. Each statement deletes at most `PURGE_ROWS`
rows, chosen by a read that takes no locks and checked again by the DELETE, so a purge never holds a big
table for long, and a row that changed in between (a failed item queued again by a run's start) stays.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable

import sqlalchemy as sa

from tasks.db import data, drift_checks, items, now, prediction_log, runs
from tasks.items import FAILED, QUEUED, RUNNING, SUCCEEDED

PURGE_ROWS = 1000
"""Rows one DELETE statement removes at most."""

Expired = Callable[[datetime.datetime], list[sa.ColumnElement[bool]]]


def finished_items(before: datetime.datetime) -> list[sa.ColumnElement[bool]]:
    """Batch items that finished before `before` (they were created earlier still)."""
    return [items.c.created_at < before, items.c.status.in_((SUCCEEDED, FAILED)), items.c.finished_at < before]


def ended_runs(before: datetime.datetime) -> list[sa.ColumnElement[bool]]:
    """Batch runs that ended before `before`."""
    return [runs.c.active.is_(None), runs.c.status.not_in((QUEUED, RUNNING)), runs.c.finished_at < before]


def stored_inputs(before: datetime.datetime) -> list[sa.ColumnElement[bool]]:
    """Stored inputs of the data cache stored before `before`."""
    return [data.c.created_at < before]


def logged_predictions(before: datetime.datetime) -> list[sa.ColumnElement[bool]]:
    """Predictions logged before `before`."""
    return [prediction_log.c.created_at < before]


def drift_checked(before: datetime.datetime) -> list[sa.ColumnElement[bool]]:
    """Drift checks made before `before`."""
    return [drift_checks.c.checked_at < before]


def purge(engine: sa.Engine, batch_days: float, data_days: float, budget_s: float,
          rows: int = PURGE_ROWS, log_days: float = 0.0) -> dict[str, int]:
    """Delete what is past its retention, `rows` per statement, for at most about `budget_s` (the rest goes
    on the next purge); answer how many rows of each table went. A retention of 0 days keeps everything."""
    deadline = time.monotonic() + budget_s
    plan: list[tuple[str, sa.Table, Expired, sa.ColumnElement, float]] = [
        ("batch_items", items, finished_items, items.c.created_at, batch_days),
        ("batch_runs", runs, ended_runs, runs.c.id, batch_days),
        ("data_items", data, stored_inputs, data.c.created_at, data_days),
        ("prediction_log", prediction_log, logged_predictions, prediction_log.c.created_at, log_days),
        ("drift_checks", drift_checks, drift_checked, drift_checks.c.checked_at, log_days),
    ]
    return {name: delete_oldest(engine, table, expired(now() - datetime.timedelta(days=days)), order, rows, deadline)
            for name, table, expired, order, days in plan if days > 0}


def delete_oldest(engine: sa.Engine, table: sa.Table, where: list[sa.ColumnElement[bool]],
                  order: sa.ColumnElement, rows: int, deadline: float) -> int:
    """Delete the rows of `table` matching `where`, first in `order`, `rows` per statement, until none are
    left or the deadline passes; answer how many went."""
    deleted, chosen = 0, rows
    while chosen == rows and time.monotonic() < deadline:
        with engine.begin() as connection:
            ids = connection.execute(sa.select(table.c.id).where(*where).order_by(order).limit(rows)).scalars().all()
            if ids:
                deleted += connection.execute(table.delete().where(table.c.id.in_(ids), *where)).rowcount
        chosen = len(ids)
    return deleted
