"""Jobs through a real Celery worker process and the real Redis."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from flask.testing import FlaskClient
from sklearn.datasets import load_digits, load_iris
from workers import celery_worker

from models.config import PACKAGE_DIR
from models.tensor import pack
from samples import Receiver, callback_receiver, digit_png
from tasks.lanes import BatchQueue, Lane
from webapp import create_app

ROOT = Path(__file__).resolve().parent.parent
WORKER_REDIS_URL = os.environ.get("TEST_WORKER_REDIS_URL", "redis://127.0.0.1:6379/12")

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    """A Celery worker with two prefork children on every queue of a fresh Redis database."""
    redis.Redis.from_url(WORKER_REDIS_URL).flushdb()
    log = tmp_path_factory.mktemp("worker") / "w.log"
    env = {"BATCH_LEASE_S": "1", "CALLBACK_ALLOW_NETWORKS": "127.0.0.1/32"}  # callback receivers are local
    with celery_worker(WORKER_REDIS_URL, "prep,predict,callbacks", log, env=env) as w:
        yield w


@pytest.fixture
def client(worker: subprocess.Popen) -> FlaskClient:
    """A client of an app that queues its jobs for the worker."""
    return create_app({"TESTING": True, "redis_url": WORKER_REDIS_URL}).test_client()


def wait_for(client: FlaskClient, status_url: str, timeout_s: float = 60) -> dict:
    """Poll a job until it is finished; answer its last state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(status_url).get_json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.02)
    pytest.fail(f"job {status_url} did not finish in {timeout_s} s: {job}")


def test_submit_poll_succeeded_with_the_outputs_of_predict(client: FlaskClient, worker: subprocess.Popen):
    body = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}
    submitted = client.post("/v1/models/iris:submit", json=body, headers={"X-Request-ID": "req-worker-1"})
    job = wait_for(client, submitted.get_json()["status_url"])
    assert job["status"] == "succeeded", job
    assert job["result"] == client.post("/v1/models/iris:predict", json=body).get_json()
    assert f"request req-worker-1: job {job['job_id']} finished" in worker.log.read_text()


def test_many_jobs_at_once_each_get_their_own_result(client: FlaskClient):
    rows = load_iris().data.astype(np.float32)
    digits = load_digits()
    bodies = [("iris", {"instances": [rows[i].tolist()]}) for i in range(150)]
    bodies += [("digits-light", {"instances": [{"b64": base64.b64encode(digit_png(digits.data[i])).decode()}]})
               for i in range(50)]
    urls = [client.post(f"/v1/models/{name}:submit", json=body).get_json()["status_url"] for name, body in bodies]
    assert len(set(urls)) == len(bodies)
    for (name, body), url in zip(bodies, urls, strict=True):
        job = wait_for(client, url)
        assert job["status"] == "succeeded", job
        assert job["result"] == client.post(f"/v1/models/{name}:predict", json=body).get_json()


def test_a_poison_input_fails_with_its_reason_and_the_worker_goes_on(client: FlaskClient):
    poison = {"instances": [{"b64": base64.b64encode(b"GIF89a but not really").decode()}]}
    failed = wait_for(client, client.post("/v1/models/digits-light:submit", json=poison).get_json()["status_url"])
    assert failed["status"] == "failed"
    assert "image" in failed["error"]
    body = {"instances": [[5.9, 3.0, 4.2, 1.5]]}
    after = wait_for(client, client.post("/v1/models/iris:submit", json=body).get_json()["status_url"])
    assert after["status"] == "succeeded"


def test_a_job_whose_worker_child_is_killed_mid_task_still_succeeds(tmp_path: Path):
    url = os.environ.get("TEST_KILL_REDIS_URL", "redis://127.0.0.1:6379/11")
    redis.Redis.from_url(url).flushdb()
    log = tmp_path / "worker.log"
    with celery_worker(url, "predict", log, concurrency=1, env={"VISIBILITY_TIMEOUT_S": "10"}) as process:
        client = create_app({"TESTING": True, "redis_url": url}).test_client()
        rows = np.tile(load_digits().data.astype(np.float32), (4, 1)).tolist()  # a few seconds of SVC work
        status_url = client.post("/v1/models/digits-heavy:submit", json={"inputs": rows}).get_json()["status_url"]
        os.kill(_running_child(client, status_url, process.pid), 9)
        job = wait_for(client, status_url, timeout_s=60)
        assert job["status"] == "succeeded", (job, log.read_text()[-3000:])
        assert len(job["result"]["outputs"]["label"]) == len(rows)
        assert "WorkerLostError" in log.read_text()


def test_prep_and_predict_run_on_separate_worker_pools(tmp_path: Path):
    url = os.environ.get("TEST_KILL_REDIS_URL", "redis://127.0.0.1:6379/11")
    redis.Redis.from_url(url).flushdb()
    digits = load_digits()
    images = [{"b64": base64.b64encode(digit_png(digits.data[i])).decode()} for i in range(4)]
    with celery_worker(url, "prep", tmp_path / "prep.log", 1) as prep, \
         celery_worker(url, "predict", tmp_path / "predict.log", 1) as pred:
        client = create_app({"TESTING": True, "redis_url": url}).test_client()
        image_job = client.post("/v1/models/digits-heavy:submit", json={"instances": images}).get_json()
        tensor_job = client.post("/v1/models/digits-heavy:submit",
                                 json={"instances": digits.data[:2].tolist()}).get_json()
        done = wait_for(client, image_job["status_url"])
        assert [p["label"] for p in done["result"]["predictions"]] == list(digits.target[:4])
        assert wait_for(client, tensor_job["status_url"])["status"] == "succeeded"
        prep_log, predict_log = prep.log.read_text(), pred.log.read_text()
    assert f"job {image_job['job_id']} preprocessed" in prep_log
    assert f"job {image_job['job_id']} finished" in predict_log
    assert tensor_job["job_id"] not in prep_log  # tensors skip the prep stage


