"""The prediction cache on the real Redis: hits, misses, versions, single flight, counters, Redis down."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
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
from tasks import cache as cache_module
from tasks.cache import STATS, Outcome
from webapp import close_app, create_app

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
    app.extensions["cache"].flush()  # stores are written behind the answer
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
    app.extensions["cache"].flush()
    other = create_app({"TESTING": True, "models_dir": repo, "reload_interval_s": 0.0, "redis_url": redis_url})
    shared = predict(other.test_client(), ROWS[:3])  # nothing kept in this process yet: from Redis
    assert shared.headers["X-Cache"] == "HIT" and shared.get_json() == first.get_json()
    for key in fresh.scan_iter("cache:digits-heavy:*"):
        fresh.delete(key)
    kept = predict(other.test_client(), ROWS[:3])  # kept in-process, with its Redis entry's remaining TTL
    assert kept.headers["X-Cache"] == "HIT" and kept.get_json() == first.get_json()
    (expires_at, _, _), = other.extensions["cache"].local.entries.values()
    assert 290 < expires_at - time.monotonic() <= 300
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


def test_how_a_miss_goes_to_redis_follows_the_model_s_cost_and_hit_rate(app: Flask, fresh: redis.Redis,
                                                                        monkeypatch: pytest.MonkeyPatch):
    events, original_predict, original_reply = [], models.predict, cache_module.Line.reply

    def predict_(version: models.ModelVersion, inputs: dict) -> dict:
        events.append("model")
        return original_predict(version, inputs)

    def reply(line: cache_module.Line):
        events.append("lookup reply")
        return original_reply(line)

    monkeypatch.setattr(cache_module.models, "predict", predict_)
    monkeypatch.setattr(cache_module.Line, "reply", reply)
    cache, version = app.extensions["cache"], app.extensions["registry"].get("digits-heavy")
    Lookup, rows = cache_module.Lookup, iter(ROWS)

    def miss() -> list[str]:
        events.clear()
        assert cache.predict(version, {"pixels": next(rows)[None]}).outcome == Outcome.MISS
        return list(events)

    assert miss() == ["lookup reply", "model"]  # cost not known yet: lookup first
    miss()  # the first run loaded the session: one more to know the cost
    assert cache.costs.lookup(version, 1) is not Lookup.FIRST  # a 1-row run costs far less than 80 lookups
    assert cache.costs.lookup(version, 100_000) is Lookup.FIRST  # that many rows would: single flight
    looked, sampled = [], []
    for name, into in (("_look", looked), ("_sample", sampled)):
        original = getattr(cache, name)
        monkeypatch.setattr(cache, name, lambda *args, _o=original, _i=into, **kw: _i.append(args) or _o(*args, **kw))
    ways = [miss() for _ in range(2 * cache_module.SAMPLE_EVERY)]  # lookups never hit: hardly ever looked up
    assert set(map(tuple, ways)) <= {("model",), ("model", "lookup reply")}  # never waiting for one first
    assert ways.count(["model"]) >= len(ways) - 1 and cache.costs.rarely_found(version)
    assert sampled and len(looked) + len(sampled) < len(ways) - cache_module.SAMPLE_EVERY  # others counted out
    round_trip, cache.costs.round_trip_s = cache.costs.round_trip_s, 1e-9  # as if the model cost many lookups:
    later = [miss() for _ in range(cache_module.SAMPLE_GAP_MAX)]  # judged again after the skipped ones, it is
    first = later.index(["lookup reply", "model"])  # looked up first all the same (single flight)
    assert all(w == ["model"] for w in later[:first])  # the ones before: still counted out, not looked up
    cache.costs.round_trip_s = round_trip
    misses = len(ways) + 2 + len(later)

    def stored() -> set[bytes]:
        cache.flush()
        return {k for k in fresh.scan_iter("cache:digits-heavy:*") if not k.endswith(b":lock")}

    # stored: the misses looked up, in both tiers; the samples, in Redis only; not those counted out
    assert len(stored()) == 2 + len(looked) + len(sampled) and len(cache.local.entries) == 2 + len(looked)
    assert not list(fresh.scan_iter("cache:digits-heavy:*:lock"))
    assert cache.stats()["digits-heavy"] == {"hits": 0, "misses": misses}
    cache.costs.count_out(version, 1, 3)  # three more counted out
    again = {"pixels": ROWS[:1]}  # the first miss's rows, repeated: not looked up while counted out
    outcomes = []
    for _ in range(6):
        outcomes.append(cache.predict(version, again).outcome)
        cache.writes.write()  # as the writer thread does a moment later: a sample's store written, its reply read
    assert outcomes == [Outcome.MISS] * 4 + [Outcome.HIT] * 2  # the sample after them found it: looked up since
    key = version.key
    cache.costs.found_rate[key] = cache.costs.hit_rate[key] = 0.2  # some found, some hit in Redis, and hits
    cache.costs.round_trip_s = 1.0  # would save less than a (slow) round trip: overlapped
    assert [miss() for _ in range(3)] == [["model", "lookup reply"]] * 3
    cache.costs.hit_rate[key], cache.costs.round_trip_s = 1.0, 1e-6  # all hit, saving more than a round trip
    assert miss() == ["lookup reply", "model"]


@pytest.mark.parametrize("measured", [False, True], ids=["cost-unknown", "measured-slow"])
def test_concurrent_identical_misses_run_the_model_once(app: Flask, monkeypatch: pytest.MonkeyPatch,
                                                        measured: bool):
    calls, original = [], models.predict

    def slow_predict(version: models.ModelVersion, inputs: dict) -> dict:
        calls.append(1)
        time.sleep(0.3)
        return original(version, inputs)

    monkeypatch.setattr(cache_module.models, "predict", slow_predict)
    cache, version = app.extensions["cache"], app.extensions["registry"].get("digits-heavy")
    if measured:  # the model is known to cost many lookups: still single flight
        cache.predict(version, {"pixels": ROWS[10:13]})
        assert cache.costs.lookup(version, 3) is cache_module.Lookup.FIRST
        calls.clear()
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


def test_the_in_process_copy_keeps_the_latest_entries_within_its_bytes():
    def one() -> dict:
        return {"y": np.zeros(1000, np.float32)}

    entry = 4000 + cache_module.Local.OVERHEAD + cache_module.Local.ARRAY_OVERHEAD
    local = cache_module.Local(max_bytes=3 * entry)
    kept = {key: one() for key in "abc"}
    for key, outputs in kept.items():
        local.put(key, outputs, 4000, ttl_ms=60_000)
    assert local.get("a") is kept["a"]  # now the most recently used
    local.put("d", one(), 4000, ttl_ms=60_000)
    assert [k for k in "abcd" if local.get(k) is not None] == ["a", "c", "d"]
    assert local.size == 3 * entry
    assert not kept["a"]["y"].flags.writeable  # shared by every hit: read-only
    local.put("e", one(), 4, ttl_ms=1)
    time.sleep(0.01)
    assert local.get("e") is None and "e" not in local.entries
    local.clear()
    assert (local.size, local.get("a")) == (0, None)
    local.put("big", one(), local.max_bytes, ttl_ms=60_000)  # larger than the whole copy: not kept
    assert local.get("big") is None and local.size == 0
    cache_module.Local(max_bytes=0).put("x", one(), 4000, 1000)
    assert cache_module.Local(max_bytes=0).get("x") is None


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


def test_replies_are_parsed_only_once_complete_and_errors_come_back_as_values():
    from tasks import resp

    reply = b"*3\r\n:1\r\n$5\r\nab\r\nc\r\n:-1\r\n+OK\r\n-OOM command not allowed\r\n$-1\r\n*-1\r\n"
    for cut in range(1, 24):
        with pytest.raises(resp.Incomplete):
            resp.parse(reply[:cut])
    value, at = resp.parse(reply)
    assert value == [1, b"ab\r\nc", -1] and at == 24
    ok, at = resp.parse(reply, at)
    error, at = resp.parse(reply, at)
    nil, at = resp.parse(reply, at)
    none, at = resp.parse(reply, at)
    assert (ok, nil, none, at) == (b"OK", None, None, len(reply))
    assert isinstance(error, redis.ResponseError) and "OOM" in str(error)
    assert resp.encode(("SET", "k", b"\x00v", "PX", 5)) == \
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n\x00v\r\n$2\r\nPX\r\n$1\r\n5\r\n"


def test_resp3_replies_come_back_as_the_nearest_python_values():
    from tasks import resp

    replies = [
        (b"_\r\n", None), (b"#t\r\n", True), (b"#f\r\n", False), (b",1.5\r\n", 1.5),
        (b"(12345678901234567890\r\n", 12345678901234567890), (b"=8\r\ntxt:a\r\nb\r\n", b"a\r\nb"),
        (b"%2\r\n+a\r\n:1\r\n+b\r\n_\r\n", {b"a": 1, b"b": None}), (b"~2\r\n:1\r\n:2\r\n", [1, 2]),
        (b"|1\r\n+ttl\r\n:3\r\n:7\r\n", 7),  # attributes annotate the reply after them
    ]
    for data, expected in replies:
        value, at = resp.parse(data)
        assert value == expected and at == len(data), data
        for cut in range(1, len(data)):
            with pytest.raises(resp.Incomplete):
                resp.parse(data[:cut])
    error, _ = resp.parse(b"!8\r\nERR a\r\nb\r\n")
    assert isinstance(error, redis.ResponseError) and str(error) == "ERR a\r\nb"
    push, _ = resp.parse(b">2\r\n+invalidate\r\n*1\r\n+k\r\n")
    assert isinstance(push, resp.Push) and push == [b"invalidate", [b"k"]]
    with pytest.raises(redis.InvalidResponse):
        resp.parse(b"?1\r\n")


def test_a_line_skips_the_replies_nobody_wanted(fresh: redis.Redis):
    from tasks import resp

    lines, others = resp.Lines(fresh), resp.Lines(fresh)
    line = lines.get()
    line.send(resp.encode(("SET", "cache:t", "1"), ("EVAL", "return redis.call('INCR', 'x', 'y')", 0),
                          ("GET", "cache:t")), [False, False, True])
    assert line.reply() == b"1"  # the failed script's error was read past (and logged), not returned
    assert not line.owed and others.get() is not line
    taken: list = []
    line.send(resp.encode(("SET", "cache:t", "2", "NX"), ("GET", "cache:nothing"), ("GET", "cache:t")),
              [taken.append, taken.append, True])
    assert line.reply() == b"1" and taken == [None, None]  # handed on the way: nil as RESP2 or RESP3 says it
    line.send(resp.encode(("INCR", "cache:t")), [taken.append])
    line.settle()
    assert taken[2] == 2 and not line.owed
    lines.close_all()
    others.close_all()
    assert line.connection._sock is None  # closed, not left for the garbage collector


def test_a_line_runs_a_script_redis_forgot_and_reports_redis_down_as_redis_py_does(fresh: redis.Redis):
    from tasks import resp

    script = fresh.register_script("return ARGV[1] .. KEYS[1]")
    fresh.script_flush()  # as on a Redis restarted since: the digest is unknown there
    lines = resp.Lines(fresh)
    assert lines.script(script, ["k"], ["v"]) == b"vk"
    assert lines.script(script, ["k"], ["w"]) == b"wk"  # by digest now
    with pytest.raises(redis.ResponseError):
        lines.call("INCR", "no", "such", "arity")
    lines.close_all()
    down = resp.Lines(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5))
    with pytest.raises(redis.ConnectionError):
        down.call("PING")


def test_a_line_that_gets_no_reply_in_time_raises_redis_py_s_timeout(redis_url: str):
    from tasks import resp

    lines = resp.Lines(redis.Redis.from_url(redis_url, socket_timeout=0.2))
    line = lines.get()
    line.send(resp.encode(("BLPOP", "cache:never-pushed", 5)), [True])  # Redis holds the reply back for 5 s
    with pytest.raises(redis.TimeoutError):
        line.reply()
    assert not line.owed  # the connection was dropped with what was owed on it
    line.send(resp.encode(("PING",)), [True])  # and the next call connects again
    assert line.reply() == b"PONG"
    lines.close_all()


def test_closing_the_cache_ends_its_writer_thread_before_its_lines_close(app: Flask, fresh: redis.Redis):
    cache = app.extensions["cache"]
    cache.writes.add(("SET", "cache:t:pending", "1"))  # the writer thread starts, and waits for more
    writer = cache.writes.writer
    assert writer is not None and writer.is_alive()
    cache.close()  # no thread is left using a line as it closes (a closed line under a writer broke it)
    assert not writer.is_alive() and cache.writes.writer is None and not cache.lines._lines
    cache.writes.add(("SET", "cache:t:late", "1"))  # a closed cache writes nothing more
    time.sleep(2 * cache_module.WRITE_DELAY_S)
    assert cache.writes.writer is None and not fresh.exists("cache:t:pending", "cache:t:late")


def test_stores_nobody_waits_for_are_written_together(app: Flask, fresh: redis.Redis,
                                                       monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cache_module, "WRITE_DELAY_S", 0.5)
    monkeypatch.setattr(cache_module, "WRITER_IDLE_S", 0.1)
    writes = app.extensions["cache"].writes

    def within(seconds: float, done: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def written(*keys: str, seconds: float = 3.0) -> bool:
        return within(seconds, lambda: fresh.exists(*keys) == len(keys))

    writes.add(("SET", "cache:t:late", "1"))
    assert not fresh.exists("cache:t:late")  # waiting for others
    assert written("cache:t:late")  # by the writer thread, with no other traffic
    batch = [f"cache:t:{n}" for n in range(cache_module.WRITE_BATCH)]
    for key in batch:
        writes.add(("SET", key, "1"))
    assert written(*batch, seconds=0.25)  # a full batch goes at once, not after the delay
    writes.add(("SET", "cache:t:before", "1"))
    writes.add(("SET", "cache:t:now", "1"), now=True)  # e.g. a lock released: someone may wait for it
    assert written("cache:t:before", "cache:t:now", seconds=0.25)  # at once, with those waiting
    assert within(5.0, lambda: writes.writer is None)  # the thread ends once there is nothing to write
    writes.add(("SET", "cache:t:again", "1"))
    app.extensions["cache"].flush()  # written now, and run by Redis before flush returns
    assert fresh.exists("cache:t:again")
    taken: list = []
    writes.add(("SET", "cache:t:again", "2", "NX"), ("SET", "cache:t:new", "2", "NX"),
               taker=lambda reply: taken.append((threading.current_thread().name, reply)))
    assert within(0.25, lambda: len(taken) == 2)  # at once, not after the delay, each reply to its taker
    assert taken == [("cache-writes", None), ("cache-writes", b"OK")]


def test_lookups_name_the_script_by_its_digest_and_send_it_again_once_redis_has_lost_it(
        app: Flask, fresh: redis.Redis, monkeypatch: pytest.MonkeyPatch):
    sent, original = [], cache_module.Line.send

    def send(line: cache_module.Line, payload: bytes, wanted: list) -> None:
        sent.extend(name for name in (b"EVALSHA", b"EVAL") if b"\r\n%s\r\n" % name in payload)
        original(line, payload, wanted)

    monkeypatch.setattr(cache_module.Line, "send", send)
    cache, version = app.extensions["cache"], app.extensions["registry"].get("digits-heavy")
    computed = cache.predict(version, {"pixels": ROWS[:1]})
    cache.flush()

    def from_redis() -> cache_module.Answer:
        cache.local.clear()  # as in a process that never answered it
        cache.costs.round_trip_s = None  # not known to be cheap: looked up before the model runs, whatever the timing
        return cache.predict(version, {"pixels": ROWS[:1]})

    assert from_redis().outcome == Outcome.HIT and sent == [b"EVAL", b"EVALSHA"]  # the text once, then its digest
    fresh.script_flush()  # as after a restart of Redis
    lost = from_redis()  # Redis refuses the digest: answered by the model, counted, uncached
    assert lost.outcome == Outcome.MISS and np.array_equal(lost.outputs["probabilities"],
                                                          computed.outputs["probabilities"])
    assert from_redis().outcome == Outcome.HIT and sent[2:] == [b"EVALSHA", b"EVAL"]  # the text again
    assert from_redis().outcome == Outcome.HIT and sent[4:] == [b"EVALSHA"]
    assert cache.stats()["digits-heavy"] == {"hits": 3, "misses": 2}


def test_samples_grow_apart_while_nothing_is_found():
    from types import SimpleNamespace

    costs, version = cache_module.Costs(), SimpleNamespace(key="m:1:f")
    costs.round_trip_s, costs.found_rate[version.key] = 0.1e-3, 0.0  # rarely found
    costs.ran(version, 0.2e-3, rows=1)  # cheap
    key, every, most, second = (version.key, cache_module._bucket(1)), cache_module.SAMPLE_EVERY, \
        cache_module.SAMPLE_GAP_MAX, cache_module.SAMPLE_GAP_S

    def gap_after_sample(new_for_s: float = 0.0, last_sample_s_ago: float = 1e-3) -> int:
        if new_for_s:
            costs.new_since[version.key] = time.monotonic() - new_for_s
        if key in costs.gaps:
            costs.gaps[key] = costs.gaps[key][0], time.monotonic() - last_sample_s_ago
        costs.skip_next(version, 1)
        counted = 0
        while costs.skipping(version, 1):
            counted += 1
        return counted + 1  # the counted out and the next sample

    assert [gap_after_sample() for _ in range(3)] == [every] * 3  # nothing found for a moment: the first gap
    assert gap_after_sample(new_for_s=1.5 * second) == 2 * every  # for over a second: twice as many
    assert gap_after_sample(new_for_s=3.5 * second) == 8 * every
    assert gap_after_sample(new_for_s=1000 * second) == most  # no wider than the most
    assert gap_after_sample(last_sample_s_ago=10 * second) == most // 10  # that many came in 10 s: slower
    assert gap_after_sample(last_sample_s_ago=1000 * second) == every  # a quiet server: still the first gap
    costs.new_since[version.key] -= 1000 * second
    costs.found(version, True)  # a request found (still rarely, on the whole): the first gap again
    costs.found_rate[version.key] = 0.0
    assert gap_after_sample() == every
    costs.found_rate[version.key] = 1.0  # found often: no more counted out
    costs.skip_next(version, 1)
    assert not costs.skipping(version, 1)


def test_a_stale_round_trip_is_measured_again_by_a_sampled_lookup():
    from types import SimpleNamespace

    costs, version, Lookup = cache_module.Costs(), SimpleNamespace(key="m:1:f"), cache_module.Lookup
    costs.ran(version, 0.3e-3, rows=1)
    costs.looked_up(version, 5e-3, hit=True)  # one slow reply (a pause): lookups seem to cost more than a run
    costs.hit_rate[version.key] = 1.0  # and they all hit
    assert costs.lookup(version, 1) is Lookup.OVERLAP and costs.lookup(version, 1, sampled=True) is Lookup.OVERLAP
    costs.round_trip_at -= 2 * cache_module.ROUND_TRIP_STALE_S  # no round trip measured since, a while later
    assert costs.lookup(version, 1) is Lookup.OVERLAP  # an ordinary lookup still overlaps
    assert costs.lookup(version, 1, sampled=True) is Lookup.FIRST  # a sampled one waits, and measures one
    costs.looked_up(version, 0.05e-3, hit=True)
    assert costs.lookup(version, 1) is Lookup.FIRST  # a hit now saves more than its wait


def test_run_costs_are_learnt_per_batch_size():
    from types import SimpleNamespace

    costs, version, Lookup = cache_module.Costs(), SimpleNamespace(key="m:1:f"), cache_module.Lookup
    costs.round_trip_s = 0.1e-3
    costs.ran(version, 0.5e-3, rows=1)  # a row alone: 0.5 ms
    costs.ran(version, 10e-3, rows=500)  # in a batch of 500: 20 us a row
    costs.hit_rate[version.key] = 1.0
    assert costs.lookup(version, 1) is Lookup.FIRST  # a hit saves 0.5 ms, more than a round trip
    assert costs.lookup(version, 500) is Lookup.FIRST  # 10 ms: over 80 round trips, single flight
    costs.hit_rate[version.key] = 0.1
    assert costs.lookup(version, 1) is Lookup.OVERLAP  # saves 0.05 ms on average: not worth the wait
    assert costs.lookup(version, 300) is Lookup.FIRST  # priced as the 500-row batches: 6 ms
    assert costs.lookup(version, 50) is Lookup.FIRST  # never measured at that size
