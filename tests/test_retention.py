"""Retention on the real MariaDB (and SQLite): what is past it goes in bounded statements, the rest stays."""

from __future__ import annotations

import datetime
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from workers import celery_worker

from tasks import TaskSettings, create_celery, db, retention

FAULT_REDIS_URL = os.environ.get("TEST_BATCH_FAULT_REDIS_URL", "redis://127.0.0.1:6379/7")
OLD, RECENT = datetime.timedelta(days=40), datetime.timedelta(days=2)


@pytest.fixture(params=["mariadb", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    """Empty batch tables and stored inputs, on the test MariaDB or in a fresh SQLite file."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
        db.upgrade(url)
        engine = db.create_engine(url)
    else:
        engine = request.getfixturevalue("batch_tables")
    with engine.begin() as connection:
        connection.execute(db.data.delete())
    yield engine
    engine.dispose()


def add_items(engine: sa.Engine, status: str, age: datetime.timedelta, count: int) -> set[int]:
    """Items of `status` made `age` ago; the finished ones finished then too."""
    at = db.now() - age
    row = {"model": "iris", "version": 1, "input": "[1, 2, 3, 4]", "status": status, "created_at": at,
           "finished_at": at if status in ("succeeded", "failed") else None}
    with engine.begin() as connection:
        return {connection.execute(db.items.insert().values(row)).inserted_primary_key[0] for _ in range(count)}


def add_run(engine: sa.Engine, model: str, status: str, age: datetime.timedelta) -> int:
    at = db.now() - age
    live = status in ("queued", "running")
    row = {"model": model, "triggered_by": "test", "status": status, "created_at": at,
           "active": model if live else None, "finished_at": None if live else at}
    with engine.begin() as connection:
        return connection.execute(db.runs.insert().values(row)).inserted_primary_key[0]


def add_inputs(engine: sa.Engine, age: datetime.timedelta, count: int) -> set[str]:
    rows = [{"id": uuid.uuid4().hex, "kind": "instance", "content": b"[1, 2, 3, 4]", "content_type": "application/json",
             "size": 12, "created_at": db.now() - age} for _ in range(count)]
    with engine.begin() as connection:
        connection.execute(db.data.insert(), rows)
    return {row["id"] for row in rows}


def ids(engine: sa.Engine, table: sa.Table) -> set:
    with engine.connect() as connection:
        return set(connection.execute(sa.select(table.c.id)).scalars())


def test_a_purge_deletes_what_is_past_retention_in_bounded_statements_and_keeps_the_rest(engine: sa.Engine):
    expired = add_items(engine, "succeeded", OLD, 15) | add_items(engine, "failed", OLD, 10)
    kept = (add_items(engine, "queued", OLD, 3) | add_items(engine, "running", OLD, 2)
            | add_items(engine, "succeeded", RECENT, 4) | add_items(engine, "failed", RECENT, 1))
    ended = {add_run(engine, "iris", "succeeded", OLD), add_run(engine, "iris", "failed", OLD)}
    live = {add_run(engine, "digits", "running", OLD), add_run(engine, "digits-light", "queued", OLD),
            add_run(engine, "iris", "succeeded", RECENT)}
    stale_inputs, fresh_inputs = add_inputs(engine, OLD, 12), add_inputs(engine, RECENT, 3)
    deletes: list[int] = []

    def count_deletes(_conn: object, cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(cursor.rowcount)  # type: ignore[attr-defined]

    sa.event.listen(engine, "after_cursor_execute", count_deletes)
    try:
        purged = retention.purge(engine, batch_days=30, data_days=30, budget_s=60, rows=10)
    finally:
        sa.event.remove(engine, "after_cursor_execute", count_deletes)
    assert purged == {"batch_items": 25, "batch_runs": 2, "data_items": 12}
    assert ids(engine, db.items) == kept and not expired & ids(engine, db.items)
    assert ids(engine, db.runs) == live and not ended & ids(engine, db.runs)
    assert ids(engine, db.data) == fresh_inputs and not stale_inputs & ids(engine, db.data)
    assert deletes == [10, 10, 5, 2, 10, 2]  # items, runs, inputs: at most `rows` a statement
    assert retention.purge(engine, batch_days=30, data_days=30, budget_s=60) == {
        "batch_items": 0, "batch_runs": 0, "data_items": 0}


def test_a_retention_of_zero_keeps_everything_and_an_empty_budget_deletes_nothing(engine: sa.Engine):
    items, inputs = add_items(engine, "succeeded", OLD, 3), add_inputs(engine, OLD, 2)
    run = add_run(engine, "iris", "succeeded", OLD)
    assert retention.purge(engine, batch_days=0, data_days=0, budget_s=60) == {}
    assert retention.purge(engine, batch_days=30, data_days=30, budget_s=0) == {
        "batch_items": 0, "batch_runs": 0, "data_items": 0}
    assert (ids(engine, db.items), ids(engine, db.runs), ids(engine, db.data)) == (items, {run}, inputs)
    assert retention.purge(engine, batch_days=30, data_days=0, budget_s=60)["batch_items"] == 3
    assert ids(engine, db.data) == inputs


@pytest.mark.integration
def test_a_worker_purges_when_the_task_comes(batch_tables: sa.Engine, tmp_path: Path):
    redis.Redis.from_url(FAULT_REDIS_URL).flushdb()
    with batch_tables.begin() as connection:
        connection.execute(db.data.delete())
    gone = add_items(batch_tables, "succeeded", OLD, 30) | add_items(batch_tables, "failed", OLD, 5)
    kept = add_items(batch_tables, "queued", OLD, 2) | add_items(batch_tables, "succeeded", RECENT, 2)
    ended, live = add_run(batch_tables, "iris", "succeeded", OLD), add_run(batch_tables, "digits", "running", OLD)
    stale_inputs, fresh_inputs = add_inputs(batch_tables, OLD, 4), add_inputs(batch_tables, RECENT, 2)
    env = {"BATCH_RETENTION_DAYS": "30", "DATA_RETENTION_DAYS": "7"}
    celery = create_celery(TaskSettings(redis_url=FAULT_REDIS_URL))
    try:
        with celery_worker(FAULT_REDIS_URL, "batch", tmp_path / "purge.log", concurrency=1, env=env, tag="-purge"):
            celery.send_task("purge_expired", queue="batch")
            deadline = time.monotonic() + 30
            while ids(batch_tables, db.items) != kept or ids(batch_tables, db.data) != fresh_inputs:
                assert time.monotonic() < deadline, "the purge did not happen"
                time.sleep(0.2)
    finally:
        celery.close()
    assert not gone & ids(batch_tables, db.items) and not stale_inputs & ids(batch_tables, db.data)
    assert ids(batch_tables, db.runs) == {live} and ended not in ids(batch_tables, db.runs)
