"""The prediction log through real processes: sampled predictions of every kind (sync, jobs, batch items) drained
by a real Celery worker and beat into MariaDB, none lost or stored twice when the draining worker is killed, the
outlier flags, the log API's filters and its JSON lines export, drift checked by the worker, retention, and what
the data plane's observer costs."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import shutil
import subprocess
import time
import timeit
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
import sqlalchemy as sa
from celery import Celery
from conftest import free_port
from flask import Flask
from flask.testing import FlaskClient
from workers import celery_beat, celery_worker, kill_group_holding

import models
from models import ModelVersion, Registry, Settings, training
from models.config import PACKAGE_DIR
from models.spec import Evaluation
from tasks import TaskSettings, create_celery, db, retention
from tasks.logbook import CONSUMER, GROUP, LogBook, row
from tasks.prediction_log import FIELD, STREAM, Recorder, decode, encode, record
from webapp import close_app, create_app
from webapp.dataplane import Call
from webapp.monitoring import PredictionObserver

MONITOR_REDIS_URL = os.environ.get("TEST_MONITOR_REDIS_URL", "redis://127.0.0.1:6379/6")
TRAINING = training.held_out(Evaluation("iris", 0.0))[0]
MONITORED = "\n[monitoring]\nlog_rate = {rate}\ndrift_window = 200\n"

pytestmark = pytest.mark.integration


def repository(root: Path, rate: float = 1.0) -> Path:
    """A model repository of two monitored copies of iris: `iris`, batched, and `iris-solo`, whose jobs run alone."""
    shutil.copytree(PACKAGE_DIR / "iris", root / "iris")
    spec = root / "iris" / "model.toml"
    spec.write_text(spec.read_text() + MONITORED.format(rate=rate))
    shutil.copytree(root / "iris", root / "iris-solo")
    solo = root / "iris-solo" / "model.toml"
    solo.write_text(solo.read_text().replace("[options]\n", "[options]\nmax_batch_size = 1\n"))
    return root


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The monitored repository, every prediction logged."""
    return repository(tmp_path / "models")


@pytest.fixture
def log_tables(database_url: str) -> Iterator[sa.Engine]:
    """The test database, its prediction log and drift checks emptied first."""
    engine = db.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(db.prediction_log.delete())
        connection.execute(db.drift_checks.delete())
    yield engine
    engine.dispose()


@pytest.fixture
def app(repo: Path, log_tables: sa.Engine) -> Iterator[Flask]:
    """An app over the monitored repository that queues its work on the monitoring Redis, flushed first."""
    redis.Redis.from_url(MONITOR_REDIS_URL).flushdb()
    app = create_app({"TESTING": True, "models_dir": repo, "redis_url": MONITOR_REDIS_URL, "reload_interval_s": 0})
    yield app
    close_app(app)


@contextlib.contextmanager
def worker(repo: Path, log: Path, **env: str) -> Iterator[subprocess.Popen]:
    """A real worker on the online and batch queues of the monitoring Redis, serving `repo`."""
    with celery_worker(MONITOR_REDIS_URL, "predict,batch", log, env={"MODELS_DIR": str(repo), **env}) as process:
        yield process


def logged(client: FlaskClient, model: str, count: int, timeout_s: float = 60, **filters: str) -> list[dict]:
    """Poll a model's log until it holds `count` records; answer them, newest first."""
    deadline, records = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        answer = client.get(f"/v1/models/{model}/log", query_string={"limit": 1000, **filters})
        assert answer.status_code == 200, answer.get_json()
        records = answer.get_json()["records"]
        if len(records) >= count:
            return records
        time.sleep(0.2)
    pytest.fail(f"{len(records)} of {count} records of {model} logged after {timeout_s} s")


