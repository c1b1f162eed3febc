"""The batch API in eager mode over the real MariaDB and Redis: registration, runs, progress, refusals."""

from __future__ import annotations

import base64
from collections.abc import Callable

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sklearn.datasets import load_digits, load_iris

from samples import digit_png, error_of
from tasks import batch, db
from tasks.runs import RunRefused
from webapp import create_app

IDLE_REDIS_URL = "redis://127.0.0.1:6379/13"
"""A database no worker listens on: runs queued there stay queued."""
ROWS = load_iris().data.astype(np.float32)


@pytest.fixture
def eager(batch_tables: sa.Engine, eager_client: FlaskClient) -> FlaskClient:
    """A client whose runs execute in the request, over the real MariaDB."""
    return eager_client


@pytest.fixture
def idle(batch_tables: sa.Engine) -> Flask:
    """An app whose runs are queued where no worker takes them."""
    redis.Redis.from_url(IDLE_REDIS_URL).flushdb()
    return create_app({"TESTING": True, "redis_url": IDLE_REDIS_URL})


def register(client: FlaskClient, model: str, instances: list, **extra: object) -> list[int]:
    response = client.post("/v1/batch/items", json={"model": model, "instances": instances, **extra})
    assert response.status_code == 201, response.get_data(as_text=True)
    return response.get_json()["ids"]


def run(client: FlaskClient, model: str) -> dict:
    response = client.post("/v1/batch/runs", json={"model": model})
    assert response.status_code == 202, response.get_data(as_text=True)
    assert response.headers["Location"] == response.get_json()["status_url"]
    return client.get(response.get_json()["status_url"]).get_json()


def test_a_run_predicts_every_registered_item_as_predict_would(eager: FlaskClient):
    ids = register(eager, "iris", ROWS.tolist())
    assert len(ids) == len(set(ids)) == 150
    done = run(eager, "iris")
    assert done["status"] == "succeeded"
    assert (done["total"], done["done"], done["succeeded"], done["failed"]) == (150, 150, 150, 0)
    assert done["rows_per_s"] > 0 and done["eta_s"] is None and done["remaining"] == 0
    expected = eager.post("/v1/models/iris:predict", json={"instances": ROWS.tolist()}).get_json()["predictions"]
    for item_id, prediction in zip(ids, expected, strict=True):
        item = eager.get(f"/v1/batch/items/{item_id}").get_json()
        assert item["status"] == "succeeded" and item["attempts"] == 1 and item["run_id"] == done["run_id"]
        assert item["prediction"] == prediction
        assert item["created_at"] <= item["started_at"] <= item["finished_at"]


def test_image_items_run_through_the_spec_s_preprocessing(eager: FlaskClient):
    digits = load_digits()
    images = [{"b64": base64.b64encode(digit_png(digits.data[i])).decode()} for i in range(20)]
    ids = register(eager, "digits-light", images)
    assert run(eager, "digits-light")["succeeded"] == 20
    expected = eager.post("/v1/models/digits-light:predict", json={"instances": images}).get_json()["predictions"]
    assert [eager.get(f"/v1/batch/items/{i}").get_json()["prediction"] for i in ids] == expected


def test_a_bad_item_fails_with_its_reason_and_the_others_succeed(eager: FlaskClient, batch_tables: sa.Engine):
    digits = load_digits()
    good = [{"b64": base64.b64encode(digit_png(digits.data[i])).decode()} for i in range(5)]
    ids = register(eager, "digits-light", [*good[:2], {"b64": base64.b64encode(b"not an image").decode()}, *good[2:]])
    with batch_tables.begin() as connection:  # rows that reached the table some other way than the API
        for text in ("[1, 2, 3]", "{not json"):
            connection.execute(db.items.insert().values(model="iris", version=1, input=text, status="queued",
                                                        created_at=db.now()))
    ok = register(eager, "iris", ROWS[:3].tolist())
    assert run(eager, "digits-light")["failed"] == 1
    items = [eager.get(f"/v1/batch/items/{i}").get_json() for i in ids]
    assert [i["status"] for i in items] == ["succeeded"] * 2 + ["failed"] + ["succeeded"] * 3
    assert "image" in items[2]["error"] and items[2]["prediction"] is None and items[2]["retries_left"] == 2
    iris = run(eager, "iris")
    assert (iris["succeeded"], iris["failed"]) == (3, 2)
    failed = eager.get("/v1/batch/items?model=iris&status=failed").get_json()["items"]
    assert sorted(i["error"][:29] for i in failed) == ["input 'features': expected sh", "the stored input is not JSON:"]
    assert all(eager.get(f"/v1/batch/items/{i}").get_json()["status"] == "succeeded" for i in ok)


