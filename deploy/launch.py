"""`make run`: web (:8000), Celery workers, celery beat and Flower (127.0.0.1:5555) in the foreground.

With no REDIS_URL set, a local Redis is started first (and stopped last); with no DATABASE_URL,
SQLite is used. The SQL store's migrations run before anything starts. Local state (Redis data, beat
schedule, SQLite) lives under VAR_DIR (default var/). One worker serves the online queues, another the
`batch` queue, a third (of threads) the `callbacks` queue, a fourth (one process) the `shadow` queue, so
neither batch runs, slow callback receivers nor shadow versions hold up online jobs. With no
FLOWER_PASSWORD set, Flower gets a random password, shown once on the terminal.
Ctrl-C (or SIGTERM) stops every process. One that dies is started again (the local Redis on its port and
its append-only file, so nothing it held is lost); one that dies more than LAUNCH_RESTARTS times within a
minute stops them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from deploy import redis_server
from models import Registry, Settings
from tasks.app import QUEUES
from tasks.config import TaskSettings
from tasks.ensembles import member_queues

ROOT = Path(__file__).resolve().parent.parent
METRICS_PORTS = {"worker": "WORKER_METRICS_PORT", "beat": "BEAT_METRICS_PORT"}
"""The setting that gives a Celery worker, or beat, the port of its metrics endpoint."""
RESTART_WINDOW_S = 60.0
"""A process that exits more than LAUNCH_RESTARTS times within this long is not started again."""


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this child when the launcher dies, even by SIGKILL (no orphans)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def commands(env: dict[str, str], var: Path) -> dict[str, list[str]]:
    """The platform's processes and their command lines (which hold no secret: they are printed and public)."""
    py, celery = sys.executable, [sys.executable, "-m", "celery", "-A", "tasks.worker"]
    flower_address = TaskSettings.from_env(env).flower_address
    return {
        "web": [py, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py")],
        "worker": [*celery, "worker", "-l", "INFO", "-Q", ",".join(_queues(env)), "-n", "worker@%h"],
        "callbacks-worker": [*celery, "worker", "-l", "INFO", "-Q", "callbacks", "-n", "callbacks@%h",
                             "-P", "threads", "-c", env.get("CALLBACK_CONCURRENCY", "4")],
        "batch-worker": [*celery, "worker", "-l", "INFO", "-Q", "batch", "-n", "batch@%h",
                         "-c", env.get("BATCH_CONCURRENCY", "1")],
        "shadow-worker": [*celery, "worker", "-l", "INFO", "-Q", "shadow", "-n", "shadow@%h", "-c", "1"],
        "beat": [*celery, "beat", "-l", "INFO", "-s", str(var / "celerybeat-schedule")],
        "flower": [*celery, "flower", f"--address={flower_address}", f"--port={env.get('FLOWER_PORT', '5555')}"],
    }


def _queues(env: dict[str, str]) -> list[str]:
    """The online queues: the platform's own but `batch`, `callbacks` and `shadow`, and one per ensemble member."""
    own = (q for q in QUEUES if q not in ("batch", "callbacks", "shadow"))
    return [*own, *member_queues(Registry(Settings.from_env(env)).ensembles())]


def flower_login(env: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """Flower's basic auth, as its environment (never its command line); and the password, if one was made."""
    settings = TaskSettings.from_env(env)
    made = None if settings.flower_password else secrets.token_urlsafe(18)
    return {"FLOWER_BASIC_AUTH": f"{settings.flower_user}:{settings.flower_password or made}"}, made


def show_once(text: str, terminal: TextIO) -> None:
    """Write a secret to the terminal only; where output goes elsewhere (a log file), say how to choose one."""
    if terminal.isatty():
        print(text, file=terminal, flush=True)
    else:
        print("launch: Flower's password was made at random and is shown only on a terminal; "
              "set FLOWER_PASSWORD to choose one", flush=True)


class Launcher:
    """Starts the processes, starts again one that dies, and stops them all together."""

    def __init__(self, restarts: int = 5) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.starters: dict[str, Callable[[], subprocess.Popen]] = {}
        self.exits: dict[str, deque[float]] = {}
        self.restarts = restarts
        self.stopping = False

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        """Start `command` as the process `name`, in its own process group."""
        print(f"launch: starting {name}: {' '.join(command)}", flush=True)
        self.run(name, lambda: subprocess.Popen(command, env=env, cwd=ROOT, preexec_fn=_die_with_parent,
                                                process_group=0))

    def run(self, name: str, starter: Callable[[], subprocess.Popen]) -> None:
        """Start the process `name` with `starter`, which starts it again should it die."""
        self.starters[name], self.exits[name] = starter, deque()
        self.processes[name] = starter()

    def wait(self) -> int:
        """Block until a signal, or until a process dies too often; answer the exit status."""
        while not self.stopping:
            for name, process in list(self.processes.items()):
                if process.poll() is not None and not self.stopping and not self._restart(name, process.returncode):
                    return 1
            time.sleep(0.2)
        return 0

    def _restart(self, name: str, status: int) -> bool:
        """Start a process that died again, unless it died too often lately; whether it was."""
        exits, now = self.exits[name], time.monotonic()
        while exits and now - exits[0] > RESTART_WINDOW_S:
            exits.popleft()
        exits.append(now)
        if len(exits) > self.restarts:
            print(f"launch: {name} exited with status {status}, {len(exits)} times within "
                  f"{RESTART_WINDOW_S:.0f} s; stopping", flush=True)
            return False
        print(f"launch: {name} exited with status {status}; starting it again", flush=True)
        self.processes[name] = self.starters[name]()
        return True

    def stop(self, *_: object) -> None:
        """Stop the platform's processes together, then Redis, which they need until they are gone."""
        self.stopping = True
        redis = self.processes.pop("redis", None)
        _terminate(list(self.processes.values()))
        if redis is not None:
            _terminate([redis])
            self.processes["redis"] = redis


def _terminate(processes: list[subprocess.Popen], grace_s: float = 20) -> None:
    """SIGTERM each process (each shuts its own children down), SIGKILL the group of any that lingers."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"launch: {' '.join(process.args[:5])} outlived {grace_s:.0f} s; killing it", flush=True)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def metrics_env(processes: dict[str, list[str]], env: dict[str, str], var: Path) -> dict[str, dict[str, str]]:
    """Each process's metrics settings: a directory of its own for prometheus-client's multiprocess files, and
    for each Celery worker and beat a port of its own, from LAUNCH_METRICS_PORT on (0: none), so no two take one."""
    base = int(env.get("LAUNCH_METRICS_PORT", "9101"))
    ports, found = itertools.count(base), {}
    for name, command in processes.items():
        role = command[5] if command[2] == "celery" else command[2]
        if role == "flower":
            continue
        found[name] = {"PROMETHEUS_MULTIPROC_DIR": str(var / "metrics" / name)}
        if role in METRICS_PORTS and base:
            found[name][METRICS_PORTS[role]] = str(next(ports))
    return found


def _start_all(launcher: Launcher, env: dict[str, str], var: Path) -> None:
    """Start the platform's processes; only Flower's gets its login, and a password made for it is shown once."""
    flower_env, made = flower_login(env)
    processes = commands(env, var)
    metrics = metrics_env(processes, env, var)
    for name, command in processes.items():
        own = {**metrics.get(name, {}), **(flower_env if name == "flower" else {})}
        launcher.start(name, command, {**env, **own})
        if port := own.get("WORKER_METRICS_PORT") or own.get("BEAT_METRICS_PORT"):
            print(f"launch: {name}'s metrics: http://127.0.0.1:{port}/metrics", flush=True)
    if made:
        user = TaskSettings.from_env(env).flower_user
        show_once(f"launch: Flower asks for user {user!r}, password {made!r} (made for this run; "
                  "set FLOWER_PASSWORD to choose one)", sys.stderr)


def _local_redis(launcher: Launcher, data_dir: Path) -> str:
    """Start a Redis of the launcher's own, started again on the same port and files should it die."""
    process, url = redis_server.start(data_dir, preexec_fn=_die_with_parent, process_group=0)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    first = iter([process])
    launcher.run("redis", lambda: next(first, None) or redis_server.start(
        data_dir, port=port, preexec_fn=_die_with_parent, process_group=0)[0])
    return url


def main() -> int:
    """Run the platform until Ctrl-C."""
    env = dict(os.environ)
    var = Path(env.get("VAR_DIR") or ROOT / "var").resolve()
    var.mkdir(parents=True, exist_ok=True)
    env.setdefault("DATABASE_URL", f"sqlite:///{var / 'platform.db'}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    launcher = Launcher(int(env.get("LAUNCH_RESTARTS", "5")))
    signal.signal(signal.SIGINT, launcher.stop)
    signal.signal(signal.SIGTERM, launcher.stop)
    try:
        if not env.get("REDIS_URL"):
            env["REDIS_URL"] = _local_redis(launcher, var / "redis")
            print(f"launch: no REDIS_URL set; started a local Redis at {env['REDIS_URL']}", flush=True)
        migrate = subprocess.run([sys.executable, "-m", "tasks.db", "upgrade"], env=env, cwd=ROOT)
        if migrate.returncode:
            print("launch: the SQL store's migrations failed; is DATABASE_URL right?", file=sys.stderr, flush=True)
            return 2
        _start_all(launcher, env, var)
        status = launcher.wait()
    except redis_server.RedisUnavailable as exc:
        print(f"launch: {exc}", file=sys.stderr, flush=True)
        status = 2
    finally:
        launcher.stop()
    return status


if __name__ == "__main__":
    sys.exit(main())