def test_a_worker_and_beat_drain_sampled_predictions_of_every_kind_into_the_sql_store(
        app: Flask, repo: Path, batch_tables: sa.Engine, tmp_path: Path):
    client = app.test_client()
    rows = TRAINING[:4].tolist()
    outside = [5.0, 3.0, 1.5, 9.0]  # petal width 9 cm: past the training data's 2.5
    sync = client.post("/v1/models/iris:predict", json={"instances": [rows[0], outside]},
                       headers={"X-Request-ID": "sync-1"})
    job = client.post("/v1/models/iris:submit", json={"instances": rows[:2]}, headers={"X-Request-ID": "job-1"})
    solo = client.post("/v1/models/iris-solo:submit", json={"instances": rows[:1]})
    items = client.post("/v1/batch/items", json={"model": "iris", "instances": rows})
    assert [r.status_code for r in (sync, job, solo, items)] == [200, 202, 202, 201]
    assert client.post("/v1/batch/runs", json={"model": "iris"}).status_code == 202
    with worker(repo, tmp_path / "worker.log"), celery_beat(MONITOR_REDIS_URL, tmp_path / "beat.log",
                                                               env={"PREDICTION_LOG_DRAIN_S": "0.5"}):
        records = logged(client, "iris", 6)
        solos = logged(client, "iris-solo", 1)
    by_source = {source: [r for r in records if r["source"] == source] for source in ("sync", "job", "batch")}
    assert [len(by_source[s]) for s in ("sync", "job", "batch")] == [1, 1, 4]
    (synced,), (queued,), (alone,) = by_source["sync"], by_source["job"], solos
    assert synced["request_id"] == "sync-1" and synced["rows"] == 2 and synced["latency_ms"] > 0
    sent = np.asarray([rows[0], outside], np.float32)  # logged as the model took them: float32
    assert np.array_equal(np.asarray(synced["inputs"]["features"], np.float32), sent)
    assert synced["outputs"]["label_name"] == [p["label_name"] for p in sync.get_json()["predictions"]]
    assert synced["outlier"] and synced["outliers"] == [{"row": 1, "features": ["features[3]"]}]
    assert queued["request_id"] == "job-1" and queued["rows"] == 2 and not queued["outlier"]
    labels = models.predict(Registry(Settings(models_dir=repo)).get("iris"), {"features": TRAINING[:4]})["label"]
    assert queued["outputs"]["label"] == labels[:2].tolist() and len(queued["digest"]) == 40
    assert alone["source"] == "job" and alone["request_id"] == solo.headers["X-Request-ID"]  # the one it was given
    ids = sorted(int(r["request_id"].removeprefix("item:")) for r in by_source["batch"])
    assert ids == sorted(items.get_json()["ids"])
    assert sorted(r["outputs"]["label"][0] for r in by_source["batch"]) == sorted(labels.tolist())
    assert all(r["latency_ms"] is None and np.float32(r["inputs"]["features"][0]).tolist() in rows
               for r in by_source["batch"])


def test_no_record_is_lost_or_stored_twice_when_a_draining_worker_is_lost(repo: Path, log_tables: sa.Engine,
                                                                         tmp_path: Path):
    client = redis.Redis.from_url(MONITOR_REDIS_URL)
    client.flushdb()
    version = Registry(Settings(models_dir=repo)).get("iris")
    outputs = {"label": np.array([0])}
    made = [record(version, "sync", f"r{i}", 0.001, {"features": TRAINING[i % 100: i % 100 + 1]}, outputs)
            for i in range(10_000)]
    pipe = client.pipeline(transaction=False)
    for built in made:
        pipe.xadd(STREAM, {FIELD: encode(built)})
    pipe.execute()
    # a drain lost after it stored half of what it read, before it acknowledged any: those must not come twice
    client.xgroup_create(STREAM, GROUP, id="0")
    (_, lost), = client.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=300)
    LogBook(log_tables).write([row(decode(fields[FIELD])) for _, fields in lost[:150]])
    lost_ids = {entry_id for entry_id, _ in lost}
    env = {"VISIBILITY_TIMEOUT_S": "4", "TASK_TIME_LIMIT_S": "3"}  # a drain's pending entries are taken over in 4 s
    celery = create_celery(TaskSettings(redis_url=MONITOR_REDIS_URL, visibility_timeout_s=4, task_time_limit_s=3))

    def holding() -> int:
        """Entries the worker read and has not acknowledged."""
        pending = client.xpending_range(STREAM, GROUP, "-", "+", 100_000)
        return sum(p["message_id"] not in lost_ids for p in pending)

    with worker(repo, tmp_path / "first.log", **env) as first:
        for _ in range(4):
            celery.send_task("drain_prediction_log", queue="batch")
        assert kill_group_holding(first, holding) > 0
    with worker(repo, tmp_path / "second.log", **env):
        deadline = time.monotonic() + 90
        while stored_count(log_tables) < len(made) and time.monotonic() < deadline:
            celery.send_task("drain_prediction_log", queue="batch")
            time.sleep(1)
    celery.close()
    with log_tables.connect() as connection:
        uids = connection.execute(sa.select(db.prediction_log.c.uid)).scalars().all()
    assert len(uids) == len(made) and set(uids) == {built["uid"] for built in made}
    assert client.xpending(STREAM, GROUP)["pending"] == 0 and client.xlen(STREAM) == 0


def stored_count(engine: sa.Engine) -> int:
    with engine.connect() as connection:
        return connection.execute(sa.select(sa.func.count()).select_from(db.prediction_log)).scalar_one()


