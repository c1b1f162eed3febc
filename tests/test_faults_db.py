"""Batch runs through a database outage: real worker and beat processes whose MariaDB goes away and comes back."""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from flask.testing import FlaskClient
from proxy import Proxy
from sklearn.datasets import load_iris
from workers import celery_beat, celery_worker, frozen_holding

from tasks import TaskSettings, create_celery, db, outage
from tasks.batch import reconcile
from tasks.items import ItemStore
from tasks.runs import RunStore
from webapp import create_app

FAULT_REDIS_URL = os.environ.get("TEST_BATCH_FAULT_REDIS_URL", "redis://127.0.0.1:6379/7")
ROWS = load_iris().data.astype(np.float32)
OUTAGE_S = 30

pytestmark = pytest.mark.integration


@pytest.fixture
def proxy(database_url: str) -> Iterator[Proxy]:
    """A proxy in front of the test MariaDB."""
    url = sa.make_url(database_url)
    with Proxy(url.host or "127.0.0.1", url.port or 3306) as running:
        yield running


def through(database_url: str, proxy: Proxy) -> str:
    """The test database's URL by way of the proxy."""
    return sa.make_url(database_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


def rows(count: int, seed: int) -> list[list[float]]:
    noise = np.random.default_rng(seed).normal(0, 0.05, (count, 4)).astype(np.float32)
    return (ROWS[np.arange(count) % len(ROWS)] + noise).round(3).tolist()


def register(client: FlaskClient, instances: list) -> list[int]:
    response = client.post("/v1/batch/items", json={"model": "iris", "instances": instances})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["ids"]


def count(engine: sa.Engine, *where: sa.ColumnElement[bool]) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(db.items).where(*where)).scalar_one()


def predicted(client: FlaskClient, instances: list) -> list:
    return client.post("/v1/models/iris:predict", json={"instances": instances}).get_json()["predictions"]


