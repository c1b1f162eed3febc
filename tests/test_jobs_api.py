"""The job API in eager mode over the real Redis: submit, poll, cancel, expiry, refusals."""

from __future__ import annotations

import base64
import io
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sklearn.datasets import load_digits

from samples import Receiver, callback_receiver, digit_png, error_of
from webapp import create_app

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}
IDLE_REDIS_URL = "redis://127.0.0.1:6379/13"
"""A database no worker listens on: jobs queued there stay queued."""


@pytest.fixture
def idle_app() -> Flask:
    """An app whose jobs are queued where no worker takes them."""
    redis.Redis.from_url(IDLE_REDIS_URL).flushdb()
    return create_app({"TESTING": True, "redis_url": IDLE_REDIS_URL})


def submit(client: FlaskClient, body: dict, path: str = "/v1/models/iris:submit") -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 202, response.get_data(as_text=True)
    answer = response.get_json()
    assert response.headers["Location"] == answer["status_url"] == f"/v1/jobs/{answer['job_id']}"
    assert str(uuid.UUID(answer["job_id"])) == answer["job_id"]
    return answer


def test_submitted_job_succeeds_with_the_outputs_of_predict(eager_client: FlaskClient):
    job = eager_client.get(submit(eager_client, IRIS)["status_url"]).get_json()
    assert job["status"] == "succeeded"
    assert (job["model"], job["version"]) == ("iris", 1)
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["result"] == eager_client.post("/v1/models/iris:predict", json=IRIS).get_json()
    assert "error" not in job


def test_columnar_and_versioned_submission(eager_client: FlaskClient):
    body = {"inputs": {"features": IRIS["instances"]}}
    job = submit(eager_client, body, "/v1/models/iris/versions/1:submit")
    result = eager_client.get(job["status_url"]).get_json()["result"]
    assert result == eager_client.post("/v1/models/iris:predict", json=body).get_json()


def test_image_job_is_preprocessed_by_the_worker(eager_client: FlaskClient):
    digits = load_digits()
    images = [{"b64": base64.b64encode(digit_png(digits.data[i])).decode()} for i in range(5)]
    job = submit(eager_client, {"instances": images}, "/v1/models/digits-heavy:submit")
    predictions = eager_client.get(job["status_url"]).get_json()["result"]["predictions"]
    assert [p["label"] for p in predictions] == list(digits.target[:5])


def test_input_a_worker_cannot_decode_ends_failed_with_the_reason(eager_client: FlaskClient):
    job = submit(eager_client, {"instances": [{"b64": base64.b64encode(b"not an image").decode()}]},
                 "/v1/models/digits-light:submit")
    answer = eager_client.get(job["status_url"]).get_json()
    assert answer["status"] == "failed"
    assert "image" in answer["error"]
    assert "result" not in answer


def test_invalid_input_is_refused_at_submission(eager_client: FlaskClient):
    assert "shape" in error_of(eager_client.post("/v1/models/iris:submit", json={"instances": [[1, 2, 3]]}), 400)
    assert "no model" in error_of(eager_client.post("/v1/models/nope:submit", json=IRIS), 404)
    assert "content type" in error_of(eager_client.post("/v1/models/iris:submit", data="x",
                                                        content_type="text/plain"), 415)


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "123", "00000000-0000-0000-0000-00000000000g", "a" * 300])
def test_an_id_never_issued_is_404(eager_client: FlaskClient, job_id: str):
    assert "no job" in error_of(eager_client.get(f"/v1/jobs/{job_id}"), 404)
    assert "no job" in error_of(eager_client.delete(f"/v1/jobs/{job_id}"), 404)


def test_an_expired_job_is_410(eager_client: FlaskClient, redis_url: str):
    job_id = submit(eager_client, IRIS)["job_id"]
    redis.Redis.from_url(redis_url).delete(f"job:{job_id}", f"job:{job_id}:outputs")
    assert "expired" in error_of(eager_client.get(f"/v1/jobs/{job_id}"), 410)


def test_a_queued_job_can_be_cancelled_and_then_never_runs(idle_app: Flask):
    client = idle_app.test_client()
    job = submit(client, IRIS)
    assert client.get(job["status_url"]).get_json()["status"] == "queued"
    cancelled = client.delete(job["status_url"])
    assert cancelled.status_code == 200
    assert cancelled.get_json()["status"] == "cancelled"
    store = idle_app.extensions["jobs"]
    assert store.start(job["job_id"]) == 0  # what a worker does first: the job is not run
    assert client.get(job["status_url"]).get_json()["status"] == "cancelled"


