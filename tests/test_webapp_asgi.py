"""The ASGI bridge gunicorn serves: inference inline, other routes on threads, limits, headers."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import threading
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
    start, body = sent
    return start["status"], dict(start["headers"]), body["body"]


@pytest.fixture(scope="module")
def bridge():
    app = create_asgi_app({"TESTING": True, "max_request_bytes": 4096})
    yield app
    app.pool.shutdown()


def test_inference_route_answers_like_the_flask_client(bridge, client):
    body = orjson.dumps(IRIS)
    status, headers, content = call(bridge, "POST", "/v1/models/iris:predict", [body[:10], body[10:]],
                                    [(b"content-type", b"application/json")])
    assert status == 200
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(content)
    assert orjson.loads(content) == client.post("/v1/models/iris:predict", json=IRIS).get_json()


def test_inference_runs_on_the_loop_and_other_routes_on_the_pool(bridge, monkeypatch):
    seen: dict[str, str] = {}
    respond, flask_call = bridge.dataplane.respond, bridge.flask.wsgi_app

    def spy_respond(*args):
        seen["respond"] = threading.current_thread().name
        return respond(*args)

    def spy_flask(*args):
        seen["flask"] = threading.current_thread().name
        return flask_call(*args)

    monkeypatch.setattr(bridge.dataplane, "respond", spy_respond)
    monkeypatch.setattr(bridge.flask, "wsgi_app", spy_flask)
    assert call(bridge, "POST", "/v2/models/iris/infer", [b"{}"])[0] == 400
    assert call(bridge, "GET", "/v1/models", [b""])[0] == 200
    assert seen["respond"] == threading.main_thread().name
    assert seen["flask"].startswith("wsgi")


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


def test_the_lifespan_shutdown_closes_the_stores_redis_lines(redis_url: str):
    eager = {"task_always_eager": True, "task_eager_propagates": True}
    bridge = create_asgi_app({"TESTING": True, "redis_url": redis_url, "celery": eager})
    stores = bridge.flask.extensions
    assert call(bridge, "POST", "/v1/models/iris:submit", [orjson.dumps(IRIS)])[0] == 202
    opened = list(stores["jobs"]._lines._lines)  # the pool thread's, which created the job
    assert opened and all(line.connection._sock is not None for line in opened)
    opened.append(stores["cache"].lines.get())
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(bridge({"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert all(line.connection._sock is None for line in opened)
    assert not stores["jobs"]._lines._lines and not stores["cache"].lines._lines
