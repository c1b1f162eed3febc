"""Where job callbacks may go, and how long one attempt may take: the address policy, then a real worker."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import io
import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from aiohttp.abc import AbstractResolver, ResolveResult
from flask.testing import FlaskClient
from hypothesis import given, settings
from hypothesis import strategies as st
from workers import celery_worker

from deploy import launch
from samples import digit_png, error_of
from tasks import TaskSettings
from tasks.callbacks import post
from tasks.destinations import Destinations, RefusedDestination, networks
from webapp import create_app

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
WORKER_REDIS_URL = os.environ.get("TEST_WORKER_REDIS_URL", "redis://127.0.0.1:6379/12")
DEADLINE_S = 1.0
"""The worker's CALLBACK_DEADLINE_S."""


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("100.64.0.1", "private"),
    ("fd12:3456::1", "private"),
    ("224.0.0.1", "multicast"), ("239.255.255.250", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"), ("255.255.255.255", "reserved"), ("192.0.2.1", "reserved"), ("198.18.0.1", "reserved"),
    ("2001:db8::1", "reserved"), ("::127.0.0.1", "reserved"), ("100::1", "reserved"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"), ("::ffff:10.0.0.1", "private"),
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64's form of 169.254.169.254
])
def test_each_non_public_range_is_refused_naming_what_it_is(address: str, kind: str):
    with pytest.raises(RefusedDestination, match=f"{address}.*not a public address \\({kind}\\)"):
        Destinations().check_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808"])
def test_public_addresses_are_allowed(address: str):
    Destinations().check_address(address)


def test_the_allowlist_opens_exactly_its_networks_mapped_ipv6_included():
    allowed = Destinations(networks(" 127.0.0.1/32, 10.0.0.0/8 ,fd00::/8"))
    for address in ("127.0.0.1", "10.200.0.7", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "fd00::5"):
        allowed.check_address(address)
    for address in ("127.0.0.2", "192.168.0.1", "169.254.169.254", "::1", "fe80::1"):
        with pytest.raises(RefusedDestination):
            allowed.check_address(address)


def test_a_malformed_allowlist_fails_at_start_naming_the_variable():
    with pytest.raises(ValueError, match=r"CALLBACK_ALLOW_NETWORKS: '10\.0\.0\.0/33'"):
        TaskSettings.from_env({"CALLBACK_ALLOW_NETWORKS": "127.0.0.1/32,10.0.0.0/33"})
    assert TaskSettings.from_env({}).callback_allow_networks == ()


@pytest.mark.parametrize(("url", "problem"), [
    ("http://example.com/hook\r\nX-Injected: 1", "control characters"),
    ("http://example.com/a\nb", "control characters"),
    ("http://example.com/\x00", "control characters"),
    ("http://example.com/a b", "spaces"),
    ("http://user:pass@example.com/hook", "user info"),
    ("https://token@example.com/hook", "user info"),
    ("ftp://example.com/x", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("gopher://example.com:70/_x", "http:// or https://"),
    ("//example.com/x", "http:// or https://"),
    ("http://", "http:// or https://"),
    ("http://[::1", "not a valid URL"),
    ("http://example.com:99999/", "not a valid URL"),
    ("http://example.com:0/", "port 0"),
    ("http://b\u00fccher.example/", "xn--"),
    ("http://%31%32%37.0.0.1/", "xn--"),
    ("http://2130706433/", "not an IP address in standard form"),
    ("http://0x7f.1/", "not an IP address in standard form"),
    ("http://127.1/", "not an IP address in standard form"),
    ("http://127.0.0.1./", "not an IP address in standard form"),
    ("http://169.254.169.254/latest/meta-data", "not a public address (link-local)"),
    ("http://[::ffff:127.0.0.1]:9099/h", "not a public address (loopback)"),
    ("http://[fe80::1%25eth0]/h", "not a public address (link-local)"),
    ("http://10.0.0.8/h", "not a public address (private)"),
    ("http://" + "a" * 2048 + ".example/", "longer than 2048"),
])
def test_a_refused_callback_url_is_400_naming_the_problem(client: FlaskClient, url: str, problem: str):
    message = error_of(client.post("/v1/models/iris:submit", json={**IRIS, "callback_url": url}), 400)
    assert message.startswith("callback_url ") and problem in message, message


def test_a_multipart_callback_url_is_checked_too(client: FlaskClient):
    form = {"callback_url": "http://127.0.0.1:9099/h", "file": (io.BytesIO(digit_png(np.zeros(64))), "d.png")}
    answer = client.post("/v1/models/digits-light:submit", data=form, content_type="multipart/form-data")
    assert "not a public address (loopback)" in error_of(answer, 400)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.text(max_size=60).map("http://".__add__),
                 st.text(alphabet="0123456789abcdefx.:[]%@/", max_size=30).map("http://".__add__)))
