"""Load shedding through the real web process (gunicorn), and `:submit` held to a queue depth with no worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from conftest import REDIS_URL, web_server
from flask import Flask

from samples import error_of
from webapp import close_app, create_app

pytestmark = pytest.mark.integration

ROWS = 3000
"""Rows of one request: its body (about 21 KB) is past what the event loop answers itself, so requests run on
the web process's threads, at once."""
BODY = {"instances": [[0.5]] * ROWS}


def slow_model(size: int = 512, rounds: int = 150) -> bytes:
    """An ONNX model `x [n, 1] -> y [n, 1]` whose run takes a measurable time whatever the rows (about 0.2 s on
    one thread here): `rounds` products of a `size` square matrix scaled by the inputs' sum, then y = x + mean."""
    from onnx import helper, numpy_helper

    weights = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32) / np.float32(size ** 0.5)
    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Mul", ["w", "total"], ["a0"])]
    for i in range(rounds):
        nodes += [helper.make_node("MatMul", [f"a{i}", "w"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"a{i + 1}"])]
    nodes += [helper.make_node("ReduceMean", [f"a{rounds}"], ["mean"], keepdims=0),
              helper.make_node("Add", ["x", "mean"], ["y"])]
    return _model(nodes, [numpy_helper.from_array(weights, "w")])


def quick_model() -> bytes:
    """An ONNX model `x [n, 1] -> y [n, 1]` answering y = x + 1 at once."""
    from onnx import helper

    return _model([helper.make_node("Add", ["x", "one"], ["y"])], [helper.make_tensor("one", 1, [], [1.0])])


def _model(nodes: list, initializers: list) -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "scratch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def add_model(root: Path, name: str, artefact: bytes, limits: str) -> None:
    """Write a model `name` of `artefact` under `root`, its spec declaring `limits`."""
    (root / name / "1").mkdir(parents=True)
    (root / name / "1" / "model.onnx").write_bytes(artefact)
    (root / name / "model.toml").write_text(
        '[[inputs]]\nname = "x"\ndtype = "float32"\nshape = [-1, 1]\n\n'
        '[[outputs]]\nname = "y"\ndtype = "float32"\nshape = [-1, 1]\n\n'
        f"[options]\nintra_op_threads = 1\n\n[limits]\n{limits}\n")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`slow` (2 at once), `guarded` (the same, 1 at once, falling back to `quick`), `quick` (3 jobs queued)."""
    root = tmp_path_factory.mktemp("guarded")
    slow = slow_model()
    add_model(root, "slow", slow, "max_concurrency = 2\nretry_after_s = 2")
    add_model(root, "guarded", slow, 'max_concurrency = 1\nfallback = "quick"')
    add_model(root, "quick", quick_model(), "max_queue_depth = 3\nretry_after_s = 4")
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[str]:
    """The web process under gunicorn over `repo`, with more threads than any model's places, and no worker."""
    with web_server(MODELS_DIR=str(repo), WEB_THREADS="8", ORT_INTRA_OP_THREADS="1") as url:
        yield url


def at_once(url: str, count: int) -> list[requests.Response]:
    """`count` requests of BODY to `url`, each on its own connection, sent together."""
    start = threading.Barrier(count)

    def send(_: int) -> requests.Response:
        with requests.Session() as session:
            start.wait(timeout=10)
            return session.post(url, json=BODY, timeout=60)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(send, range(count)))


def test_past_max_concurrency_requests_are_shed_with_429_and_retry_after(server: str):
    requests.post(f"{server}/v1/models/slow:predict", json=BODY, timeout=60).raise_for_status()  # loaded
    answers = at_once(f"{server}/v1/models/slow:predict", 6)
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(429) >= 1 and statuses.count(200) >= 2 and set(statuses) == {200, 429}, statuses
    for shed in (a for a in answers if a.status_code == 429):
        assert shed.headers["Retry-After"] == "2" and "limit of 2" in shed.json()["error"]
    for served in (a for a in answers if a.status_code == 200):
        assert len(served.json()["predictions"]) == ROWS and "X-Fallback" not in served.headers


def test_past_max_concurrency_the_fallback_answers_and_says_so(server: str):
    requests.post(f"{server}/v1/models/guarded:predict", json=BODY, timeout=60).raise_for_status()
    answers = at_once(f"{server}/v1/models/guarded:predict", 4)
    assert [a.status_code for a in answers] == [200] * 4
    fallbacks = [a for a in answers if a.headers.get("X-Fallback") == "quick"]
    assert 1 <= len(fallbacks) <= 3
    assert all(a.json()["predictions"][0] == [1.5] for a in fallbacks)  # quick's x + 1
    assert all(a.json()["predictions"][0] != [1.5] for a in answers if a not in fallbacks)


def test_submit_past_max_queue_depth_is_refused_with_429_while_no_worker_runs(server: str):
    submit = f"{server}/v1/models/quick:submit"
    queued = [requests.post(submit, json={"instances": [[1.0]]}, timeout=10) for _ in range(3)]
    assert [q.status_code for q in queued] == [202] * 3
    refused = requests.post(submit, json={"instances": [[1.0]]}, timeout=10)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "4"
    assert "3 jobs waiting" in refused.json()["error"]
    assert requests.get(f"{server}/v1/jobs/{queued[0].json()['job_id']}", timeout=10).json()["status"] == "queued"


@pytest.fixture
def unbatched_app(repo: Path) -> Iterator[Flask]:
    """An app over `repo` that sends each job as a Celery task of its own (no batching) to the test Redis,
    whose `predict` queue is emptied first."""
    redis.Redis.from_url(REDIS_URL).delete("predict")
    app = create_app({"TESTING": True, "models_dir": repo, "redis_url": REDIS_URL, "batching": False})
    yield app
    close_app(app)
    redis.Redis.from_url(REDIS_URL).delete("predict")


def test_an_unbatched_job_is_held_to_the_depth_of_its_celery_queue(unbatched_app: Flask):
    client = unbatched_app.test_client()
    for _ in range(3):
        assert client.post("/v1/models/quick:submit", json={"instances": [[1.0]]}).status_code == 202
    assert redis.Redis.from_url(REDIS_URL).llen("predict") == 3  # three messages, no worker to take them
    refused = client.post("/v1/models/quick:submit", json={"instances": [[1.0]]})
    assert "3 jobs waiting" in error_of(refused, 429) and refused.headers["Retry-After"] == "4"
