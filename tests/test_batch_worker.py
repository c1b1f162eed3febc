"""Batch runs through real Celery worker and beat processes, the real Redis and the real MariaDB."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
import sqlalchemy as sa
from flask.testing import FlaskClient
from sklearn.datasets import load_iris
from workers import celery_beat, celery_worker, kill_group_holding

from tasks import db
from webapp import create_app

BATCH_REDIS_URL = os.environ.get("TEST_BATCH_REDIS_URL", "redis://127.0.0.1:6379/10")
ROWS = load_iris().data.astype(np.float32)

pytestmark = pytest.mark.integration


def rows(count: int, seed: int = 0) -> list[list[float]]:
    """`count` iris-like rows, each slightly different."""
    noise = np.random.default_rng(seed).normal(0, 0.05, (count, 4)).astype(np.float32)
    return (ROWS[np.arange(count) % len(ROWS)] + noise).round(3).tolist()


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    """A worker with two prefork children on the batch queue of a fresh Redis database."""
    redis.Redis.from_url(BATCH_REDIS_URL).flushdb()
    log = tmp_path_factory.mktemp("batch") / "worker.log"
    with celery_worker(BATCH_REDIS_URL, "batch", log, env={"BATCH_CHUNK_ROWS": "500"}) as process:
        yield process


@pytest.fixture
def client(batch_tables: sa.Engine) -> FlaskClient:
    """A client of an app that queues its runs for the batch workers."""
    return create_app({"TESTING": True, "redis_url": BATCH_REDIS_URL}).test_client()


def register(client: FlaskClient, instances: list, model: str = "iris") -> list[int]:
    response = client.post("/v1/batch/items", json={"model": model, "instances": instances})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["ids"]


def finished(client: FlaskClient, status_url: str, timeout_s: float = 180) -> dict:
    """Poll a run until it is no longer queued or running; answer its last state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(status_url).get_json()
        if run["status"] not in ("queued", "running"):
            return run
        time.sleep(0.1)
    pytest.fail(f"run {status_url} did not finish in {timeout_s} s: {run}")


def outcomes(engine: sa.Engine) -> dict[str, tuple]:
    """Every item's (status, attempts, prediction) by id."""
    with engine.connect() as connection:
        query = sa.select(db.items.c.id, db.items.c.status, db.items.c.attempts, db.items.c.prediction)
        return {row.id: tuple(row[1:]) for row in connection.execute(query)}


def running(engine: sa.Engine) -> int:
    """How many items are held by a chunk task right now."""
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).where(db.items.c.status == "running")).scalar_one()


def expected(client: FlaskClient, instances: list) -> list[str]:
    answer = client.post("/v1/models/iris:predict", json={"instances": instances}).get_json()["predictions"]
    return [orjson.dumps(p).decode() for p in answer]


def same(stored: str, wanted: str) -> bool:
    return orjson.loads(stored) == orjson.loads(wanted)


def test_ten_thousand_items_are_predicted_by_one_run(client: FlaskClient, worker: subprocess.Popen,
                                                     batch_tables: sa.Engine):
    instances = rows(10_000)
    ids = register(client, instances)
    assert len(set(ids)) == 10_000
    with batch_tables.begin() as connection:  # rows another system wrote, wrong: each fails alone, with its reason
        bad = [connection.execute(db.items.insert().values(model="iris", version=1, input=text, status="queued",
                                                           created_at=db.now())).inserted_primary_key[0]
               for text in ("[1, 2, 3]", "not json")]
    started = client.post("/v1/batch/runs", json={"model": "iris"}).get_json()
    run = finished(client, started["status_url"])
    assert (run["status"], run["total"], run["succeeded"], run["failed"]) == ("succeeded", 10_002, 10_000, 2)
    failed = [client.get(f"/v1/batch/items/{i}").get_json() for i in bad]
    assert [f["status"] for f in failed] == ["failed", "failed"]
    assert "shape" in failed[0]["error"] and "not JSON" in failed[1]["error"]
    stored = outcomes(batch_tables)
    for item_id, wanted in zip(ids, expected(client, instances), strict=True):
        status, attempts, prediction = stored[item_id]
        assert (status, attempts) == ("succeeded", 1) and same(prediction, wanted)
    assert "batch_chunk" in worker.log.read_text()


def test_runs_started_at_once_process_each_row_exactly_once(client: FlaskClient, worker: subprocess.Popen,
                                                            batch_tables: sa.Engine, tmp_path: Path):
    register(client, rows(4000, seed=1))
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(
        client.post("/v1/batch/runs", json={"model": "iris"}))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(a.status_code for a in answers) == [202, 409]
    accepted = next(a.get_json() for a in answers if a.status_code == 202)
    celery = client.application.extensions["celery"]
    for _ in range(2):  # a duplicate start message and spare chunk messages change nothing
        celery.tasks["batch_run"].apply_async(args=[accepted["run_id"]], queue="batch")
    for _ in range(6):  # each over every id of the run
        celery.tasks["batch_chunk"].apply_async(args=[accepted["run_id"], 0, 2**62], queue="batch")
    with celery_worker(BATCH_REDIS_URL, "batch", tmp_path / "second.log", tag="-second",
                       env={"BATCH_CHUNK_ROWS": "100"}):  # a second pool claiming beside the first
        run = finished(client, accepted["status_url"])
    assert (run["total"], run["succeeded"], run["failed"]) == (4000, 4000, 0)
    assert {(status, attempts) for status, attempts, _ in outcomes(batch_tables).values()} == {("succeeded", 1)}