def test_any_text_is_taken_or_refused_with_a_reason(url: str):
    with contextlib.suppress(RefusedDestination):
        parts = Destinations().check_url(url)
        assert parts.scheme in ("http", "https") and parts.hostname


def test_host_names_are_left_to_delivery_and_allowlisted_literals_pass():
    Destinations().check_url("https://receiver.example.com:8443/hook?job=1")
    Destinations().check_url("http://localhost/hook")  # resolved, and refused, when delivered
    Destinations(networks("127.0.0.1/32")).check_url("http://127.0.0.1:9099/h")
    Destinations().check_url("http://[2606:4700::1111]/h")


class Listener:
    """A local HTTP server in a thread that records its requests; `answer` shapes its reply."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes, float]] = []
        self.cut_after: list[float] = []
        self.answer = self.ok
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                listener.requests.append((self.command, self.path, dict(self.headers), body, time.monotonic()))
                listener.answer(self)

            do_GET = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"

    @staticmethod
    def ok(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def trickle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        """Answer one byte at a time, 0.1 s apart (10 s in all); note when the client hangs up."""
        started = time.monotonic()
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n" + b"x" * 60:
            try:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
            except OSError:
                self.cut_after.append(time.monotonic() - started)
                handler.close_connection = True
                return
            time.sleep(0.1)

    def __enter__(self) -> Listener:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class FixedResolver(AbstractResolver):
    """Answers one address for every name, as a DNS server under someone else's control might."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        family = socket.AF_INET6 if ipaddress.ip_address(self.address).version == 6 else socket.AF_INET
        return [{"hostname": host, "host": self.address, "port": port, "family": family, "proto": 0, "flags": 0}]

    async def close(self) -> None:
        pass


def test_a_host_name_is_connected_to_at_the_address_checked_and_refused_when_that_is_forbidden():
    with Listener() as receiver:
        port = receiver.server.server_address[1]
        allowed = Destinations(networks("127.0.0.1/32"))
        status = asyncio.run(post(f"http://receiver.test:{port}/h", b"{}", allowed, 5, FixedResolver("127.0.0.1")))
        assert status == 200
        assert receiver.requests[0][2]["Host"] == f"receiver.test:{port}"  # the name, sent to the checked address
        with pytest.raises(RefusedDestination, match=r"\(host receiver.test\) points to 127.0.0.1.*loopback"):
            asyncio.run(post(f"http://receiver.test:{port}/h", b"{}", Destinations(), 5, FixedResolver("127.0.0.1")))
        with pytest.raises(RefusedDestination, match=r"169\.254\.169\.254, which is not a public address"):
            asyncio.run(post("http://metadata.test/x", b"{}", allowed, 5, FixedResolver("169.254.169.254")))
    assert len(receiver.requests) == 1