def test_a_finished_job_cannot_be_cancelled(eager_client: FlaskClient):
    job = submit(eager_client, IRIS)
    assert "succeeded" in error_of(eager_client.delete(job["status_url"]), 409)


def test_redis_down_submit_is_503_with_retry_after_and_predict_still_answers():
    app = create_app({"TESTING": True, "redis_url": "redis://127.0.0.1:1/0"})
    client = app.test_client()
    response = client.post("/v1/models/iris:submit", json=IRIS)
    assert "unavailable" in error_of(response, 503)
    assert int(response.headers["Retry-After"]) > 0
    assert client.post("/v1/models/iris:predict", json=IRIS).status_code == 200


def test_multipart_image_uploads_are_one_instance_each(eager_client: FlaskClient):
    digits = load_digits()
    files = {f"file{i}": (io.BytesIO(digit_png(digits.data[i])), f"digit{i}.png") for i in range(3)}
    response = eager_client.post("/v1/models/digits-heavy:submit", data=files, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_data(as_text=True)
    predictions = eager_client.get(response.get_json()["status_url"]).get_json()["result"]["predictions"]
    assert [p["label"] for p in predictions] == list(digits.target[:3])


def test_multipart_to_a_model_without_image_input_is_400(eager_client: FlaskClient):
    data = {"file": (io.BytesIO(b"1,2,3,4"), "rows.csv")}
    response = eager_client.post("/v1/models/iris:submit", data=data, content_type="multipart/form-data")
    assert "image input" in error_of(response, 400)
    empty = eager_client.post("/v1/models/digits-light:submit", data={"note": "x"}, content_type="multipart/form-data")
    assert "no file" in error_of(empty, 400)


def test_request_id_is_kept_or_made(eager_client: FlaskClient):
    given = eager_client.post("/v1/models/iris:submit", json=IRIS, headers={"X-Request-ID": "trace-42"})
    assert given.headers["X-Request-ID"] == "trace-42"
    made = eager_client.post("/v1/models/iris:submit", json=IRIS, headers={"X-Request-ID": "x" * 500})
    assert len(made.headers["X-Request-ID"]) == 32


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("CALLBACK_ALLOW_NETWORKS", "127.0.0.1/32")  # the receiver is local; the web and the task read it
    with callback_receiver() as url:
        yield url


def test_the_finished_job_is_posted_to_its_callback_url(eager_client: FlaskClient, receiver: str):
    job = submit(eager_client, {**IRIS, "callback_url": receiver})
    assert Receiver.bodies == [eager_client.get(job["status_url"]).get_json()]
    assert Receiver.bodies[0]["status"] == "succeeded"
    assert Receiver.bodies[0]["result"]["predictions"][0]["label_name"] == "setosa"


def test_a_failed_job_is_posted_too_and_a_4xx_is_not_retried(eager_client: FlaskClient, receiver: str):
    Receiver.answers = [404]
    bad_image = {"instances": [{"b64": base64.b64encode(b"nope").decode()}], "callback_url": receiver}
    submit(eager_client, bad_image, "/v1/models/digits-light:submit")
    assert [b["status"] for b in Receiver.bodies] == ["failed"]


@pytest.mark.parametrize("url", ["ftp://example.com/x", "not a url", "http://", 42, "http://[::1"])
def test_a_bad_callback_url_is_400(eager_client: FlaskClient, url: object):
    assert "callback_url" in error_of(eager_client.post("/v1/models/iris:submit", json={**IRIS, "callback_url": url}),
                                      400)


def test_redis_stopped_submit_is_503_while_predict_answers(tmp_path, make_eager_app: Callable[..., Flask]):
    from deploy import redis_server

    process, url = redis_server.start(tmp_path / "redis", stdout=subprocess.DEVNULL)
    try:
        client = make_eager_app(redis_url=url).test_client()
        assert client.post("/v1/models/iris:submit", json=IRIS).status_code == 202
    finally:
        process.terminate()
        process.wait(10)
    response = client.post("/v1/models/iris:submit", json=IRIS)
    assert "unavailable" in error_of(response, 503)
    assert response.headers["Retry-After"]
    assert client.post("/v1/models/iris:predict", json=IRIS).status_code == 200
