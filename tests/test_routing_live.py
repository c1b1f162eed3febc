"""Online experiments through real processes: the web process under gunicorn routes by the specs' `[routing]`,
and a real Celery worker runs the shadows and the queued latency class."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from sklearn.datasets import load_iris
from workers import celery_worker

from models.config import PACKAGE_DIR
from webapp.traffic import bucket

WORKER_REDIS_URL = os.environ.get("TEST_WORKER_REDIS_URL", "redis://127.0.0.1:6379/12")
SETOSA = [5.1, 3.5, 1.4, 0.2]
SPLIT = """
[routing]
split = { "1" = 0.8, "2" = 0.2 }
sticky_header = "X-User-ID"
queue_batch = true

[[routing.rules]]
header = "X-Arm"
equals = "setosa"
model = "iris-setosa"
"""
SHADOWS = """
[routing]
shadow = [{ version = 2 }, { model = "iris-setosa" }]
"""

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris split 80/20 between versions 1 and 2 (one artefact); `flowers`, the same model at versions 1 and 2,
    answering with 1 and mirrored to 2 and to iris-setosa; iris-setosa."""
    root = tmp_path_factory.mktemp("routed")
    for name, top, routing in (("iris", "", SPLIT), ("flowers", "default_version = 1\n", SHADOWS)):
        shutil.copytree(PACKAGE_DIR / "iris", root / name)
        shutil.copytree(root / name / "1", root / name / "2")
        spec = root / name / "model.toml"
        spec.write_text(top + spec.read_text() + routing)
    shutil.copytree(PACKAGE_DIR / "iris-setosa", root / "iris-setosa")
    return root


@pytest.fixture(scope="module")
def worker(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    """A real worker on the `shadow` and `predict` queues of a fresh Redis database, over the scratch repository."""
    redis.Redis.from_url(WORKER_REDIS_URL).flushdb()
    log = tmp_path_factory.mktemp("shadow-worker") / "w.log"
    with celery_worker(WORKER_REDIS_URL, "shadow,predict", log, concurrency=1, env={"MODELS_DIR": str(repo)}) as w:
        yield w


@pytest.fixture(scope="module")
def web(repo: Path, worker: subprocess.Popen) -> Iterator[str]:
    """The web process under gunicorn over the scratch repository, queueing on the worker's Redis."""
    from conftest import web_server

    with web_server(REDIS_URL=WORKER_REDIS_URL, MODELS_DIR=str(repo)) as url:
        yield url


def infer(session: requests.Session, url: str, rows: list[list[float]], **headers: str) -> dict:
    """A V2 request: its answer names the model and version that served it."""
    body = {"inputs": [{"name": "features", "shape": [len(rows), 4], "datatype": "FP32",
                        "data": [x for row in rows for x in row]}]}
    answer = session.post(url, json=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def report(web: str, model: str, until: Callable[[dict], bool], timeout_s: float = 60) -> dict:
    """A model's experiments report once `until` holds of it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = requests.get(f"{web}/v1/models/{model}/experiments", timeout=10).json()
        if until(found):
            return found
        time.sleep(0.1)
    pytest.fail(f"the {model} experiments never got there: {found}")


def ok(found: dict) -> dict[str, int]:
    """Successful requests per arm of a report."""
    return {arm: record["ok"] for arm, record in found["arms"].items()}


def test_an_80_20_split_holds_within_3_points_over_2000_requests_and_each_arm_is_counted(web: str):
    before = ok(report(web, "iris", lambda _: True))
    with requests.Session() as session:
        served = collections.Counter(infer(session, f"{web}/v2/models/iris/infer", [SETOSA])["model_version"]
                                     for _ in range(2000))
    assert set(served) == {"1", "2"} and abs(served["2"] / 2000 - 0.2) <= 0.03, served
    counted = report(web, "iris", lambda r: sum(ok(r).values()) >= sum(before.values()) + 2000)
    assert {arm: n - before.get(arm, 0) for arm, n in ok(counted).items()} == dict(served)
    assert {arm: counted["arms"][arm]["share"] for arm in ("1", "2")} == {"1": 0.8, "2": 0.2}
    assert all(counted["arms"][arm]["mean_latency_ms"] > 0 for arm in ("1", "2"))


def test_one_user_always_sees_one_version_the_same_in_every_process(web: str):
    users = [f"user-{n}" for n in range(40)]
    with requests.Session() as session:
        seen = {user: {infer(session, f"{web}/v2/models/iris/infer", [SETOSA], **{"X-User-ID": user})["model_version"]
                       for _ in range(5)} for user in users}
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert {user: versions.pop() for user, versions in seen.items()} == {
        user: "2" if bucket("iris", user) >= 0.8 else "1" for user in users}  # the hash is the web process's too


def test_a_header_rule_routes_to_its_model_unless_a_version_is_named(web: str):
    with requests.Session() as session:
        ruled = infer(session, f"{web}/v2/models/iris/infer", [SETOSA], **{"X-Arm": "setosa"})
        named = infer(session, f"{web}/v2/models/iris/versions/2/infer", [SETOSA], **{"X-Arm": "setosa"})
    assert ruled["model_name"] == "iris-setosa" and ruled["outputs"][2]["data"] == ["setosa"]
    assert (named["model_name"], named["model_version"]) == ("iris", "2")


def test_shadows_agree_fully_when_identical_and_less_when_another_model(web: str):
    rows = load_iris().data.astype(np.float32)[::5].tolist()  # 30 flowers of the three species
    with requests.Session() as session:
        for row in rows:
            infer(session, f"{web}/v2/models/flowers/infer", [row])
        for row in rows[:10]:
            infer(session, f"{web}/v2/models/flowers/versions/2/infer", [row])

    def compared(found: dict) -> bool:
        arms = found["arms"]
        return ({s["requests"] for s in arms.get("1", {}).get("shadows", {}).values()} == {len(rows)}
                and arms.get("2", {}).get("shadows", {}).get("iris-setosa:1", {}).get("requests") == 10)

    arms = report(web, "flowers", compared)["arms"]
    same, other = arms["1"]["shadows"]["flowers:2"], arms["1"]["shadows"]["iris-setosa:1"]
    assert (same["rows"], same["agreed"], same["agreement"], same["failed"]) == (30, 30, 1.0, 0)
    assert other["rows"] == 30 and other["agreement"] < 1.0
    assert same["mean_latency_ms"] > 0 and same["live_mean_latency_ms"] > 0
    assert list(arms["2"]["shadows"]) == ["iris-setosa:1"]  # never mirrored to the version that answered


def test_the_batch_latency_class_is_queued_as_a_job_a_worker_runs(web: str):
    body = {"instances": [SETOSA, [6.3, 3.3, 6.0, 2.5]]}
    headers = {"X-Latency-Class": "batch", "X-User-ID": "user-7"}
    queued = requests.post(f"{web}/v1/models/iris:predict", json=body, headers=headers, timeout=10)
    assert queued.status_code == 202 and not queued.history, queued.text
    version = 2 if bucket("iris", "user-7") >= 0.8 else 1
    deadline, job = time.monotonic() + 30, {}
    while time.monotonic() < deadline and job.get("status") not in ("succeeded", "failed"):
        job = requests.get(f"{web}{queued.json()['status_url']}", timeout=10).json()
        time.sleep(0.05)
    assert (job["status"], job["version"]) == ("succeeded", version), job
    inline = requests.post(f"{web}/v1/models/iris/versions/{version}:predict", json=body, timeout=10)
    assert job["result"] == inline.json()
