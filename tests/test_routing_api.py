"""Routing by the spec's `[routing]` through the app: header rules, sticky arms, the batch latency class, the
experiments' report, and the mirror's bounded hand-off."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import REGISTRY

from models import Registry, Settings
from models.config import PACKAGE_DIR
from tasks import create_celery
from tasks.experiments import Experiments
from webapp.mirror import Mirror
from webapp.served import Served
from webapp.traffic import Traffic

SETOSA = [5.1, 3.5, 1.4, 0.2]
ROUTING = """
[routing]
split = { "1" = 0.5, "2" = 0.5 }
sticky_header = "X-User-ID"
queue_batch = true

[[routing.rules]]
header = "X-Arm"
equals = "setosa"
model = "iris-setosa"
"""


def v2_body(rows: list[list[float]]) -> dict:
    """A V2 request for iris: its answer names the model and version that served it."""
    return {"inputs": [{"name": "features", "shape": [len(rows), 4], "datatype": "FP32",
                        "data": [x for row in rows for x in row]}]}


@pytest.fixture
def routed(repo: Path, redis_url: str) -> Path:
    """The scratch repository: iris at versions 1 and 2 (one artefact), routed; and iris-setosa. Its
    experiment records are removed first."""
    shutil.copytree(repo / "iris" / "1", repo / "iris" / "2")
    shutil.copytree(PACKAGE_DIR / "iris-setosa", repo / "iris-setosa")
    with (repo / "iris" / "model.toml").open("a") as spec:
        spec.write(ROUTING)
    client = redis.Redis.from_url(redis_url)
    client.delete("experiment:iris:arms", "experiment:iris:shadows")
    client.close()
    return repo


@pytest.fixture
def app(routed: Path, make_eager_app: Callable[..., Flask]) -> Flask:
    """An app over the routed repository, rescanning it on every request; its jobs run in the request."""
    return make_eager_app(models_dir=routed, reload_interval_s=0.0)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def served_by(client: FlaskClient, path: str = "/v2/models/iris/infer", **headers: str) -> tuple[str, str]:
    """The model and version that answered a V2 request."""
    answer = client.post(path, json=v2_body([SETOSA]), headers=headers)
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()["model_name"], answer.get_json()["model_version"]


def test_a_header_rule_routes_to_its_model_and_a_named_version_bypasses_routing(client: FlaskClient):
    assert served_by(client, **{"X-Arm": "setosa"})[0] == "iris-setosa"
    assert served_by(client, **{"X-Arm": "versicolor"})[0] == "iris"
    assert served_by(client, "/v2/models/iris/versions/2/infer", **{"X-Arm": "setosa"}) == ("iris", "2")
    predicted = client.post("/v1/models/iris:predict", json={"instances": [SETOSA]}, headers={"X-Arm": "setosa"})
    assert predicted.get_json()["predictions"][0]["label_name"] == "setosa"
    assert predicted.get_json()["predictions"][0]["probabilities"][1] > 0.5  # iris-setosa's (other, setosa)


def test_a_sticky_client_sees_one_version_and_the_split_reaches_both(client: FlaskClient):
    seen = {user: {served_by(client, **{"X-User-ID": user})[1] for _ in range(3)} for user in map(str, range(30))}
    assert all(len(versions) == 1 for versions in seen.values()), seen
    assert set().union(*seen.values()) == {"1", "2"}


def test_routing_written_into_a_spec_while_serving_takes_effect_at_the_next_scan(repo: Path,
                                                                                   make_eager_app: Callable):
    shutil.copytree(PACKAGE_DIR / "iris-setosa", repo / "iris-setosa")
    client = make_eager_app(models_dir=repo, reload_interval_s=0.0).test_client()
    assert served_by(client, **{"X-Arm": "setosa"})[0] == "iris"
    spec = repo / "iris" / "model.toml"
    spec.write_text(spec.read_text() + ROUTING.replace('"2" = 0.5', '"2" = 0'))
    assert served_by(client)[0] == "iris"  # the scan of this request makes the plan of the next
    assert served_by(client, **{"X-Arm": "setosa"})[0] == "iris-setosa"
    assert served_by(client) == ("iris", "1")  # version 2 of the split is absent: its share goes to the others


def test_the_batch_latency_class_is_queued_as_a_job_of_the_version_chosen(client: FlaskClient):
    body = {"instances": [SETOSA, [6.3, 3.3, 6.0, 2.5]]}
    queued = client.post("/v1/models/iris:predict", json=body, headers={"X-Latency-Class": "batch", "X-User-ID": "u1"})
    version = served_by(client, **{"X-User-ID": "u1"})[1]
    assert queued.status_code == 202, queued.get_json()  # run by a real worker in test_routing_live
    job = queued.get_json()
    assert queued.headers["Location"] == job["status_url"] == f"/v1/jobs/{job['job_id']}"
    assert client.get(job["status_url"]).get_json()["version"] == int(version)
    inline = client.post("/v1/models/iris:predict", json=body, headers={"X-Latency-Class": "inline"})
    assert inline.status_code == 200


def test_a_queued_request_is_checked_before_it_is_queued(client: FlaskClient):
    batch = {"X-Latency-Class": "batch"}
    short = client.post("/v1/models/iris:predict", json={"instances": [[1.0]]}, headers=batch)
    assert short.status_code == 400 and "error" in short.get_json()
    hook = client.post("/v1/models/iris:predict", json={"instances": [SETOSA], "callback_url": "ftp://x"},
                       headers=batch)
    assert hook.status_code == 400 and "callback_url" in hook.get_json()["error"]
    v2 = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": SETOSA}]}
    queued = client.post("/v2/models/iris/infer", json=v2, headers=batch)
    assert queued.status_code == 202 and client.get(queued.get_json()["status_url"]).status_code == 200


def test_the_experiments_report_counts_each_arm(client: FlaskClient):
    users = {str(n): served_by(client, **{"X-User-ID": str(n)})[1] for n in range(40)}
    assert client.post("/v1/models/iris:predict", json={"instances": [[1.0]]}).status_code == 400
    report = wait_for_requests(client, len(users) + 1)
    assert report["routing"]["split"] == {"1": 0.5, "2": 0.5} and report["routing"]["sticky_header"] == "x-user-id"
    arms = report["arms"]
    assert {arm: arms[arm]["ok"] for arm in arms} == {v: list(users.values()).count(v) for v in ("1", "2")}
    assert sum(arms[arm]["requests"] for arm in arms) == len(users) + 1  # the refused one too, not ok
    assert all(arms[arm]["share"] == 0.5 and arms[arm]["mean_latency_ms"] > 0 for arm in arms)
    assert report["dropped"] == 0 and all(arms[arm]["errors"] == 0 for arm in arms)
    plain = client.get("/v1/models/iris-setosa/experiments").get_json()
    assert (plain["routing"], plain["arms"]) == (None, {})
    missing = client.get("/v1/models/nope/experiments")
    assert missing.status_code == 404 and "nope" in missing.get_json()["error"]


def wait_for_requests(client: FlaskClient, count: int, timeout_s: float = 10) -> dict:
    """The iris experiments' report once its arms have counted `count` requests."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        report = client.get("/v1/models/iris/experiments").get_json()
        if sum(arm["requests"] for arm in report["arms"].values()) >= count:
            return report
        time.sleep(0.05)
    pytest.fail(f"the arms counted fewer than {count} requests: {report}")