def finished(client: FlaskClient, status_url: str, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while (run := client.get(status_url).get_json())["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            pytest.fail(f"run {status_url} did not finish in {timeout_s} s: {run}")
        time.sleep(0.2)
    return run


def test_a_run_outlives_its_database_going_away_and_no_item_pays_for_it(batch_tables: sa.Engine, database_url: str,
                                                                         proxy: Proxy, tmp_path: Path):
    redis.Redis.from_url(FAULT_REDIS_URL).flushdb()
    client = create_app({"TESTING": True, "redis_url": FAULT_REDIS_URL}).test_client()
    instances = rows(10_000, seed=7) + rows(10_000, seed=8)
    ids = register(client, instances[:10_000]) + register(client, instances[10_000:])
    # one try an item: any try the outage cost would fail an item; leases run out inside the outage
    env = {"DATABASE_URL": through(database_url, proxy), "BATCH_MAX_ATTEMPTS": "1", "BATCH_ITEM_LEASE_S": "15",
           "BATCH_RECONCILE_S": "1", "BATCH_CHUNK_ROWS": "500"}
    with celery_beat(FAULT_REDIS_URL, tmp_path / "beat.log", env=env), \
         celery_worker(FAULT_REDIS_URL, "batch", tmp_path / "worker.log", env=env, tag="-outage") as worker:
        status_url = client.post("/v1/batch/runs", json={"model": "iris"}).get_json()["status_url"]
        deadline = time.monotonic() + 60
        while client.get(status_url).get_json()["done"] < 1000:
            assert time.monotonic() < deadline, "the run never got going"
            time.sleep(0.05)
        running = db.items.c.status == "running"
        with frozen_holding(worker, lambda: count(batch_tables, running)) as held:
            proxy.cut()  # the chunks in flight lose their connections and cannot write back
        time.sleep(OUTAGE_S)
        lapsed = count(batch_tables, running, db.items.c.leased_until < db.now())
        midway = client.get(status_url).get_json()
        proxy.restore()
        run = finished(client, status_url, timeout_s=90)
        log = worker.log.read_text()
    assert held and lapsed, (held, lapsed)  # items were held through the outage, past their lease
    assert midway["status"] == "running" and midway["done"] < 20_000, midway
    assert (run["status"], run["total"], run["succeeded"], run["failed"]) == ("succeeded", 20_000, 20_000, 0), run
    with batch_tables.connect() as connection:
        stored = connection.execute(sa.select(db.items.c.id, db.items.c.status, db.items.c.attempts,
                                              db.items.c.prediction)).all()
    assert {(row.status, row.attempts) for row in stored} == {("succeeded", 1)}
    by_id = {row.id: orjson.loads(row.prediction) for row in stored}
    assert [by_id[i] for i in ids] == predicted(client, instances[:10_000]) + predicted(client, instances[10_000:])
    assert "the SQL store is unreachable" in log and "batch_chunk" in log


@pytest.fixture
def held_through_outage(batch_tables: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> tuple[ItemStore, int]:
    """A running run whose three items were claimed, and whose lease ran out, during a long silence of the
    reconciler; one try an item, so an expired lease fails its item."""
    monkeypatch.setenv("BATCH_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("BATCH_ITEM_LEASE_S", "60")
    items, runs = ItemStore(batch_tables, lease_s=60, max_attempts=1), RunStore(batch_tables, max_attempts=1)
    items.register("iris", 1, ["[5.1, 3.5, 1.4, 0.2]"] * 3)
    run = runs.start(runs.create("iris", "test").id)
    assert run is not None
    items.claim(run.id, "iris", (0, run.high_water or 0), "chunk-task", 10)
    long_ago = db.now() - datetime.timedelta(minutes=5)
    with batch_tables.begin() as connection:
        connection.execute(db.items.update().values(leased_until=long_ago))
        connection.execute(db.runs.update().values(reconciled_at=long_ago, updated_at=db.now()))
    return items, run.id


@pytest.fixture
def idle_celery() -> Iterator[Celery]:
    """An app on the fault tests' Redis, for the tasks a reconciler sends; no worker takes them."""
    redis.Redis.from_url(FAULT_REDIS_URL).flushdb()
    app = create_celery(TaskSettings(redis_url=FAULT_REDIS_URL))
    yield app
    app.close()
    redis.Redis.from_url(FAULT_REDIS_URL).flushdb()


def test_leases_that_ran_out_while_the_reconciler_could_not_look_are_renewed_once(
        held_through_outage: tuple[ItemStore, int], batch_tables: sa.Engine, idle_celery: Celery):
    items, run_id = held_through_outage
    settings = TaskSettings.from_env()
    assert reconcile(idle_celery, settings)["leases renewed"] == 3
    with batch_tables.connect() as connection:
        leases = connection.execute(sa.select(db.items.c.status, db.items.c.leased_until)).all()
    assert all(status == "running" and until > db.now() for status, until in leases)
    resumed = items.reclaim("iris", (0, 2**62), "chunk-task", count=False)  # the chunk, back after the outage
    assert len(resumed) == 3 and count(batch_tables, db.items.c.attempts == 1) == 3
    with batch_tables.begin() as connection:  # its worker is lost now: the lease runs out, the reconciler looked
        connection.execute(db.items.update().values(leased_until=db.now() - datetime.timedelta(seconds=1)))
    assert reconcile(idle_celery, settings)["leases renewed"] == 0
    assert count(batch_tables, db.items.c.status == "failed") == 3
    assert RunStore(batch_tables, max_attempts=1).get(run_id).failed == 3


def test_a_store_that_goes_silent_fails_statements_within_its_timeout(database_url: str, proxy: Proxy):
    engine = db.create_engine(through(database_url, proxy), timeout_s=2)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(sa.exc.OperationalError) as raised:
                connection.execute(sa.text("SELECT 1"))
        assert time.monotonic() - started < 10 and outage.unreachable(raised.value)
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError) as raised, engine.connect():  # a new connection, too
            pass
        assert time.monotonic() - started < 10 and outage.unreachable(raised.value)
        proxy.restore()
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()