def test_failed_items_are_retried_by_later_runs_until_out_of_attempts(eager: FlaskClient, batch_tables: sa.Engine):
    bad = {"b64": base64.b64encode(b"GIF89a broken").decode()}
    (item_id,) = register(eager, "digits-light", [bad])
    for attempt in (1, 2, 3):
        assert run(eager, "digits-light")["failed"] == 1
        item = eager.get(f"/v1/batch/items/{item_id}").get_json()
        assert (item["attempts"], item["retries_left"]) == (attempt, 3 - attempt)
    assert run(eager, "digits-light")["total"] == 0  # out of attempts: no longer retried
    assert eager.get(f"/v1/batch/items/{item_id}").get_json()["attempts"] == 3


def test_items_registered_at_another_version_run_on_it(eager: FlaskClient):
    (item_id,) = register(eager, "iris", [ROWS[0].tolist()], version=1)
    run(eager, "iris")
    assert eager.get(f"/v1/batch/items/{item_id}").get_json()["version"] == 1


def test_listing_filters_and_pages(eager: FlaskClient):
    ids = register(eager, "iris", ROWS[:25].tolist())
    first = eager.get("/v1/batch/items?model=iris&per_page=10").get_json()
    assert first["total"] == 25 and [i["id"] for i in first["items"]] == ids[::-1][:10]
    assert first["next"] == "/v1/batch/items?model=iris&page=2&per_page=10"
    last = eager.get("/v1/batch/items?model=iris&per_page=10&page=3").get_json()
    assert [i["id"] for i in last["items"]] == ids[::-1][20:] and last["next"] is None
    assert eager.get("/v1/batch/items?status=succeeded").get_json()["total"] == 0
    assert eager.get("/v1/batch/items?model=digits-light").get_json()["items"] == []


def test_run_history_newest_first(eager: FlaskClient):
    register(eager, "iris", ROWS[:2].tolist())
    first, second = run(eager, "iris"), run(eager, "iris")
    history = eager.get("/v1/batch/runs?model=iris").get_json()
    assert [r["run_id"] for r in history["runs"]] == [second["run_id"], first["run_id"]]
    assert (first["total"], second["total"]) == (2, 0)
    assert eager.get("/v1/batch/runs?model=digits-light").get_json()["runs"] == []


def test_a_model_never_has_two_runs_at_once(idle: Flask):
    client = idle.test_client()
    register(client, "iris", ROWS[:2].tolist())
    queued = client.post("/v1/batch/runs", json={"model": "iris"})
    assert queued.status_code == 202
    again = client.post("/v1/batch/runs", json={"model": "iris"})
    assert again.status_code == 409
    assert again.get_json()["run_id"] == queued.get_json()["run_id"]
    assert "queued or running" in again.get_json()["error"]
    assert client.post("/v1/batch/runs", json={"model": "digits-light"}).status_code == 202
    assert client.get(queued.get_json()["status_url"]).get_json()["status"] == "queued"


def test_a_duplicate_scheduled_fire_is_harmless(idle: Flask, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(batch.schedule, "period", lambda when, at=None: "same period")
    store = idle.extensions["runs"]
    batch.batch_scheduled.apply(args=["iris", "*/5 * * * *"])  # the first fire creates and starts a run
    second = batch.batch_scheduled.apply(args=["iris", "*/5 * * * *"]).result
    assert "period" in second["skipped"]
    runs, total = store.page("iris", 1, 10)
    assert total == 1 and runs[0].triggered_by == "schedule */5 * * * *" and runs[0].status == "succeeded"
    with pytest.raises(RunRefused):
        store.create("iris", "schedule */5 * * * *", "same period")


def test_a_run_of_a_model_that_is_gone_fails_with_the_reason(idle: Flask):
    store = idle.extensions["runs"]
    created = store.create("no-such-model", "api")
    batch.batch_run.apply(args=[created.id])
    failed = store.get(created.id)
    assert failed.status == "failed" and "no-such-model" in failed.error and failed.active is None


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"model": "nope", "instances": [[1, 2, 3, 4]]}, 404, "nope"),
    ({"model": "iris", "version": 9, "instances": [[1, 2, 3, 4]]}, 404, "version"),
    ({"model": "iris", "version": "1", "instances": [[1, 2, 3, 4]]}, 400, "version"),
    ({"model": "iris", "version": True, "instances": [[1, 2, 3, 4]]}, 400, "version"),
    ({"instances": [[1, 2, 3, 4]]}, 400, "model"),
    ({"model": "iris"}, 400, "instances"),
    ({"model": "iris", "instances": []}, 400, "instances"),
    ({"model": "iris", "instances": [[1, 2, 3]]}, 400, "shape"),
    ({"model": "iris", "instances": [[1, 2, 3, "x"]]}, 400, "float32"),
    ({"model": "iris", "inputs": [[1, 2, 3, 4]]}, 400, "instances"),
    ({"model": "iris", "instances": [[1, 2, 3, 4]], "extra": 1}, 400, "instances"),
])
def test_registration_refusals(eager: FlaskClient, body: dict, status: int, words: str):
    assert words in error_of(eager.post("/v1/batch/items", json=body), status)