@contextlib.contextmanager
def silent_redis() -> Iterator[str]:
    """The URL of a 'Redis' that takes connections and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"


def test_a_mirror_whose_redis_hangs_drops_and_counts_what_its_queue_cannot_hold(routed: Path):
    traffic = Traffic(Registry(Settings(models_dir=routed)))
    with silent_redis() as url:
        client = redis.Redis.from_url(url, socket_timeout=1)
        mirror = Mirror(traffic, Experiments(client), create_celery(), capacity=1)
        before = REGISTRY.get_sample_value("platform_shadow_dropped_total", {"model": "iris"}) or 0.0
        mirror(served(1))  # taken by the thread, which then waits on Redis
        deadline = time.monotonic() + 5
        while not mirror.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(5):
            mirror(served(2))  # one fits the queue; the rest are dropped, and the caller never waits
        assert mirror.queue.qsize() == 1 and mirror.dropped == {"iris": 4}
        assert REGISTRY.get_sample_value("platform_shadow_dropped_total", {"model": "iris"}) == before + 4
        mirror(served(1, model="iris-setosa"))  # not routed: not even looked at
        assert mirror.dropped == {"iris": 4}
        mirror.close()
        client.close()
    assert not mirror.thread.is_alive()


def served(version: int, model: str = "iris") -> Served:
    """A request the data plane served successfully."""
    features = np.array([SETOSA], dtype=np.float32)
    return Served(model, version, "v2", status=200, inputs={"features": features},
                  outputs={"label": np.array([0])})

