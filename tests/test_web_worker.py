"""The web process under real gunicorn (deploy/worker.py, webapp/asgi.py): keep-alive, pipelining, the body's
size limit and deadline, and a worker that outlives its master."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import orjson
import pytest

pytestmark = pytest.mark.integration

LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n"


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
    # pipelined in one write: inference routes, answered on the event loop, and routes of the Flask app,
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
    assert [s for s, _, _ in got] == [413] and "limit" in orjson.loads(got[0][2])["error"]
    assert got[0][1][b"connection"] == b"close"  # refused before its body was read: the connection is closed


def test_many_pipelined_inference_requests_are_all_answered_in_order(live_server: str) -> None:
    requests = [post(b"/v2/models/iris/infer", V2 if n % 2 else IRIS) for n in range(1999)]
    got = answers(exchange(live_server, b"".join(requests) + post(b"/v2/models/iris/infer", V2, b"Connection: close")))
    assert len(got) == 2000 and [status for status, _, _ in got[:4]] == [400, 200, 400, 200]  # an iris row is no V2
    assert {status for status, _, _ in got[1::2]} == {200} and {status for status, _, _ in got[::2][:-1]} == {400}


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


def test_a_body_that_trickles_past_the_deadline_is_cut_with_408_and_the_worker_serves_on(slow_body_server: str) -> None:
    address = urlsplit(slow_body_server)
    with socket.create_connection((address.hostname, address.port), timeout=10) as conn:
        conn.sendall(post(b"/v1/models/iris:predict", IRIS)[:-10])  # the last bytes never come
        answer = b""
        while chunk := conn.recv(65536):  # until the server closes the connection
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 ") and b"connection: close" in answer.lower()
    assert b"did not arrive within 1 s" in answer
    assert exchange(slow_body_server, LIVE + b"Connection: close\r\n\r\n").startswith(b"HTTP/1.1 200 ")


@pytest.fixture(scope="module")
def slow_body_server() -> Iterator[str]:
    """The web process with a one-second body deadline."""
    from conftest import web_server

    with web_server(REQUEST_BODY_TIMEOUT_S="1") as url:
        yield url