def test_drift_is_found_on_shifted_inputs_and_not_on_inputs_drawn_from_the_training_data(
        app: Flask, repo: Path, log_tables: sa.Engine, tmp_path: Path):
    client = app.test_client()
    celery = create_celery(TaskSettings(redis_url=MONITOR_REDIS_URL))
    drawn = TRAINING[np.random.default_rng(7).integers(0, len(TRAINING), 200)]
    shifted = TRAINING[np.random.default_rng(8).integers(0, len(TRAINING), 200)] + 3 * TRAINING.std(axis=0)
    checks = []
    with worker(repo, tmp_path / "worker.log"):
        for batch, logged_after in ((drawn, 10), (shifted, 20)):
            for i in range(0, 200, 20):
                answer = client.post("/v1/models/iris:predict", json={"instances": batch[i:i + 20].tolist()})
                assert answer.status_code == 200
            while len(client.get("/v1/models/iris/log?limit=1000").get_json()["records"]) < logged_after:
                celery.send_task("drain_prediction_log", queue="batch")
                time.sleep(0.5)
            checks.append(checked(client, celery, log_tables, len(checks)))
    celery.close()
    calm, alarmed = checks
    assert calm["rows"] == 200 and not calm["alert"] and calm["worst"] < 0.2 and calm["reference"]
    assert not any(f["alert"] for f in calm["features"].values())
    assert alarmed["rows"] == 200 and alarmed["alert"] and alarmed["threshold"] == 0.2
    assert sorted(alarmed["features"]) == [f"features[{j}]" for j in range(4)]
    assert all(f["alert"] and f["psi"] > 0.2 for f in alarmed["features"].values())
    shifted_records = client.get("/v1/models/iris/log?limit=10&outlier=true").get_json()["records"]
    assert len(shifted_records) == 10  # 3 std past the mean is past the training data's range too


def checked(client: FlaskClient, celery: Celery, engine: sa.Engine, before: int, timeout_s: float = 60) -> dict:
    """Have the worker check drift; answer iris version 1's check once the drift checks number `before` + 1."""
    celery.send_task("check_drift", queue="batch")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            count = connection.execute(sa.select(sa.func.count()).select_from(db.drift_checks)).scalar_one()
        if count > before:
            (answer,) = client.get("/v1/models/iris/drift").get_json()["versions"]
            return answer
        time.sleep(0.2)
    pytest.fail(f"no drift check within {timeout_s} s")


def stored(engine: sa.Engine, version: ModelVersion, source: str, request_id: str, at: datetime.datetime,
           features: list[list[float]]) -> str:
    """Store one record as the drain would; answer its uid."""
    inputs, outputs = {"features": np.asarray(features, np.float32)}, {"label": np.zeros(len(features), np.int64)}
    built = record(version, source, request_id, 0.002, inputs, outputs)
    built["at"] = at.replace(tzinfo=datetime.UTC).timestamp()
    LogBook(engine).write([row(decode(encode(built)))])
    return built["uid"]


def test_the_log_api_filters_pages_and_exports_json_lines(app: Flask, repo: Path, log_tables: sa.Engine):
    version = Registry(Settings(models_dir=repo)).get("iris")
    second = dataclasses.replace(version, number=2)
    t0 = datetime.datetime(2026, 1, 2, 3, 4, 5)
    normal, outside = [TRAINING[0].tolist()], [[5.0, 3.0, 1.5, 9.0]]
    plan = [(version, "sync", "a", 0, normal), (version, "job", "b", 1, outside),
            (second, "batch", "item:1", 2, normal), (version, "sync", "c", 3, normal)]
    uids = [stored(log_tables, v, s, r, t0 + datetime.timedelta(seconds=dt), f) for v, s, r, dt, f in plan]
    stored(log_tables, Registry(Settings(models_dir=repo)).get("iris-solo"), "sync", "a", t0, normal)
    client = app.test_client()

    def ids(**query: object) -> list[str]:
        answer = client.get("/v1/models/iris/log", query_string=query)
        assert answer.status_code == 200, answer.get_json()
        return [r["request_id"] for r in answer.get_json()["records"]]

    assert ids() == ["c", "item:1", "b", "a"]
    assert ids(version=2) == ["item:1"] and ids(request_id="b") == ["b"]
    assert ids(outlier="true") == ["b"] and ids(outlier="false") == ["c", "item:1", "a"]
    assert ids(since="2026-01-02T03:04:06", until="2026-01-02T04:04:08+01:00") == ["item:1", "b"]
    first = client.get("/v1/models/iris/log?limit=2&version=1").get_json()
    assert [r["request_id"] for r in first["records"]] == ["c", "b"] and first["next"]
    following = client.get(first["next"]).get_json()
    assert [r["request_id"] for r in following["records"]] == ["a"] and following["next"] is None
    page = client.get("/v1/models/iris/log").get_json()["records"]
    assert page[0]["time"] == "2026-01-02T03:04:08.000+00:00" and page[2]["outliers"][0]["features"] == ["features[3]"]
    exported = client.get("/v1/models/iris/log?format=jsonl&version=1")
    assert exported.mimetype == "application/x-ndjson"
    lines = [orjson.loads(line) for line in exported.data.splitlines()]
    assert lines == [r for r in page if r["version"] == 1] and len(uids) == 4
    assert len(client.get("/v1/models/iris/log?format=jsonl&limit=1").data.splitlines()) == 1