def _running_child(client: FlaskClient, status_url: str, parent: int) -> int:
    """The pid of the pool child running a job, once the job is running."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        if client.get(status_url).get_json()["status"] == "running" and children:
            return int(children[0])
        time.sleep(0.01)
    pytest.fail("the job never started running")


def test_callbacks_are_retried_with_backoff_until_the_receiver_takes_them(client: FlaskClient,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CALLBACK_ALLOW_NETWORKS", "127.0.0.1/32")
    body = {"instances": [[6.3, 3.3, 6.0, 2.5]]}
    with callback_receiver() as url:
        Receiver.answers = [503, 500]
        status_url = client.post("/v1/models/iris:submit", json={**body, "callback_url": url}).get_json()["status_url"]
        deadline = time.monotonic() + 60
        while len(Receiver.bodies) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert len(Receiver.bodies) == 3
    assert Receiver.bodies[-1] == client.get(status_url).get_json()
    assert Receiver.bodies[-1]["result"]["predictions"][0]["label_name"] == "virginica"


def test_batched_jobs_a_lost_batcher_held_are_reclaimed(client: FlaskClient, worker: subprocess.Popen):
    app = client.application
    lane, queue = Lane("iris", 1), BatchQueue(app.extensions["jobs"].client, lease_s=1)  # the worker's lease
    jobs = app.extensions["jobs"]
    held = [jobs.create("iris", 1, pack({"features": np.float32([[5.1, 3.5, 1.4, 0.2]])}), "rows")[0]
            for _ in range(3)]
    for job in held:  # what a batcher that died after taking them leaves behind
        queue.put(lane, job.id)
    assert sorted(queue.take(lane, 10)) == sorted(job.id for job in held)
    time.sleep(1.2)  # past the worker's BATCH_LEASE_S
    app.extensions["celery"].tasks["reclaim_batches"].apply_async(queue="predict")
    for job in held:
        assert wait_for(client, f"/v1/jobs/{job.id}")["status"] == "succeeded"
    assert "put back 3 batched jobs" in worker.log.read_text()


def test_sync_async_pipeline_heavy_job_runs_on_the_worker(client: FlaskClient):
    rows = {"instances": load_digits().data[10:12].tolist()}
    body = client.post("/v1/pipelines/digits:predict", json=rows).get_json()
    assert body["light"]["result"] == client.post("/v1/models/digits-light:predict", json=rows).get_json()
    job = wait_for(client, body["heavy"]["status_url"])
    assert job["result"] == client.post("/v1/models/digits-heavy:predict", json=rows).get_json()


def ensemble_repo(root: Path, member_timeout_ms: int, timeout_ms: int) -> Path:
    """A repository holding the one-vs-rest iris members and an ensemble of them with these timeouts."""
    for name in ("iris-setosa", "iris-versicolor", "iris-virginica"):
        shutil.copytree(PACKAGE_DIR / name, root / name)
    (root / "ovr").mkdir()
    (root / "ovr" / "ensemble.toml").write_text(
        'members = ["iris-setosa", "iris-versicolor", "iris-virginica"]\naggregate = "best"\n'
        f"member_timeout_ms = {member_timeout_ms}\ntimeout_ms = {timeout_ms}\n"
    )
    return root


def test_ensemble_members_run_on_their_own_queues_and_a_stopped_one_times_out(tmp_path: Path):
    url = os.environ.get("TEST_KILL_REDIS_URL", "redis://127.0.0.1:6379/11")
    redis.Redis.from_url(url).flushdb()
    queues = "model.iris-setosa,model.iris-versicolor"  # no worker serves iris-virginica's queue
    with celery_worker(url, queues, tmp_path / "members.log", 1):
        repo = ensemble_repo(tmp_path / "repo", member_timeout_ms=1500, timeout_ms=5000)
        client = create_app({"TESTING": True, "redis_url": url, "models_dir": repo}).test_client()
        answer = client.post("/v1/ensembles/ovr:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        body = answer.get_json()
        assert body["timed_out"] == ["iris-virginica"] and body["failed"] == []
        assert body["members"]["iris-setosa"]["status"] == "succeeded"
        assert body["predictions"][0]["label"] == "setosa"

        slow = ensemble_repo(tmp_path / "slow", member_timeout_ms=1500, timeout_ms=200)
        client = create_app({"TESTING": True, "redis_url": url, "models_dir": slow}).test_client()
        accepted = client.post("/v1/ensembles/ovr:predict", json={"instances": [[6.3, 3.3, 6.0, 2.5]]})
        assert accepted.status_code == 202
        status_url = accepted.get_json()["status_url"]
        assert client.get(status_url).get_json()["status"] == "running"
        job = wait_for(client, status_url, timeout_s=10)
        assert job["status"] == "succeeded" and job["result"]["timed_out"] == ["iris-virginica"]
        assert job["result"]["predictions"][0]["member"] in ("iris-setosa", "iris-versicolor")
