"""The servers under load: start each on free loopback ports, wait until it answers right, and stop it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench import builds, mlserver, noop_app
from bench.targets import OLD_BUILD, Target, probabilities

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 2
GUNICORN = [sys.executable, "-m", "gunicorn"]
QUIET = {"LOG_LEVEL": "warning", "ORT_INTRA_OP_THREADS": "1"}
NEVER_REFUSED = "1000000000/second"
"""The rate of the `full` server's keys (and its RATE_LIMIT): taken from Redis in leases, never reached."""
LOG_RATE = 0.01
"""The share of iris predictions the `full` server records in the prediction log."""
CHOSEN = ("API_KEYS", "METRICS", "MODELS_DIR", "PROMETHEUS_MULTIPROC_DIR", "RATE_LIMIT", "PREDICTION_LOG_MAXLEN")
"""Settings the servers are compared on: never inherited from the benchmark's environment, so `ours` runs on
the defaults and each other server on what it sets."""


@dataclass(frozen=True)
class Server:
    """How to start one server, the headers every request to it carries, and those that may read its metrics."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path = ROOT
    headers: dict[str, str] = field(default_factory=dict)
    admin: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Running:
    """A started server: its base URL, the headers every request to it carries, and those that may read its
    metrics."""

    url: str
    headers: dict[str, str]
    admin: dict[str, str] = field(default_factory=dict)


def ours(port: int, scratch: Path, redis_url: str, **env: str) -> Server:
    """Our platform as shipped, with deploy/gunicorn.conf.py and the defaults, its state in `scratch` and on
    `redis_url`: metrics on, API keys `auto` (off: loopback and no key), the committed models (no prediction log)."""
    settings = {"BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(WORKERS), "REDIS_URL": redis_url,
                "DATABASE_URL": f"sqlite:///{scratch / 'platform.db'}"}
    return Server([*GUNICORN, "-c", str(ROOT / "deploy" / "gunicorn.conf.py")], {**settings, **env})


def bare(port: int, scratch: Path, redis_url: str) -> Server:
    """Our platform with everything that costs a request off: API keys, metrics (the committed models log
    nothing)."""
    return ours(port, scratch, redis_url, API_KEYS="off", METRICS="off")


def full(port: int, scratch: Path, redis_url: str) -> Server:
    """Our platform with everything on: API keys, a key made for the run with a rate never reached, in a scratch
    database of its own (deleted with the run's scratch folder: a key never lands in a shared database);
    metrics; and a copy of the model repository whose iris logs 1% of its predictions to `redis_url`."""
    server = ours(port, scratch, redis_url, API_KEYS="on", METRICS="on", RATE_LIMIT=NEVER_REFUSED,
                  DATABASE_URL=f"sqlite:///{scratch / 'keys.db'}",
                  MODELS_DIR=str(logged_repository(scratch / "models")))
    headers = {"Authorization": f"Bearer {api_key(server.env, 'predict')}"}
    return Server(server.argv, server.env, headers=headers,
                  admin={"Authorization": f"Bearer {api_key(server.env, 'admin')}"})


def logged_repository(folder: Path) -> Path:
    """A model repository in `folder` holding a copy of the committed iris whose spec logs `LOG_RATE` of its
    predictions."""
    shutil.copytree(ROOT / "models" / "iris", folder / "iris")
    with open(folder / "iris" / "model.toml", "a") as spec:
        spec.write(f"\n[monitoring]\nlog_rate = {LOG_RATE}\n")
    return folder


def h11(port: int, scratch: Path, redis_url: str) -> Server:
    """Our platform as shipped on uvicorn's h11 protocol in place of httptools (bench/h11_worker.py)."""
    server = ours(port, scratch, redis_url)
    return Server([*server.argv, "-k", "bench.h11_worker.H11WebWorker"], server.env)


def old(port: int, scratch: Path, redis_url: str) -> Server:
    """The build before the redesign, checked out under var/, with its own gunicorn settings and our .venv."""
    folder = builds.checkout(OLD_BUILD)
    settings = {"BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": str(WORKERS), "PYTHONPATH": str(folder),
                "REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{scratch / 'old.db'}"}
    return Server([*GUNICORN, "-c", str(folder / "deploy" / "gunicorn.conf.py")], settings, cwd=folder)


def floor(port: int) -> Server:
    """The no-op app on our worker class, worker count and keep-alive (deploy/gunicorn.conf.py)."""
    return Server([*GUNICORN, "bench.noop_app:app", "-k", "deploy.worker.WebWorker", "-w", str(WORKERS),
                   "--no-control-socket", "--keep-alive", "30", "-b", f"127.0.0.1:{port}", "--log-level", "warning"],
                  {})


def fastapi(port: int) -> Server:
    """The baseline: FastAPI on gunicorn with the stock uvicorn worker, as many workers as ours."""
    return Server([*GUNICORN, "bench.fastapi_baseline:app", "-k", "uvicorn_worker.UvicornWorker", "-w", str(WORKERS),
                   "-b", f"127.0.0.1:{port}", "--log-level", "warning"], {})


def mlserver_(port: int, scratch: Path) -> Server:
    """MLServer in its own environment, with as many inference workers as ours has web workers."""
    ports = {"http": port, "grpc": free_port(), "metrics": free_port()}
    argv, env, cwd = mlserver.command(scratch, ports, WORKERS)
    return Server(argv, env, cwd)


def api_key(env: dict[str, str], scope: str) -> str:
    """A new key with `scope` and a rate never reached, in the server's database, made by
    `python -m webapp.keys`."""
    argv = [sys.executable, "-m", "webapp.keys", "create", "--scope", scope, "--name", f"bench-http-{scope}",
            "--rate", NEVER_REFUSED]
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr}")
    return done.stdout.strip()


