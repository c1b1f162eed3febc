"""The prediction cache on the real Redis: hits, misses, versions, single flight, counters, Redis down."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient
from sklearn.datasets import load_digits

import models
from models.config import PACKAGE_DIR
from samples import error_of
from webapp import cache as cache_module
from webapp import close_app, create_app
from webapp.cache import STATS, Outcome

ROWS = load_digits().data.astype(np.float32)


@pytest.fixture
def fresh(redis_url: str) -> Iterator[redis.Redis]:
    """The test Redis with no cached predictions and no counts."""
    client = redis.Redis.from_url(redis_url)
    client.script_flush()  # as on a Redis just started: no script of ours is loaded there yet
    for key in client.scan_iter("cache:*"):
        client.delete(key)
    yield client
    client.close()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A scratch repository holding copies of digits-heavy (cached) and iris (not cached)."""
    for name in ("digits-heavy", "iris"):
        shutil.copytree(PACKAGE_DIR / name, tmp_path / name)
    return tmp_path


@pytest.fixture
def app(repo: Path, fresh: redis.Redis, redis_url: str) -> Iterator[Flask]:
    app = create_app({"TESTING": True, "models_dir": repo, "reload_interval_s": 0.0, "redis_url": redis_url})
    yield app
    app.extensions["cache"].flush()  # no count of this test reaches Redis during the next one
    close_app(app)


def predict(client: FlaskClient, rows: np.ndarray, path: str = "/v1/models/digits-heavy:predict"):
    response = client.post(path, json={"instances": rows.tolist()})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response


def test_the_second_identical_prediction_is_a_hit_with_the_same_answer(app: Flask):
    client = app.test_client()
    first, second = predict(client, ROWS[:5]), predict(client, ROWS[:5])
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.get_json() == second.get_json()
    assert [p["label"] for p in second.get_json()["predictions"]] == list(load_digits().target[:5])
    assert predict(client, ROWS[5:10]).headers["X-Cache"] == "MISS"
    columnar = client.post("/v1/models/digits-heavy:predict", json={"inputs": ROWS[:5].tolist()})
    assert columnar.headers["X-Cache"] == "HIT"  # same tensors, other wire format
    assert columnar.get_json()["outputs"]["label"] == [p["label"] for p in first.get_json()["predictions"]]


def test_v2_shares_the_cache_and_keeps_its_own_answer_shape(app: Flask):
    client = app.test_client()
    predict(client, ROWS[:3])
    body = {"inputs": [{"name": "pixels", "shape": [3, 64], "datatype": "FP32", "data": ROWS[:3].ravel().tolist()}],
            "outputs": [{"name": "label"}]}
    answer = client.post("/v2/models/digits-heavy/infer", json=body)
    assert answer.headers["X-Cache"] == "HIT"
    assert [o["name"] for o in answer.get_json()["outputs"]] == ["label"]


