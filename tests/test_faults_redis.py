"""Faults of Redis under the job path, each on a redis-server of the test's own, started as `make run` starts
it (deploy/redis_server.py): restarted under load, and full."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import kombu.exceptions
import kombu.pools
import numpy as np
import pytest
import redis
from sklearn.datasets import load_digits, load_iris
from workers import Platform, celery_beat, celery_worker, finished_jobs

from deploy import redis_server
from samples import error_of
from tasks.jobs import JobStore
from tasks.status import JobStatus
from webapp import close_app, create_app

ONLINE = "prep,predict,callbacks"

pytestmark = pytest.mark.integration


class Server:
    """A redis-server on a data directory, which can be stopped and started again on it."""

    def __init__(self, data_dir: Path, **options: str):
        self.data_dir, self.options, self.port = data_dir, options, redis_server.free_port()
        self.log = (data_dir.parent / "redis.log").open("a")
        self.process, self.url = redis_server.start(data_dir, self.port, stdout=self.log, **options)

    def restart(self, down_s: float) -> None:
        """SHUTDOWN (which writes the append-only file out), stay down `down_s`, start again on the same files."""
        redis.Redis.from_url(self.url).shutdown()
        self.process.wait(10)
        time.sleep(down_s)
        self.process, _ = redis_server.start(self.data_dir, self.port, stdout=self.log, **self.options)

    def stop(self) -> None:
        """Stop it for good."""
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A redis-server of the test's own, under `tmp_path`."""
    started = Server(tmp_path / "redis")
    yield started
    started.stop()


def test_the_embedded_redis_is_a_broker_that_loses_nothing_acknowledged(server: Server):
    config = redis.Redis.from_url(server.url).config_get("*")
    assert (config["appendonly"], config["appendfsync"]) == ("yes", "always")
    assert config["maxmemory-policy"] == "noeviction"
    assert int(config["maxmemory"]) == 2**30  # REDIS_MAXMEMORY's default, 1gb
    assert config["save"] == ""


def test_no_accepted_job_is_lost_when_redis_restarts_under_load(server: Server, tmp_path: Path):
    env = {"VISIBILITY_TIMEOUT_S": "10", "BATCH_LEASE_S": "3"}
    platform = Platform.on(server.url, env=env)
    iris, digits = load_iris().data.astype(np.float32), load_digits().data.astype(np.float32)
    accepted, refused = [], []
    with contextlib.ExitStack() as workers:
        worker = workers.enter_context(celery_worker(server.url, ONLINE, tmp_path / "worker.log", env=env))
        workers.enter_context(celery_beat(server.url, tmp_path / "beat.log", env=env))  # re-arms orphaned lanes
        restart = threading.Timer(2, server.restart, kwargs={"down_s": 0.5})
        restart.start()
        start = time.time()
        while time.time() < start + 6:
            i = len(accepted) + len(refused)
            model, rows = (("iris", iris[i % 150:][:1]), ("digits-heavy", digits[:200]))[i % 2]
            try:  # batched and single jobs of a quick and a slower model
                accepted.append(platform.submit(model, rows, batched=i % 3 > 0))
            except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
                refused.append(exc)  # Redis was down: the web tier answers 503, nothing was accepted
            time.sleep(0.02)
        restart.join()
        if worker.poll() is not None:  # it left on losing Redis: its supervisor starts it again
            kombu.pools.reset()  # this process's pooled broker connections are from before the restart
            workers.enter_context(celery_worker(server.url, ONLINE, tmp_path / "restarted.log", env=env))
        jobs = finished_jobs(platform.store, accepted, timeout_s=45)
    assert [j.status for j in jobs.values()] == [JobStatus.SUCCEEDED] * len(accepted)
    created = sorted(j.created_at for j in jobs.values())
    assert created[0] < start + 1.5 and created[-1] > start + 4  # jobs were accepted before and after the restart


def test_a_full_redis_refuses_new_jobs_with_503_and_keeps_every_accepted_one(tmp_path: Path):
    server = Server(tmp_path / "redis", maxmemory="8mb")
    app = create_app({"TESTING": True, "redis_url": server.url})
    try:
        client = app.test_client()
        body = {"instances": load_digits().data[:1].tolist() * 1000}  # a job of some 250 kB
        accepted, answer = [], client.post("/v1/models/digits-heavy:submit", json=body)
        while answer.status_code == 202 and len(accepted) < 100:
            accepted.append(answer.get_json()["job_id"])
            answer = client.post("/v1/models/digits-heavy:submit", json=body)
        assert "unavailable" in error_of(answer, 503)  # refused loudly: nothing was evicted to make room
        assert len(accepted) > 5
        assert {client.get(f"/v1/jobs/{i}").get_json()["status"] for i in accepted} == {"queued"}
        redis.Redis.from_url(server.url).config_set("maxmemory", "1gb")  # what an operator does about it
        with celery_worker(server.url, "predict", tmp_path / "worker.log"):
            jobs = finished_jobs(JobStore(redis.Redis.from_url(server.url), 3600, 3600), accepted, timeout_s=30)
        assert {j.status for j in jobs.values()} == {JobStatus.SUCCEEDED}  # every queued message was kept
    finally:
        close_app(app)
        server.stop()