def server(name: str, port: int, scratch: Path, redis_url: str) -> Server:
    """How to start the server called `name`."""
    if name in ("ours", "bare", "full", "h11", "old"):
        return {"ours": ours, "bare": bare, "full": full, "h11": h11, "old": old}[name](port, scratch, redis_url)
    if name == "mlserver":
        return mlserver_(port, scratch)
    return floor(port) if name == "floor" else fastapi(port)


@contextlib.contextmanager
def running_servers(names: list[str], targets: tuple[Target, ...], scratch: Path,
                    redis_url: str) -> Iterator[dict[str, Running]]:
    """Start the servers called `names`, wait until each answers its targets, yield them, and stop them all."""
    with contextlib.ExitStack() as stack:
        started = {}
        for name in names:
            port = free_port()
            spec = server(name, port, scratch, redis_url)
            log = stack.enter_context(open(scratch / f"{name}.log", "wb"))
            process = subprocess.Popen(spec.argv, cwd=spec.cwd, env={**inherited(), **QUIET, **spec.env},
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            stack.callback(stop, process)
            started[name] = Running(f"http://127.0.0.1:{port}", spec.headers, spec.admin)
        for target in targets:
            running = started[target.server]
            wait_until_answering(running, target, scratch / f"{target.server}.log")
        yield started


def inherited() -> dict[str, str]:
    """The benchmark's environment without the settings the servers are compared on."""
    return {k: v for k, v in os.environ.items() if k not in CHOSEN}


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Stop a server gracefully, or kill it when it does not stop in time; a server started in a session of its
    own is stopped with every process of that session."""
    _signal(process, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        _signal(process, signal.SIGKILL)
        process.wait()


def _signal(process: subprocess.Popen, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, number)
        else:
            process.send_signal(number)


def post(url: str, body: bytes, headers: dict[str, str] | None = None, timeout_s: float = 5) -> dict:
    """POST a JSON body and answer the decoded JSON reply."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_until_answering(running: Running, target: Target, log: Path, timeout_s: float = 120) -> None:
    """Poll the target until it answers; fail with the server's log when it does not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            post(running.url + target.path, target.body, running.headers)
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    raise SystemExit(f"{running.url + target.path} did not answer within {timeout_s} s; server log:\n{tail}")


def check_answers(servers: dict[str, Running], targets: tuple[Target, ...], expected: np.ndarray) -> None:
    """Make sure every target answers what it should, so no error page gets timed: the predicting routes the
    probabilities onnxruntime computes in-process, the floor its fixed body, and a keyed server 401 without
    its key."""
    for target in targets:
        running = servers[target.server]
        got = post(running.url + target.path, target.body, running.headers)
        if target.answer == "floor":
            if got != json.loads(noop_app.ANSWER):
                raise SystemExit(f"the loopback floor answered {got}, not {noop_app.ANSWER.decode()}")
        elif not np.allclose(probabilities(target, got), expected, atol=1e-5):
            raise SystemExit(f"{target.name} answered {got}, onnxruntime computes probabilities {expected}")
        if running.headers:
            _refused_without_headers(running.url + target.path, target.body)


def _refused_without_headers(url: str, body: bytes) -> None:
    try:
        post(url, body)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            return
        raise SystemExit(f"{url} answered {exc.code} without its key, not 401") from None
    raise SystemExit(f"{url} answered without its key: API keys are not on")