@pytest.mark.parametrize("query", ["version=0", "version=x", "since=yesterday", "until=2026-13-01", "outlier=yes",
                                   "limit=0", "limit=1001", "cursor=abc", "cursor=12", "format=csv",
                                   "request_id=" + "x" * 101, "sort=time"])
def test_a_bad_log_query_is_answered_400_naming_what_is_wrong(app: Flask, query: str):
    answer = app.test_client().get(f"/v1/models/iris/log?{query}")
    assert answer.status_code == 400 and query.split("=")[0] in answer.get_json()["error"]


def test_the_log_and_drift_of_an_unknown_model_or_version_are_404(app: Flask):
    client = app.test_client()
    assert client.get("/v1/models/nope/log").status_code == 404
    assert client.get("/v1/models/nope/drift").status_code == 404
    assert client.get("/v1/models/iris/drift?version=7").status_code == 404
    assert client.get("/v1/models/iris/drift").get_json() == {
        "model": "iris", "versions": [{"version": 1, "checked_at": None, "reference": True}]}


def test_retention_purges_old_records_and_checks_only(repo: Path, log_tables: sa.Engine):
    version = Registry(Settings(models_dir=repo)).get("iris")
    old, new = db.now() - datetime.timedelta(days=31), db.now() - datetime.timedelta(days=1)
    kept = stored(log_tables, version, "sync", "new", new, [TRAINING[0].tolist()])
    stored(log_tables, version, "sync", "old", old, [TRAINING[0].tolist()])
    with log_tables.begin() as connection:
        for when in (old, new):
            connection.execute(db.drift_checks.insert().values(model="iris", version=1, row_count=200, threshold=0.2,
                                                               psi="{}", worst=0.0, alert=False, checked_at=when))
    assert retention.purge(log_tables, 0, 0, 60, log_days=0) == {}
    assert retention.purge(log_tables, 0, 0, 60, log_days=30) == {"prediction_log": 1, "drift_checks": 1}
    with log_tables.connect() as connection:
        assert connection.execute(sa.select(db.prediction_log.c.uid)).scalars().all() == [kept]
        assert connection.execute(sa.select(db.drift_checks.c.checked_at)).scalars().all() == [new]


def test_the_recorder_drops_and_counts_records_when_redis_is_down_or_too_many_wait(repo: Path):
    version = Registry(Settings(models_dir=repo)).get("iris")
    down = redis.Redis(port=free_port(), socket_timeout=0.2, socket_connect_timeout=0.2)
    recorder = Recorder(down, 100, capacity=5)
    started = time.perf_counter()
    for _ in range(8):
        recorder.offer(version, "sync", "r", 0.001, {"features": TRAINING[:1]}, {"label": np.array([0])})
    assert time.perf_counter() - started < 0.1  # the serving thread never waits on Redis
    recorder.close()
    assert (recorder.sent, recorder.dropped, len(recorder.pending)) == (0, 8, 0)


@pytest.mark.parametrize(("rate", "most"), [(0.0, 0.02), (0.01, 0.05)])
def test_the_observer_costs_a_random_draw_for_a_prediction_it_does_not_log(tmp_path: Path, rate: float, most: float):
    app = create_app({"TESTING": True, "models_dir": repository(tmp_path, rate), "redis_url": MONITOR_REDIS_URL})
    plane = app.extensions["dataplane"]
    observer = next(o for o in plane.observers if isinstance(o, PredictionObserver))
    route, call = plane.route("/v1/models/iris:predict"), Call("POST", b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}',
                                                                "application/json")
    served = []
    plane.observers.append(served.append)
    assert plane.respond(route, call)[0] == 200
    request_s = min(timeit.repeat(lambda: plane.respond(route, call), number=500, repeat=5)) / 500
    observer_s = min(timeit.repeat(lambda: observer(served[0]), number=20_000, repeat=5)) / 20_000
    recorder = app.extensions["prediction_log"]
    offered = recorder.sent + recorder.dropped + len(recorder.pending)
    close_app(app)
    print(f"log_rate {rate}: observer {observer_s * 1e6:.2f} us per request, "
          f"{observer_s / request_s:.2%} of a one-row iris :predict ({request_s * 1e6:.1f} us) in process")
    assert observer_s < most * request_s
    assert (offered == 0) if rate == 0 else (0 < offered < 0.05 * (20_000 * 5 + 2501))
