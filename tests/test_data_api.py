"""The data cache on the real MariaDB and Redis: inputs stored by id, preprocessed tensors cached and warmed."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
import sqlalchemy as sa
from flask import Flask
from flask.testing import FlaskClient
from sklearn.datasets import load_digits

from samples import digit_png, error_of
from tasks import db
from webapp import create_app

DIGITS = load_digits()


@pytest.fixture
def stored(database_url: str, redis_url: str) -> Iterator[redis.Redis]:
    """No stored inputs and no cached tensors."""
    engine = db.create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(db.data.delete())
    engine.dispose()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter("data:*"):
        client.delete(key)
    yield client
    client.close()


@pytest.fixture
def app(stored: redis.Redis, make_eager_app: Callable[..., Flask]) -> Flask:
    return make_eager_app()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def put_image(client: FlaskClient, index: int) -> str:
    response = client.post("/v1/data", data=digit_png(DIGITS.data[index]), content_type="image/png")
    assert response.status_code == 201, response.get_data(as_text=True)
    assert response.headers["Location"] == f"/v1/data/{response.get_json()['data_id']}"
    return response.get_json()["data_id"]


def predicted(client: FlaskClient, body: dict, model: str = "digits-light") -> list:
    response = client.post(f"/v1/models/{model}:predict", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()["predictions"]


def test_prediction_by_data_id_equals_sending_the_image(client: FlaskClient):
    ids = [put_image(client, i) for i in range(6)]
    images = [{"b64": base64.b64encode(digit_png(DIGITS.data[i])).decode()} for i in range(6)]
    assert predicted(client, {"data_ids": ids}) == predicted(client, {"instances": images})
    assert predicted(client, {"data_ids": ids[::-1]}) == predicted(client, {"instances": images[::-1]})
    assert [p["label"] for p in predicted(client, {"data_ids": ids}, "digits-heavy")] == list(DIGITS.target[:6])


def test_every_way_of_storing_an_input(client: FlaskClient):
    png = digit_png(DIGITS.data[3])
    uploaded = client.post("/v1/data", data={"file": (io.BytesIO(png), "d.png")})
    as_b64 = client.post("/v1/data", json={"b64": base64.b64encode(png).decode()})
    as_tensor = client.post("/v1/data", json={"instance": DIGITS.data[3].tolist()})
    ids = [r.get_json()["data_id"] for r in (uploaded, as_b64, as_tensor)]
    assert [r.status_code for r in (uploaded, as_b64, as_tensor)] == [201] * 3
    assert [client.get(f"/v1/data/{i}").get_json()["kind"] for i in ids] == ["image", "image", "instance"]
    assert {p["label"] for p in predicted(client, {"data_ids": ids})} == {3}
    assert predicted(client, {"data_ids": [ids[2]]}, "digits-heavy")[0]["label"] == 3


def test_the_preprocessed_tensor_is_cached_read_through_and_by_version(client: FlaskClient, stored: redis.Redis):
    data_id = put_image(client, 7)
    assert not list(stored.scan_iter("data:*"))
    predicted(client, {"data_ids": [data_id]})
    (key,) = stored.scan_iter("data:*")
    assert key.decode().startswith("data:digits-light:1:") and key.decode().endswith(data_id)
    assert 0 < stored.ttl(key) <= 3600
    predicted(client, {"data_ids": [data_id]}, "digits-heavy")  # another model: its own preprocessing, its entry
    assert len(list(stored.scan_iter("data:*"))) == 2


def test_a_hit_needs_neither_the_database_nor_preprocessing(client: FlaskClient, app: Flask,
                                                           monkeypatch: pytest.MonkeyPatch):
    data_id = put_image(client, 2)
    expected = predicted(client, {"data_ids": [data_id]})
    store = app.extensions["data"]
    monkeypatch.setattr(store, "_raw", lambda ids: pytest.fail(f"read {ids} from the database"))
    assert predicted(client, {"data_ids": [data_id]}) == expected


def test_warming_prefills_the_cache(client: FlaskClient, stored: redis.Redis):
    ids = [put_image(client, i) for i in range(4)]
    warmed = client.post("/v1/data:warm", json={"model": "digits-heavy", "data_ids": ids})
    assert warmed.status_code == 200 and warmed.get_json() == {"model": "digits-heavy", "version": 1, "count": 4,
                                                                "made": 4}
    assert len(list(stored.scan_iter("data:digits-heavy:*"))) == 4
    again = client.post("/v1/data:warm", json={"model": "digits-heavy", "data_ids": ids}).get_json()
    assert again["made"] == 0


def test_submit_takes_data_ids_too(client: FlaskClient):
    ids = [put_image(client, i) for i in range(3)]
    job = client.post("/v1/models/digits-light:submit", json={"data_ids": ids}).get_json()
    done = client.get(job["status_url"]).get_json()
    assert done["status"] == "succeeded", done
    assert done["result"]["predictions"] == predicted(client, {"data_ids": ids})


def test_with_redis_down_stored_inputs_are_still_served(stored: redis.Redis, redis_url: str):
    writer = create_app({"TESTING": True, "redis_url": redis_url}).test_client()
    data_id = put_image(writer, 5)
    down = create_app({"TESTING": True, "redis_url": "redis://127.0.0.1:1/0"}).test_client()
    image = {"b64": base64.b64encode(digit_png(DIGITS.data[5])).decode()}
    assert predicted(down, {"data_ids": [data_id]}) == predicted(writer, {"instances": [image]})


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"data_ids": ["0" * 32]}, 404, "no stored input"),
    ({"data_ids": ["../../etc/passwd"]}, 404, "32 hexadecimal"),
    ({"data_ids": [7]}, 400, "data_ids"),
    ({"data_ids": []}, 400, "data_ids"),
    ({"data_ids": "abc"}, 400, "data_ids"),
    ({"data_ids": ["0" * 32], "instances": [[1]]}, 400, "data_ids"),
])
def test_predict_refusals(client: FlaskClient, body: dict, status: int, words: str):
    assert words in error_of(client.post("/v1/models/digits-light:predict", json=body), status)


def test_an_input_the_model_cannot_take_is_refused_naming_it(client: FlaskClient):
    data_id = client.post("/v1/data", json={"instance": [1, 2, 3]}).get_json()["data_id"]
    assert data_id in error_of(client.post("/v1/models/digits-light:predict", json={"data_ids": [data_id]}), 400)
    image_id = put_image(client, 1)
    assert "single image input" in error_of(client.post("/v1/models/iris:predict", json={"data_ids": [image_id]}),
                                            400)


@pytest.mark.parametrize(("kwargs", "status"), [
    ({"data": b"not an image", "content_type": "image/png"}, 400),
    ({"json": {"b64": "***"}}, 400),
    ({"json": {"instance": 1, "extra": 2}}, 400),
    ({"json": {"instance": None}}, 400),
    ({"json": {}}, 400),
    ({"data": "x", "content_type": "text/plain"}, 415),
])
def test_storing_refusals(client: FlaskClient, kwargs: dict, status: int):
    error_of(client.post("/v1/data", **kwargs), status)


def test_lookups_of_unknown_or_malformed_ids(client: FlaskClient):
    error_of(client.get("/v1/data/" + "a" * 32), 404)
    error_of(client.get("/v1/data/..%2F..%2Fetc%2Fpasswd"), 404)
    error_of(client.post("/v1/data:warm", json={"model": "digits-light", "data_ids": ["f" * 32]}), 404)
    error_of(client.post("/v1/data:warm", json={"model": "nope", "data_ids": ["f" * 32]}), 404)
    error_of(client.post("/v1/data:warm", json={"model": "digits-light"}), 400)


def test_an_unreachable_database_answers_503(stored: redis.Redis):
    client = create_app({"TESTING": True, "database_url": "mysql+pymysql://root@127.0.0.1:1/test"}).test_client()
    assert "data store" in error_of(client.post("/v1/data", json={"instance": [1]}), 503)
    assert "data store" in error_of(client.post("/v1/models/digits-light:predict",
                                                json={"data_ids": ["a" * 32]}), 503)


def test_stored_content_is_kept_as_sent(client: FlaskClient, database_url: str):
    png = digit_png(DIGITS.data[9])
    data_id = client.post("/v1/data", data=png, content_type="image/png").get_json()["data_id"]
    engine = db.create_engine(database_url)
    with engine.connect() as connection:
        row = connection.execute(sa.select(db.data).where(db.data.c.id == data_id)).one()
    engine.dispose()
    assert (row.kind, row.content, row.size, row.content_type) == ("image", png, len(png), "image/png")
    assert np.frombuffer(row.content[:8], np.uint8).tolist() == list(b"\x89PNG\r\n\x1a\n")
