"""The web worker class (deploy/worker.py) under real gunicorn: request-head limits, keep-alive, pipelining,
inference requests answered by the protocol itself."""

from __future__ import annotations

import contextlib
import socket
from urllib.parse import urlsplit

import orjson
import pytest

pytestmark = pytest.mark.integration

LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n"


@pytest.fixture(scope="module")
def bridge():
    from webapp.asgi import create_asgi_app

    app = create_asgi_app({"TESTING": True})
    yield app
    app.pool.shutdown()


def exchange(url: str, request: bytes) -> bytes:
    """Send `request` on a new connection and read until the server closes it."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused while still sending
            conn.sendall(request)
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def refusal(answer: bytes) -> tuple[int, str]:
    """The status and JSON error message of a refused request; the server closes after it."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return int(head.split(b" ", 2)[1]), orjson.loads(body)["error"]


def test_a_header_field_over_the_size_limit_is_refused_with_431(live_server: str) -> None:
    status, error = refusal(exchange(live_server, LIVE + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n"))
    assert status == 431 and "'x-big'" in error and "8190" in error


def test_more_header_fields_than_the_limit_are_refused_with_431(live_server: str) -> None:
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    status, error = refusal(exchange(live_server, LIVE + fields + b"\r\n"))
    assert status == 431 and "100 header fields" in error


def test_a_request_target_over_the_line_limit_is_refused_with_414(live_server: str) -> None:
    status, error = refusal(exchange(live_server, b"GET /v2/health/live?q=" + b"a" * 5000 + b" HTTP/1.1\r\n"
                                                  b"Host: test\r\n\r\n"))
    assert status == 414 and "4094" in error


def test_a_head_that_never_ends_is_cut_off_and_the_worker_serves_on(live_server: str) -> None:
    answer = exchange(live_server, LIVE + b"X-Endless: " + b"a" * 2_000_000)
    assert b" 200 " not in answer.split(b"\r\n", 1)[0]
    assert exchange(live_server, LIVE + b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 200 ")


def test_heads_within_the_limits_are_served_on_one_connection_past_the_whole_head_bound(
        live_server: str) -> None:
    # 150 pipelined requests with 6 kB fields: 900 kB of heads on one connection, over the bound of a single
    # head (line + 100 fields of 8190 bytes, about 823 kB), so the count starts afresh with each request
    one = LIVE + b"X-Padding: " + b"a" * 6000 + b"\r\n\r\n"
    answer = exchange(live_server, one * 149 + LIVE + b"X-Padding: a\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200 ") == 150 and answer.count(b'{"live":true}') == 150


IRIS = b'{"instances": [[5.1, 3.5, 1.4, 0.2]]}'
V2 = b'{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}'


def post(path: bytes, body: bytes, *headers: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (path, len(body), b"".join(h + b"\r\n" for h in headers), body))


def answers(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The responses in `raw`, in order: status, headers (names in lower case), body (by content-length)."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if status == 100:
            found.append((status, headers, b""))
            raw = rest
            continue
        size = int(headers[b"content-length"])
        found.append((status, headers, rest[:size]))
        raw = rest[size:]
    return found


def test_inference_requests_are_answered_in_order_among_others_on_one_connection(live_server: str) -> None:
    # pipelined in one write: inference routes, answered by the protocol itself, and routes of the Flask app,
    # answered on its threads, whose answers must not be overtaken
    requests = [post(b"/v1/models/iris:predict", IRIS), LIVE + b"\r\n", post(b"/v2/models/iris/infer", V2),
                b"GET /v1/models HTTP/1.1\r\nHost: test\r\n\r\n", post(b"/v2/models/iris/infer", V2),
                post(b"/v1/models/iris:predict", b"{", b"Connection: close")]
    got = answers(exchange(live_server, b"".join(requests)))
    assert [status for status, _, _ in got] == [200, 200, 200, 200, 200, 400]
    assert orjson.loads(got[0][2])["predictions"][0]["label_name"] == "setosa"
    assert got[1][2] == b'{"live":true}' and "iris" in {m["name"] for m in orjson.loads(got[3][2])["models"]}
    assert orjson.loads(got[2][2])["outputs"][2]["data"] == ["setosa"] and got[2][2] == got[4][2]
    assert "error" in orjson.loads(got[5][2]) and got[5][1][b"connection"] == b"close"
    assert all(h[b"server"] and h[b"date"] and h[b"content-type"] == b"application/json" for _, h, _ in got)


def test_an_inference_request_is_answered_as_http_1_0_expect_and_the_body_limit_require(live_server: str) -> None:
    old = post(b"/v1/models/iris:predict", IRIS).replace(b"HTTP/1.1", b"HTTP/1.0")
    (status, headers, body), = answers(exchange(live_server, old))  # and the server closed the connection
    assert status == 200 and headers[b"connection"] == b"close" and b"setosa" in body
    waiting = post(b"/v1/models/iris:predict", IRIS, b"Expect: 100-continue", b"Connection: close")
    assert [s for s, _, _ in answers(exchange(live_server, waiting))] == [100, 200]
    big = post(b"/v2/models/iris/infer", b"[" + b"0," * 17_000_000 + b"0]")  # over the 32 MiB default
    got = answers(exchange(live_server, big + post(b"/v2/models/iris/infer", V2, b"Connection: close")))
    assert [s for s, _, _ in got] == [413, 200] and "limit" in orjson.loads(got[0][2])["error"]


def test_many_pipelined_inference_requests_are_all_answered_in_order(live_server: str) -> None:
    requests = [post(b"/v2/models/iris/infer", V2 if n % 2 else IRIS) for n in range(1999)]
    got = answers(exchange(live_server, b"".join(requests) + post(b"/v2/models/iris/infer", V2, b"Connection: close")))
    assert len(got) == 2000 and [status for status, _, _ in got[:4]] == [400, 200, 400, 200]  # an iris row is no V2
    assert {status for status, _, _ in got[1::2]} == {200} and {status for status, _, _ in got[::2][:-1]} == {400}


def test_the_protocol_stops_reading_while_its_answers_wait_unread(bridge) -> None:
    import asyncio

    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from deploy.worker import DataPlaneProtocol, Limits

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.written, self.reading, self.closed = [], True, False

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def pause_reading(self) -> None:
            self.reading = False

        def resume_reading(self) -> None:
            self.reading = True

        def is_closing(self) -> bool:
            return self.closed

        def close(self) -> None:
            self.closed = True

        def get_extra_info(self, name: str, default: object = None) -> object:
            return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

    config = Config(app=bridge, http="httptools", loop="asyncio", log_config=None)
    config.load()
    loop = asyncio.new_event_loop()
    try:
        protocol = DataPlaneProtocol(config=config, server_state=ServerState(), app_state={}, _loop=loop,
                                     limits=Limits(4094, 100, 8190))
        transport = Transport()
        protocol.connection_made(transport)
        protocol.data_received(post(b"/v2/models/iris/infer", V2) * 2)
        assert len(transport.written) == 2 and transport.reading  # answered as they came, by the protocol
        protocol.pause_writing()  # the transport's buffer is full: the client does not read
        protocol.data_received(post(b"/v2/models/iris/infer", V2))
        assert len(transport.written) == 3 and not transport.reading  # this one answered, then no more read
        protocol.resume_writing()
        assert transport.reading and b'"setosa"' in transport.written[-1]
        protocol.data_received(post(b"/v2/models/iris/infer", V2, b"Connection: close"))
        assert transport.written[-1].count(b"connection: close") == 1 and transport.closed
    finally:
        loop.close()


def test_a_worker_whose_master_is_killed_stops_rather_than_serve_on_as_an_orphan() -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REDIS_URL, ROOT, free_port, wait_for_http

    port = free_port()
    env = {**os.environ, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1", "REDIS_URL": REDIS_URL}
    master = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py")],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/health/live", master)
        children = subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 1
        worker = int(children[0])
        master.kill()  # no SIGTERM handed on to the worker
        master.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(worker, signal.SIGKILL)
            raise AssertionError("the orphaned worker was still serving 15 s after its master was killed")
    finally:
        if master.poll() is None:
            master.kill()
            master.wait()
        master.stderr.close()
