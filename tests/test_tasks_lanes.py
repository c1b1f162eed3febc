"""Job records and batch lanes on the real Redis: starts, give-ups, taking, disarming, reclaiming."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from models import Registry, Settings
from models.tensor import pack, unpack
from samples import gather_model
from tasks import inference
from tasks.jobs import MAX_ATTEMPTS, JobStore
from tasks.lanes import BatchQueue, Lane, split
from tasks.status import JobStatus

LANE = Lane("iris", 1)


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    """The test Redis, with no batch lanes before or after the test (the tests leave lanes armed)."""
    connection = redis.Redis.from_url(redis_url)
    for key in connection.scan_iter("batches:*"):
        connection.delete(key)
    yield connection
    for key in connection.scan_iter("batches:*"):
        connection.delete(key)


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, ttl_s=60, retention_s=120)


@pytest.fixture
def queue(client: redis.Redis) -> BatchQueue:
    return BatchQueue(client, lease_s=0.2)


def new_job(store: JobStore) -> str:
    return store.create("iris", 1, pack({"features": np.float32([[5.1, 3.5, 1.4, 0.2]])}), "rows")[0].id


def test_a_job_started_too_often_is_failed_and_says_why(store: JobStore):
    job_id = new_job(store)
    assert [store.start(job_id) for _ in range(MAX_ATTEMPTS)] == [1] * MAX_ATTEMPTS
    assert store.start(job_id) == -1
    job = store.get(job_id)
    assert job.status is JobStatus.FAILED and "gave up" in job.error
    assert store.inputs(job_id) is None
    assert store.start(job_id) == 0


def test_only_the_push_that_arms_a_lane_sends_a_batcher(queue: BatchQueue, store: JobStore):
    ids = [new_job(store) for _ in range(3)]
    assert [queue.put(LANE, i) for i in ids] == [True, False, False]
    assert queue.take(LANE, 2) == ids[:2]
    assert queue.put(LANE, new_job(store)) is False  # still armed: the lane is not empty
    assert len(queue.take(LANE, 10)) == 2
    assert queue.take(LANE, 10) == []
    assert queue.put(LANE, new_job(store)) is False  # armed while its batcher runs, even when empty
    assert queue.disarm(LANE) is False  # a job came: the batcher must go on
    assert len(queue.take(LANE, 10)) == 1
    assert queue.disarm(LANE) is True
    assert queue.put(LANE, new_job(store)) is True  # a disarmed lane is armed by the next push


def test_jobs_held_past_the_lease_are_reclaimed_once(queue: BatchQueue, store: JobStore):
    ids = [new_job(store) for _ in range(2)]
    for job_id in ids:
        queue.put(LANE, job_id)
    taken = queue.take(LANE, 10)
    assert queue.reclaim(10) == []
    time.sleep(0.25)
    assert sorted(job_id for _, job_id in queue.reclaim(0.2)) == sorted(taken)
    assert queue.reclaim(0.2) == []
    queue.done(LANE, taken)


def test_a_lane_with_jobs_but_no_batcher_is_rearmed_once(queue: BatchQueue, client: redis.Redis, store: JobStore):
    queue.put(LANE, new_job(store))
    client.delete(LANE.key("armed"))  # its batcher's message was lost and the lease ran out
    assert queue.idle() == [LANE]
    assert queue.idle() == []


def test_outputs_are_split_back_per_job():
    outputs = {"label": np.arange(6), "probabilities": np.arange(12).reshape(6, 2)}
    parts = split(outputs, [1, 3, 2])
    assert [p["label"].tolist() for p in parts] == [[0], [1, 2, 3], [4, 5]]
    assert parts[2]["probabilities"].tolist() == [[8, 9], [10, 11]]


def test_a_batch_the_runtime_refuses_fails_only_its_bad_job(tmp_path: Path, store: JobStore):
    gather_model(tmp_path)
    found = Registry(Settings(models_dir=tmp_path)).get("gather")
    ids = [store.create("gather", 1, pack({"index": np.array([[i]], np.int64)}), "rows")[0].id for i in (1, 99, 2)]
    assert inference._run_batch(inference.predict_batch, found, ids) == 3
    jobs = [store.get(i) for i in ids]
    assert [j.status for j in jobs] == [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.SUCCEEDED]
    assert "failed while running" in jobs[1].error
    assert [unpack(store.outputs(i))["value"].tolist() for i in (ids[0], ids[2])] == [[[1.0]], [[2.0]]]