def test_the_callbacks_queue_has_a_worker_pool_of_its_own_under_make_run(tmp_path: Path):
    commands = launch.commands({**os.environ, "CALLBACK_CONCURRENCY": "3"}, tmp_path)
    served = {name: command[command.index("-Q") + 1].split(",")
              for name, command in commands.items() if "-Q" in command}
    assert [name for name, queues in served.items() if "callbacks" in queues] == ["callbacks-worker"]
    assert served["callbacks-worker"] == ["callbacks"]
    assert {"predict", "prep"} <= set(served["worker"])
    assert commands["callbacks-worker"][-4:] == ["-P", "threads", "-c", "3"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    """A real worker taking predictions and callbacks, allowed to call 127.0.0.1 back, with a 1 s deadline."""
    redis.Redis.from_url(WORKER_REDIS_URL).flushdb()
    log = tmp_path_factory.mktemp("callbacks") / "worker.log"
    env = {"CALLBACK_ALLOW_NETWORKS": "127.0.0.1/32", "CALLBACK_DEADLINE_S": str(DEADLINE_S)}
    with celery_worker(WORKER_REDIS_URL, "predict,callbacks", log, env=env) as process:
        yield process


@pytest.fixture
def local_client(worker: subprocess.Popen) -> FlaskClient:
    """A client of an app that takes callback URLs on any loopback address (the worker allows one only)."""
    config = {"TESTING": True, "redis_url": WORKER_REDIS_URL, "callback_allow_networks": networks("127.0.0.0/8")}
    return create_app(config).test_client()


def _submit(client: FlaskClient, callback_url: str) -> str:
    answer = client.post("/v1/models/iris:submit", json={**IRIS, "callback_url": callback_url})
    assert answer.status_code == 202, answer.get_data(as_text=True)
    return answer.get_json()["job_id"]


def _wait_for_log(worker: subprocess.Popen, text: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if text in (log := worker.log.read_text()):
            return log
        time.sleep(0.05)
    pytest.fail(f"{text!r} not in the worker's log:\n{worker.log.read_text()[-3000:]}")


def test_an_allowlisted_local_receiver_gets_the_finished_job(local_client: FlaskClient, worker: subprocess.Popen):
    with Listener() as receiver:
        job_id = _submit(local_client, f"{receiver.url}/hook")
        _wait_for_log(worker, f"job {job_id}: callback delivered (200)")
    [(method, path, headers, body, _)] = receiver.requests
    assert (method, path, headers["Content-Type"]) == ("POST", "/hook", "application/json")
    assert local_client.get(f"/v1/jobs/{job_id}").get_json() == json.loads(body)


def test_a_redirect_is_not_followed_nor_retried(local_client: FlaskClient, worker: subprocess.Popen):
    with Listener() as first, Listener() as second:
        def redirect(handler: http.server.BaseHTTPRequestHandler) -> None:
            handler.send_response(302)
            handler.send_header("Location", f"{second.url}/latest/meta-data")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        first.answer = redirect
        job_id = _submit(local_client, f"{first.url}/h")
        log = _wait_for_log(worker, f"job {job_id}: callback answered 302, a redirect, which is not followed")
        time.sleep(2.5)  # past the first two retries' backoff, had there been any
    assert second.requests == []
    assert [r[:2] for r in first.requests] == [("POST", "/h")]
    assert f"job {job_id}: callback answered 302; retry" not in log


def test_a_forbidden_address_is_never_connected_to(local_client: FlaskClient, worker: subprocess.Popen):
    with contextlib.closing(socket.socket()) as listener:
        listener.bind(("127.0.0.2", 0))  # loopback, but not in the worker's CALLBACK_ALLOW_NETWORKS
        listener.listen()
        listener.setblocking(False)
        job_id = _submit(local_client, f"http://127.0.0.2:{listener.getsockname()[1]}/h")  # the web app allows it
        log = _wait_for_log(worker, f"job {job_id}: callback not sent, and not retried")
        time.sleep(1.5)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert "points to 127.0.0.2, which is not a public address (loopback)" in log
    assert log.count(f"job {job_id}: callback") == 1


def test_a_trickling_receiver_is_cut_at_the_whole_attempts_deadline(local_client: FlaskClient,
                                                                    worker: subprocess.Popen):
    with Listener() as receiver:
        receiver.answer = receiver.trickle
        job_id = _submit(local_client, f"{receiver.url}/h")
        _wait_for_log(worker, f"job {job_id}: callback answered None; retry 1")
        deadline = time.monotonic() + 5
        while not receiver.cut_after and time.monotonic() < deadline:
            time.sleep(0.05)
    assert receiver.cut_after, "the worker never hung up on the trickling receiver"
    assert DEADLINE_S - 0.5 < receiver.cut_after[0] < DEADLINE_S + 1.0  # yet each byte came within 0.1 s
    assert f"no whole answer within {DEADLINE_S:g} s" in worker.log.read_text()
