"""The ASGI router gunicorn serves: cheap inference on the loop, the rest on threads, limits, headers."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import threading
import time
from urllib.parse import urlsplit

import orjson
import pytest
import requests

from webapp.asgi import create_asgi_app

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}


def call(app, method: str, path: str, chunks: list[bytes], headers: list[tuple[bytes, bytes]] = (),
         query: bytes = b"") -> tuple[int, dict[bytes, bytes], bytes]:
    """Drive one HTTP request through the ASGI app; answer status, headers and body."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "query_string": query, "headers": list(headers),
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5)}
    asyncio.run(app(scope, receive, send))
    start, *bodies = sent
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in bodies)


@pytest.fixture(scope="module")
def bridge():
    app = create_asgi_app({"TESTING": True, "max_request_bytes": 4096})
    yield app
    app.pool.shutdown()
    app.wsgi.executor.shutdown()


def test_inference_route_answers_like_the_flask_client(bridge, client):
    body = orjson.dumps(IRIS)
    status, headers, content = call(bridge, "POST", "/v1/models/iris:predict", [body[:10], body[10:]],
                                    [(b"content-type", b"application/json")])
    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(content)
    assert orjson.loads(content) == client.post("/v1/models/iris:predict", json=IRIS).get_json()


def test_cheap_inference_runs_on_the_loop_and_the_rest_on_threads(bridge, monkeypatch):
    seen: dict[str, str] = {}
    respond, flask_call = bridge.dataplane.respond, bridge.flask.wsgi_app

    def spy_respond(route, call, identity=None):
        seen[route.name] = threading.current_thread().name
        return respond(route, call, identity)

    def spy_flask(*args):
        seen["flask"] = threading.current_thread().name
        return flask_call(*args)

    monkeypatch.setattr(bridge.dataplane, "respond", spy_respond)
    monkeypatch.setattr(bridge.flask, "wsgi_app", spy_flask)
    assert call(bridge, "POST", "/v2/models/iris/infer", [b"{}"])[0] == 400
    assert call(bridge, "GET", "/v1/models", [b""])[0] == 200
    digit = {"instances": [[0.0] * 64]}
    for model in ("digits-light", "digits-heavy"):  # takes images; cached: either may wait on I/O or decoding
        assert call(bridge, "POST", f"/v1/models/{model}:predict", [orjson.dumps(digit)])[0] == 200
    assert seen["iris"] == threading.main_thread().name
    assert seen["digits-light"].startswith("infer") and seen["digits-heavy"].startswith("infer")
    assert seen["flask"] != threading.main_thread().name


def test_body_over_the_limit_is_refused_with_json_413(bridge):
    status, _, content = call(bridge, "POST", "/v1/models/iris:predict", [b"x" * 3000, b"x" * 3000])
    assert status == 413
    assert "4096" in orjson.loads(content)["error"]


def test_compressed_body_and_query_string_and_head(bridge):
    body = gzip.compress(orjson.dumps(IRIS))
    status, _, content = call(bridge, "POST", "/v1/models/iris:predict", [body],
                              [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")])
    assert status == 200 and len(orjson.loads(content)["predictions"]) == 2
    status, _, content = call(bridge, "GET", "/v1/models", [b""], query=b"unused=1")
    assert status == 200 and "iris" in content.decode()
    status, headers, content = call(bridge, "HEAD", "/v2/health/live", [b""])
    assert status == 200 and content == b"" and int(headers[b"content-length"]) > 0


def test_wrong_method_on_an_inference_route_is_405_with_allow(bridge):
    status, headers, content = call(bridge, "GET", "/v1/models/iris:predict", [b""])
    assert status == 405 and headers[b"allow"] == b"POST"
    assert "POST" in orjson.loads(content)["error"]


def test_chunked_request_body_through_real_gunicorn(live_server):
    def chunks():
        data = orjson.dumps(IRIS)
        yield data[:7]
        yield data[7:]

    answer = requests.post(f"{live_server}/v1/models/iris:predict", data=chunks(),
                           headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 200
    assert [p["label_name"] for p in answer.json()["predictions"]] == ["setosa", "virginica"]


def test_keep_alive_connection_serves_many_requests(live_server):
    url = urlsplit(live_server)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    body = orjson.dumps(IRIS)
    for path in ("/v1/models/iris:predict", "/v1/models/iris", "/v1/models/iris:predict"):
        method = "POST" if path.endswith(":predict") else "GET"
        connection.request(method, path, body if method == "POST" else None, {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert orjson.loads(response.read())
    connection.close()


def test_the_lifespan_shutdown_closes_the_stores_redis_connections(redis_url: str):
    import redis

    bridge = create_asgi_app({"TESTING": True, "redis_url": redis_url})
    watcher = redis.Redis.from_url(redis_url)
    watcher.client_setname("watcher")

    db = watcher.get_connection_kwargs()["db"]

    def connected() -> set[str]:
        return {c["id"] for c in watcher.client_list() if c["name"] != "watcher" and int(c["db"]) == db}

    before = connected()
    assert call(bridge, "GET", "/v1/jobs/8a3b9f0e-6c1d-4e2a-9b7f-0d5e4c3b2a19", [b""])[0] == 404  # the job store's
    digit = orjson.dumps({"instances": [[1.0] * 64]})
    assert call(bridge, "POST", "/v1/models/digits-heavy:predict", [digit])[0] == 200  # the cache's
    opened = connected() - before
    assert opened
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(bridge({"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    deadline = time.monotonic() + 5  # Redis sees a closed connection go a moment later
    while opened & connected() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not opened & connected()
    watcher.close()
