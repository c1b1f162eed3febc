"""`make run`: web (:8000), Celery workers, celery beat and Flower (127.0.0.1:5555) in the foreground.

With no REDIS_URL set, a local Redis is started first (and stopped last); with no DATABASE_URL,
SQLite is used. The SQL store's migrations run before anything starts. Local state (Redis data, beat
schedule, SQLite) lives under VAR_DIR (default var/). One worker serves the online queues, another the
`batch` queue, a third (of threads) the `callbacks` queue, so neither batch runs nor slow callback receivers
hold up online jobs. With no FLOWER_PASSWORD set, Flower gets a random password, shown once on the terminal.
Ctrl-C (or SIGTERM) stops every process; if one dies, all are stopped.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TextIO

from deploy import redis_server
from models import Registry, Settings
from tasks.app import QUEUES
from tasks.config import TaskSettings
from tasks.ensembles import member_queues

ROOT = Path(__file__).resolve().parent.parent


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
        "beat": [*celery, "beat", "-l", "INFO", "-s", str(var / "celerybeat-schedule")],
        "flower": [*celery, "flower", f"--address={flower_address}", f"--port={env.get('FLOWER_PORT', '5555')}"],
    }


def _queues(env: dict[str, str]) -> list[str]:
    """The online queues: the platform's own but `batch` and `callbacks`, and one per ensemble member model."""
    own = (q for q in QUEUES if q not in ("batch", "callbacks"))
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
    """Starts the processes, waits, and stops them all together."""

    def __init__(self) -> None:
        self.processes: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        print(f"launch: starting {name}: {' '.join(command)}", flush=True)
        self.processes[name] = subprocess.Popen(command, env=env, cwd=ROOT, preexec_fn=_die_with_parent,
                                                process_group=0)

    def wait(self) -> int:
        """Block until a signal or a process exit; answer the exit status."""
        while not self.stopping:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    print(f"launch: {name} exited with status {process.returncode}; stopping", flush=True)
                    return 1
            time.sleep(0.2)
        return 0

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


def _start_all(launcher: Launcher, env: dict[str, str], var: Path) -> None:
    """Start the platform's processes; only Flower's gets its login, and a password made for it is shown once."""
    flower_env, made = flower_login(env)
    for name, command in commands(env, var).items():
        launcher.start(name, command, {**env, **flower_env} if name == "flower" else env)
    if made:
        user = TaskSettings.from_env(env).flower_user
        show_once(f"launch: Flower asks for user {user!r}, password {made!r} (made for this run; "
                  "set FLOWER_PASSWORD to choose one)", sys.stderr)


def main() -> int:
    """Run the platform until Ctrl-C."""
    env = dict(os.environ)
    var = Path(env.get("VAR_DIR") or ROOT / "var").resolve()
    var.mkdir(parents=True, exist_ok=True)
    env.setdefault("DATABASE_URL", f"sqlite:///{var / 'platform.db'}")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    launcher = Launcher()
    signal.signal(signal.SIGINT, launcher.stop)
    signal.signal(signal.SIGTERM, launcher.stop)
    try:
        if not env.get("REDIS_URL"):
            process, env["REDIS_URL"] = redis_server.start(var / "redis", preexec_fn=_die_with_parent,
                                                           process_group=0)
            launcher.processes["redis"] = process
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