def test_registration_refuses_nan_too_many_items_and_other_content_types(eager: FlaskClient):
    nan = eager.post("/v1/batch/items", data=b'{"model": "iris", "instances": [[NaN, 1, 2, 3]]}',
                     content_type="application/json")
    assert "NaN" in error_of(nan, 400)
    app = create_app({"TESTING": True, "batch_max_items": 5})
    many = app.test_client().post("/v1/batch/items", json={"model": "iris", "instances": ROWS[:6].tolist()})
    assert "at most 5" in error_of(many, 413)
    assert "content type" in error_of(eager.post("/v1/batch/items", data="x", content_type="text/plain"), 415)


@pytest.mark.parametrize(("path", "status"), [
    ("/v1/batch/items/0", 404), ("/v1/batch/items/99999999999999999999999", 404), ("/v1/batch/items/x", 404),
    ("/v1/batch/runs/12345", 404), ("/v1/batch/items?status=done", 400), ("/v1/batch/items?page=0", 400),
    ("/v1/batch/items?per_page=5000", 400), ("/v1/batch/items?page=%C2%B2", 400), ("/v1/batch/runs?page=-1", 400),
])
def test_lookups_and_listing_refusals(eager: FlaskClient, path: str, status: int):
    error_of(eager.get(path), status)


def test_run_refusals(eager: FlaskClient):
    assert eager.post("/v1/batch/runs", json={"model": "nope"}).status_code == 404
    assert eager.post("/v1/batch/runs", json={}).status_code == 400
    assert eager.post("/v1/batch/runs", json={"model": "iris", "when": "now"}).status_code == 400


def test_an_unreachable_database_answers_503_and_predict_goes_on(batch_tables: sa.Engine):
    app = create_app({"TESTING": True, "database_url": "mysql+pymysql://root@127.0.0.1:1/test"})
    client = app.test_client()
    for response in (client.post("/v1/batch/items", json={"model": "iris", "instances": [[1, 2, 3, 4]]}),
                     client.get("/v1/batch/items/1"), client.post("/v1/batch/runs", json={"model": "iris"})):
        assert "batch store" in error_of(response, 503) and response.headers["Retry-After"]
    assert client.post("/v1/models/iris:predict", json={"instances": [[1, 2, 3, 4]]}).status_code == 200


def test_the_whole_pattern_on_the_embedded_sqlite(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                   make_eager_app: Callable[..., Flask]):
    url = f"sqlite:///{tmp_path / 'platform.db'}"
    db.upgrade(url)
    monkeypatch.setenv("DATABASE_URL", url)
    client = make_eager_app().test_client()
    ids = register(client, "iris", ROWS[:30].tolist())
    assert run(client, "iris")["succeeded"] == 30
    expected = client.post("/v1/models/iris:predict", json={"instances": ROWS[:30].tolist()}).get_json()
    assert [client.get(f"/v1/batch/items/{i}").get_json()["prediction"] for i in ids] == expected["predictions"]
    with sa.create_engine(url).connect() as connection:
        assert connection.execute(sa.select(db.items.c.status).distinct()).scalars().all() == ["succeeded"]


def test_a_database_blip_in_a_chunk_is_retried(idle: Flask, monkeypatch: pytest.MonkeyPatch):
    from tasks.items import ItemStore

    client, original, calls = idle.test_client(), ItemStore.claim, []
    ids = register(client, "iris", ROWS[:10].tolist())

    def flaky(self: ItemStore, *args: object, **kwargs: object) -> list:
        calls.append(1)
        if len(calls) == 1:
            raise sa.exc.OperationalError("SELECT ...", {}, Exception("Lost connection to server during query"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ItemStore, "claim", flaky)
    store = idle.extensions["runs"]
    started = store.start(store.create("iris", "api").id)
    batch.batch_chunk.apply(args=[started.id, 0, started.high_water])  # retried in place, as a worker would
    assert len(calls) == 2 and (store.get(started.id).status, store.get(started.id).succeeded) == ("succeeded", 10)
    assert {client.get(f"/v1/batch/items/{i}").get_json()["status"] for i in ids} == {"succeeded"}
