"""The web worker class (deploy/worker.py) under real gunicorn: request-head limits, keep-alive, pipelining."""

from __future__ import annotations

import contextlib
import socket
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
