"""The load generators: `wrk` with a Lua script for the POST body, or a fallback written in Python."""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from bench.sample import Sample, summarise

Generator = Callable[[str, bytes, dict[str, str], int, int], Sample]
"""Send single-row requests: (url, body, extra headers, connections, whole seconds) -> the measured sample."""
WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = {body}
"""
WRK_HEADER = """wrk.headers[{name}] = {value}
"""
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
INSTALL_WRK = "run `sudo apt-get install wrk` on Debian or Ubuntu"


def pick_generator(args: argparse.Namespace, script_dir: Path) -> tuple[Generator, str]:
    """The load generator to use and how to name it in the results. With `auto`, wrk above one connection,
    and at one connection the Python client: wrk times requests by the wall clock (`gettimeofday`), and
    where that clock is adjusted many times a second (virtual machines), the adjustments land in the
    one-connection tail as latencies that never happened; the Python client times by the monotonic clock,
    and one connection is light enough load for it."""
    wrk = None if args.generator == "python" else ensure_wrk(not args.no_install)
    if wrk:
        version = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.split(" [")[0]
        generate, name = wrk_generator(wrk, script_dir, args.wrk_threads), f"{version} ({args.wrk_threads} thread(s))"
        if args.generator == "wrk":
            return generate, name
        return _by_concurrency(python_generator, generate), f"{name} above one connection; at one, python (monotonic)"
    if args.generator == "wrk":
        raise SystemExit(f"wrk is not installed: {INSTALL_WRK}, and try again")
    if args.generator == "auto":
        print(f"wrk is not installed ({INSTALL_WRK}): falling back to the Python load generator, "
              "which competes with the servers for the cores", flush=True)
    return python_generator, "python (one thread, raw sockets; takes CPU from the servers, figures are low)"


def _by_concurrency(one: Generator, more: Generator) -> Generator:
    """`one` for one connection, `more` for more."""

    def run(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration_s: int) -> Sample:
        return (one if concurrency == 1 else more)(url, body, headers, concurrency, duration_s)

    return run


def ensure_wrk(may_install: bool) -> str | None:
    """The path of `wrk`, installing Debian's package first when allowed and running as root."""
    found = shutil.which("wrk")
    if found or not may_install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("wrk is missing: installing it with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    return shutil.which("wrk")


def wrk_generator(wrk: str, script_dir: Path, threads: int) -> Generator:
    """A load generator running `wrk --latency` with a Lua script that POSTs the body."""

    def run(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration_s: int) -> Sample:
        script = script_dir / f"post-{abs(hash((body, *headers.items())))}.lua"
        script.write_text(WRK_SCRIPT.format(body=json.dumps(body.decode())) + "".join(
            WRK_HEADER.format(name=json.dumps(name), value=json.dumps(value)) for name, value in headers.items()))
        argv = [wrk, "--latency", "-t", str(min(threads, concurrency)), "-c", str(concurrency),
                "-d", f"{duration_s:g}s", "--timeout", "10s", "-s", str(script), url]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        return parse_wrk(done.stdout)

    return run


def parse_wrk(output: str) -> Sample:
    """Read req/s, p50, p99, the request count and the errors from wrk's `--latency` report."""
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)\s*$", output, re.M))
    if set(percentiles) != {"50", "99"}:
        raise RuntimeError(f"wrk printed no latency distribution:\n{output}")
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    return Sample(rps, to_ms(percentiles["50"]), to_ms(percentiles["99"]), requests, errors)


def to_ms(text: str) -> float:
    """Convert one of wrk's durations (`431.00us`, `1.20ms`, `2.00s`) to milliseconds."""
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * UNITS_MS[unit]


class _Connection:
    """One keep-alive connection of the Python generator, with one request in flight."""

    def __init__(self, address: tuple[str, int], request: bytes) -> None:
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request, self.buffer, self.sent_ns = request, b"", 0

    def send(self) -> None:
        """Send the request and note when."""
        self.sent_ns = time.perf_counter_ns()
        self.sock.sendall(self.request)

    def receive(self) -> int | None:
        """Read what has arrived; answer the status once a whole response is in, else None."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed a keep-alive connection")
        self.buffer += chunk
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = self.buffer[:head_end].decode("latin-1")
        length = re.search(r"(?im)^content-length:\s*(\d+)", head)
        if length is None:
            raise ConnectionError("a response without Content-Length; the Python generator cannot read it")
        end = head_end + 4 + int(length.group(1))
        if len(self.buffer) < end:
            return None
        self.buffer = self.buffer[end:]
        return int(head.split(" ", 2)[1])


def python_generator(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration_s: int) -> Sample:
    """A load generator in pure Python: one thread, non-blocking sockets, `concurrency` connections (one
    blocking connection for one), timed by the monotonic clock."""
    parts = urlsplit(url)
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body
    if concurrency == 1:
        return _one_connection((parts.hostname, parts.port), request, duration_s)
    connections = [_Connection((parts.hostname, parts.port), request) for _ in range(concurrency)]
    latencies: list[int] = []
    errors = 0
    with selectors.DefaultSelector() as selector:
        for connection in connections:
            selector.register(connection.sock, selectors.EVENT_READ, connection)
        start = time.perf_counter_ns()
        deadline = start + int(duration_s * 1e9)
        for connection in connections:
            connection.send()
        while time.perf_counter_ns() < deadline:
            for key, _ in selector.select(timeout=0.1):
                connection = key.data
                status = connection.receive()
                if status is None:
                    continue
                now = time.perf_counter_ns()
                latencies.append(now - connection.sent_ns)
                errors += not 200 <= status < 400
                if now < deadline:
                    connection.send()
        elapsed = (time.perf_counter_ns() - start) / 1e9
    for connection in connections:
        connection.sock.close()
    return summarise(latencies, elapsed, errors)


def _one_connection(address: tuple[str, int], request: bytes, duration_s: int) -> Sample:
    """One connection, one request at a time: send, then read until the response is whole."""
    connection = _Connection(address, request)
    latencies: list[int] = []
    errors = 0
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(duration_s * 1e9)
    try:
        while (sent := clock()) < deadline:
            connection.sock.sendall(request)
            while (status := connection.receive()) is None:
                pass
            latencies.append(clock() - sent)
            errors += not 200 <= status < 400
    finally:
        connection.sock.close()
    return summarise(latencies, (clock() - start) / 1e9, errors)