def test_a_run_whose_worker_is_killed_completes_after_a_restart(batch_tables: sa.Engine, tmp_path: Path):
    url = os.environ.get("TEST_BATCH_KILL_REDIS_URL", "redis://127.0.0.1:6379/9")
    redis.Redis.from_url(url).flushdb()
    env = {"BATCH_CHUNK_ROWS": "1000", "BATCH_ITEM_LEASE_S": "3", "BATCH_RECONCILE_S": "1"}
    app = create_app({"TESTING": True, "redis_url": url})
    client = app.test_client()
    instances = rows(10_000, seed=2) + rows(10_000, seed=3)
    ids = register(client, instances[:10_000]) + register(client, instances[10_000:])
    with celery_beat(url, tmp_path / "beat.log", env=env):
        with celery_worker(url, "batch", tmp_path / "doomed.log", env=env, tag="-doomed") as doomed:
            status_url = client.post("/v1/batch/runs", json={"model": "iris"}).get_json()["status_url"]
            deadline = time.monotonic() + 60
            while not (client.get(status_url).get_json()["done"] >= 1000 and running(batch_tables)):
                assert time.monotonic() < deadline, "the run never got going"
            # the worker and its children, frozen in the middle of their chunks; the rows they hold are counted
            held = kill_group_holding(doomed, lambda: running(batch_tables))
        midway = client.get(status_url).get_json()
        assert midway["status"] == "running" and midway["done"] < 20_000 and held, midway
        with celery_worker(url, "batch", tmp_path / "restarted.log", env=env, tag="-restarted"):
            run = finished(client, status_url)
    assert (run["status"], run["total"], run["succeeded"], run["failed"]) == ("succeeded", 20_000, 20_000, 0)
    stored = outcomes(batch_tables)
    assert {status for status, _, _ in stored.values()} == {"succeeded"}
    for item_id, wanted in zip(ids, expected(client, instances[:10_000]) + expected(client, instances[10_000:]),
                               strict=True):
        assert same(stored[item_id][2], wanted)
    assert sum(attempts == 2 for _, attempts, _ in stored.values()) >= held  # what the killed worker held, again


def test_a_chunk_whose_worker_child_is_killed_is_retried_and_takes_back_its_rows(batch_tables: sa.Engine,
                                                                                 tmp_path: Path):
    url = os.environ.get("TEST_BATCH_KILL_REDIS_URL", "redis://127.0.0.1:6379/9")
    redis.Redis.from_url(url).flushdb()
    client = create_app({"TESTING": True, "redis_url": url}).test_client()
    instances = rows(20_000, seed=5)
    register(client, instances[:10_000])
    register(client, instances[10_000:])
    env = {"BATCH_CHUNK_ROWS": "20000"}  # one chunk, long enough to be caught running; no beat, no lease expiry
    with celery_worker(url, "batch", tmp_path / "child.log", concurrency=1, env=env, tag="-child") as process:
        status_url = client.post("/v1/batch/runs", json={"model": "iris"}).get_json()["status_url"]
        deadline = time.monotonic() + 60
        while not running(batch_tables):
            assert time.monotonic() < deadline, "the chunk never claimed its rows"
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(int(children[0]), 9)
        run = finished(client, status_url, timeout_s=60)
        log = process.log.read_text()
    assert (run["status"], run["succeeded"], run["failed"]) == ("succeeded", 20_000, 0), log[-3000:]
    assert "WorkerLostError" in log
    assert {attempts for _, attempts, _ in outcomes(batch_tables).values()} == {2}


def test_beat_starts_scheduled_runs_once_a_period(batch_tables: sa.Engine, tmp_path: Path):
    url = os.environ.get("TEST_BATCH_BEAT_REDIS_URL", "redis://127.0.0.1:6379/8")
    redis.Redis.from_url(url).flushdb()
    client = create_app({"TESTING": True, "redis_url": url}).test_client()
    ids = register(client, rows(50, seed=4))
    env = {"BATCH_SCHEDULE": "iris=2"}
    with celery_beat(url, tmp_path / "beat.log", env=env), \
         celery_worker(url, "batch", tmp_path / "scheduled.log", env=env, tag="-scheduled"):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = client.get("/v1/batch/runs?model=iris").get_json()["runs"]
            if sum(r["status"] == "succeeded" for r in runs) >= 2:
                break
            time.sleep(0.2)
    assert all(r["triggered_by"] == "schedule 2" for r in runs)
    done = [r for r in runs if r["status"] == "succeeded"]
    assert len(done) >= 2 and done[-1]["total"] == 50 and done[-1]["succeeded"] == 50
    assert all(client.get(f"/v1/batch/items/{i}").get_json()["status"] == "succeeded" for i in ids)