def test_a_model_without_a_cache_ttl_is_never_cached(app: Flask, fresh: redis.Redis):
    client = app.test_client()
    for _ in range(2):
        response = client.post("/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
        assert response.status_code == 200 and "X-Cache" not in response.headers
    assert not list(fresh.scan_iter("cache:iris:*"))


def test_entries_expire_after_the_spec_s_ttl(app: Flask, fresh: redis.Redis):
    predict(app.test_client(), ROWS[:2])
    (key,) = [k for k in fresh.scan_iter("cache:digits-heavy:*") if not k.endswith(b":lock")]
    assert 0 < fresh.pttl(key) <= 300_000


def test_a_new_version_never_serves_the_old_one_s_answers(app: Flask, repo: Path):
    client = app.test_client()
    predict(client, ROWS[:4])
    shutil.copytree(repo / "digits-heavy" / "1", repo / "digits-heavy" / "2")
    assert predict(client, ROWS[:4]).headers["X-Cache"] == "MISS"  # the default is now version 2
    assert predict(client, ROWS[:4], "/v1/models/digits-heavy/versions/1:predict").headers["X-Cache"] == "HIT"
    assert predict(client, ROWS[:4]).headers["X-Cache"] == "HIT"


def test_an_artefact_replaced_in_place_never_serves_the_old_answers(app: Flask, repo: Path):
    client = app.test_client()
    predict(client, ROWS[:4])
    artefact = repo / "digits-heavy" / "1" / "model.onnx"
    data = artefact.read_bytes()
    artefact.unlink()
    artefact.write_bytes(data)  # same bytes, a new file: what a redeploy of version 1 looks like
    assert predict(client, ROWS[:4]).headers["X-Cache"] == "MISS"


def test_hits_and_misses_are_counted(app: Flask):
    client = app.test_client()
    for rows in (ROWS[:2], ROWS[:2], ROWS[:2], ROWS[2:4]):
        predict(client, rows)
    stats = client.get("/v1/cache").get_json()
    assert stats["enabled"] is True
    assert stats["models"]["digits-heavy"] == {"ttl_s": 300.0, "hits": 2, "misses": 2}
    assert "iris" not in stats["models"]


def test_another_process_hits_the_shared_entry_and_repeats_are_answered_in_process(app: Flask, repo: Path,
                                                                                    redis_url: str,
                                                                                    fresh: redis.Redis):
    first = predict(app.test_client(), ROWS[:3])
    other = create_app({"TESTING": True, "models_dir": repo, "reload_interval_s": 0.0, "redis_url": redis_url})
    shared = predict(other.test_client(), ROWS[:3])  # nothing kept in this process yet: from Redis
    assert shared.headers["X-Cache"] == "HIT" and shared.get_json() == first.get_json()
    for key in fresh.scan_iter("cache:digits-heavy:*"):
        fresh.delete(key)
    kept = predict(other.test_client(), ROWS[:3])  # kept in-process, with its Redis entry's remaining TTL
    assert kept.headers["X-Cache"] == "HIT" and kept.get_json() == first.get_json()
    (entry,) = other.extensions["cache"].local.values()
    assert 290 < entry.expires - time.monotonic() <= 300
    other.extensions["cache"].flush()
    other.extensions["cache"].close()


def test_hits_answered_in_process_reach_the_shared_counts_with_later_traffic(app: Flask, repo: Path,
                                                                             redis_url: str,
                                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cache_module, "COUNT_EVERY_S", 0.05)
    client = app.test_client()
    other = create_app({"TESTING": True, "models_dir": repo, "reload_interval_s": 0.0, "redis_url": redis_url})
    for _ in range(3):
        predict(client, ROWS[:2])  # a miss, then two hits answered in-process
    assert other.extensions["cache"].stats()["digits-heavy"]["hits"] <= 2
    time.sleep(0.06)
    predict(client, ROWS[:2])  # past COUNT_EVERY_S: this hit sends the counts on its own
    assert other.extensions["cache"].stats()["digits-heavy"] == {"hits": 3, "misses": 1}
    other.extensions["cache"].close()


def test_concurrent_identical_misses_run_the_model_once(app: Flask, monkeypatch: pytest.MonkeyPatch):
    calls, original = [], models.predict

    def slow_predict(version: models.ModelVersion, inputs: dict) -> dict:
        calls.append(1)
        time.sleep(0.3)
        return original(version, inputs)

    monkeypatch.setattr(cache_module.models, "predict", slow_predict)
    cache, version = app.extensions["cache"], app.extensions["registry"].get("digits-heavy")
    answers: list = []
    threads = [threading.Thread(target=lambda: answers.append(cache.predict(version, {"pixels": ROWS[:3]})))
               for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert sorted(a.outcome for a in answers) == [Outcome.HIT] * 5 + [Outcome.MISS]
    assert all(np.array_equal(a.outputs["label"], answers[0].outputs["label"]) for a in answers)


def test_with_redis_down_predictions_are_served_uncached(repo: Path):
    app = create_app({"TESTING": True, "models_dir": repo, "redis_url": "redis://127.0.0.1:1/0"})
    client = app.test_client()
    for _ in range(2):
        response = predict(client, ROWS[:2])
        assert response.headers["X-Cache"] == "MISS"
    assert app.extensions["cache"].breaker.open  # Redis is left alone for a while
    assert "unreachable" in error_of(client.get("/v1/cache"), 503)


def test_the_cache_can_be_turned_off(repo: Path, fresh: redis.Redis, redis_url: str):
    app = create_app({"TESTING": True, "models_dir": repo, "redis_url": redis_url, "prediction_cache": False})
    client = app.test_client()
    assert "X-Cache" not in predict(client, ROWS[:2]).headers
    assert client.get("/v1/cache").get_json()["enabled"] is False
    assert not fresh.exists(STATS)


@pytest.mark.integration
def test_both_caches_through_the_real_web_process(live_server: str, fresh: redis.Redis):
    import requests

    from samples import digit_png

    rows = ROWS[:20].tolist()
    first, second = (requests.post(f"{live_server}/v1/models/digits-heavy:predict", json={"instances": rows},
                                   timeout=10) for _ in range(2))
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert first.json() == second.json()
    stored = requests.post(f"{live_server}/v1/data", data=digit_png(ROWS[4]), timeout=10,
                           headers={"Content-Type": "image/png"})
    assert stored.status_code == 201, stored.text
    by_id = requests.post(f"{live_server}/v1/models/digits-heavy:predict", timeout=10,
                          json={"data_ids": [stored.json()["data_id"]]})
    assert by_id.status_code == 200 and by_id.json()["predictions"][0]["label"] == 4
    assert list(fresh.scan_iter("data:digits-heavy:*"))




def test_a_model_that_raises_releases_the_lock_and_nobody_waits_for_it(app: Flask, fresh: redis.Redis,
                                                                       monkeypatch: pytest.MonkeyPatch):
    client = app.test_client()
    rows = [*ROWS[:999].tolist(), [float("nan")] * 64]  # valid rows, then one the model refuses
    body = {"instances": rows}
    started = time.monotonic()
    for _ in range(3):
        refused = client.post("/v1/models/digits-heavy:predict", json=body)
        assert refused.status_code == 400, refused.get_data(as_text=True)
    assert not list(fresh.scan_iter("cache:digits-heavy:*:lock"))  # released each time
    assert time.monotonic() - started < cache_module.WAIT_S  # none of them waited for another's answer
    waits: list[str] = []
    monkeypatch.setattr(cache_module.PredictionCache, "_wait", lambda self, key: waits.append(key))
    assert client.post("/v1/models/digits-heavy:predict", json=body).status_code == 400
    assert not waits


def test_a_waiter_runs_the_model_itself_when_the_holder_fails(app: Flask, fresh: redis.Redis,
                                                              monkeypatch: pytest.MonkeyPatch):
    cache, version = app.extensions["cache"], app.extensions["registry"].get("digits-heavy")
    original, entered = models.predict, threading.Event()

    def failing(version_: models.ModelVersion, inputs: dict) -> dict:
        if threading.current_thread().name == "holder":
            entered.set()
            time.sleep(0.2)
            raise RuntimeError("the holder's run failed")
        return original(version_, inputs)

    monkeypatch.setattr(cache_module.models, "predict", failing)
    errors: list[Exception] = []

    def hold() -> None:
        try:
            cache.predict(version, {"pixels": ROWS[:2]})
        except RuntimeError as exc:
            errors.append(exc)

    holder = threading.Thread(target=hold, name="holder")
    holder.start()
    entered.wait(5)
    waited = cache.predict(version, {"pixels": ROWS[:2]})  # waits, then finds the lock gone and no answer
    holder.join()
    assert errors and waited.outcome == Outcome.MISS
    assert list(waited.outputs["label"]) == list(load_digits().target[:2])


def test_lookups_go_on_after_redis_forgets_the_scripts(app: Flask, fresh: redis.Redis):
    client = app.test_client()
    predict(client, ROWS[:1])
    fresh.script_flush()  # as after a restart of Redis
    app.extensions["cache"].clear_local()
    assert predict(client, ROWS[:1]).headers["X-Cache"] == "HIT"
    assert predict(client, ROWS[1:2]).headers["X-Cache"] == "MISS"
    assert app.extensions["cache"].stats()["digits-heavy"] == {"hits": 1, "misses": 2}


def test_the_in_process_copy_keeps_the_latest_entries_within_its_bytes(app: Flask, fresh: redis.Redis,
                                                                       redis_url: str):
    version = app.extensions["registry"].get("digits-heavy")
    one_entry = len(fresh.get(next(iter(_stored(app, fresh, version)))))
    small = cache_module.PredictionCache(redis.Redis.from_url(redis_url), local_bytes=3 * one_entry)
    for i in range(4):
        small.predict(version, {"pixels": ROWS[i:i + 1]})
    assert len(small.local) == 3 and small.local.currsize <= 3 * one_entry
    none = cache_module.PredictionCache(redis.Redis.from_url(redis_url), local_bytes=0)
    none.predict(version, {"pixels": ROWS[:1]})
    assert len(none.local) == 0
    for cache in (small, none):
        cache.close()


def _stored(app: Flask, fresh: redis.Redis, version: models.ModelVersion) -> list[bytes]:
    app.extensions["cache"].predict(version, {"pixels": ROWS[20:21]})
    return [k for k in fresh.scan_iter("cache:digits-heavy:*") if not k.endswith(b":lock")]


def test_no_caller_can_change_what_the_next_hit_gets(app: Flask):
    cache, version = app.extensions["cache"], app.extensions["registry"].get("digits-heavy")
    computed = cache.predict(version, {"pixels": ROWS[:2]})
    first = cache.predict(version, {"pixels": ROWS[:2]})
    assert first.outcome == Outcome.HIT
    assert set(first.outputs) == set(computed.outputs) == {"label", "probabilities", "label_name"}
    with pytest.raises(ValueError, match="read-only"):
        first.outputs["probabilities"][0, 0] = 1.0  # the arrays every hit shares
    with pytest.raises(ValueError, match="read-only"):
        first.outputs["label_name"][0] = b"changed"  # derived ones too
    first.outputs["label"] = np.array([7, 7])  # each hit's own dictionary
    second = cache.predict(version, {"pixels": ROWS[:2]})
    assert all(np.array_equal(second.outputs[name], computed.outputs[name]) for name in computed.outputs)
