"""The servers under load: start each on a free loopback port, wait until it answers right, and stop it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench import noop_app
from bench.targets import FLOOR, PREDICTING, SERVERS, TARGETS, probabilities

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
Command = tuple[list[str], dict[str, str]]


def server_commands(ports: dict[str, int]) -> dict[str, Command]:
    """The command line and environment of each server, bound to loopback on its port."""
    gunicorn = [sys.executable, "-m", "gunicorn"]
    quiet = {**os.environ, "LOG_LEVEL": "warning", "ORT_INTRA_OP_THREADS": "1"}
    fastapi = [*gunicorn, "bench.fastapi_baseline:app", "-k", "uvicorn_worker.UvicornWorker",
               "-w", str(WORKERS), "-b", f"127.0.0.1:{ports['fastapi']}", "--log-level", "warning"]
    # our worker class, worker count and keep-alive (deploy/gunicorn.conf.py), with an app that does nothing
    floor = [*gunicorn, "bench.noop_app:app", "-k", "deploy.worker.WebWorker", "-w", str(WORKERS),
             "--no-control-socket", "--keep-alive", "30", "-b", f"127.0.0.1:{ports['floor']}", "--log-level", "warning"]
    ours = [*gunicorn, "-c", str(ROOT / "deploy" / "gunicorn.conf.py")]
    ours_env = {"BIND": f"127.0.0.1:{ports['ours']}", "WEB_CONCURRENCY": str(WORKERS)}
    return {"floor": (floor, quiet), "fastapi": (fastapi, quiet), "ours": (ours, {**quiet, **ours_env})}


@contextlib.contextmanager
def running_servers(log_dir: Path) -> Iterator[dict[str, str]]:
    """Start every server, wait until each answers, yield their base URLs, and stop them all."""
    ports = {name: free_port() for name in SERVERS}
    with contextlib.ExitStack() as stack:
        for name, (argv, env) in server_commands(ports).items():
            log = stack.enter_context(open(log_dir / f"{name}.log", "wb"))
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(stop, process)
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for target in TARGETS:
            log = log_dir / f"{target.server}.log"
            wait_until_answering(urls[target.server] + target.path, target.body, log)
        yield urls


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Stop a server gracefully, or kill it when it does not stop in time."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def post(url: str, body: bytes, timeout_s: float = 5) -> dict:
    """POST a JSON body and answer the decoded JSON reply."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_until_answering(url: str, body: bytes, log: Path, timeout_s: float = 60) -> None:
    """Poll `url` until it answers; fail with the server's log when it does not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            post(url, body)
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    raise SystemExit(f"{url} did not answer within {timeout_s} s; server log:\n{tail}")


def check_answers(urls: dict[str, str], expected: np.ndarray) -> None:
    """Make sure every target answers what it should, so no error page gets timed.

    The predicting routes must answer the probabilities onnxruntime computes in-process, the floor its
    fixed body.
    """
    for target in PREDICTING:
        got = probabilities(target, post(urls[target.server] + target.path, target.body))
        if not np.allclose(got, expected, atol=1e-5):
            raise SystemExit(f"{target.name} answered probabilities {got}, onnxruntime computes {expected}")
    (floor,) = [t for t in TARGETS if t.name == FLOOR]
    got = post(urls[floor.server] + floor.path, floor.body)
    if got != json.loads(noop_app.ANSWER):
        raise SystemExit(f"the loopback floor answered {got}, not {noop_app.ANSWER.decode()}")
