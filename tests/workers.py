"""Real Celery processes for the integration tests: workers on chosen queues, and beat."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tasks import TaskSettings, create_celery

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def celery_worker(redis_url: str, queues: str, log: Path, concurrency: int = 2,
                  env: dict[str, str] | None = None, tag: str = "") -> Iterator[subprocess.Popen]:
    """A real Celery worker process on `queues` of `redis_url`, ready when this yields; stopped after."""
    name = f"{queues.replace(',', '-')}{tag}-{os.getpid()}@%h"
    command = [sys.executable, "-m", "celery", "-A", "tasks.worker", "worker", "-Q", queues, "-c", str(concurrency),
               "-n", name, "--without-mingle", "--without-gossip", "-l", "INFO"]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url, **(env or {})},
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    celery = create_celery(TaskSettings(redis_url=redis_url))
    try:
        deadline = time.monotonic() + 60
        while not any(name.split("@")[0] in reply_name for reply in celery.control.ping(timeout=0.5)
                      for reply_name in reply):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not start:\n{log.read_text()[-3000:]}")
        process.log = log  # type: ignore[attr-defined]
        yield process
    finally:
        celery.close()
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def celery_beat(redis_url: str, log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """A real `celery beat` process on `redis_url`, its schedule file beside `log`; stopped after."""
    command = [sys.executable, "-m", "celery", "-A", "tasks.worker", "beat", "-l", "INFO",
               "-s", str(log.with_suffix(".schedule"))]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url, **(env or {})},
                                   stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(30)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL a process started in its own session and every child it made."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def kill_group_holding(process: subprocess.Popen, held: Callable[[], int], timeout_s: float = 60) -> int:
    """SIGKILL a process group at a moment it holds work, and answer how much it held then.

    The group is frozen (SIGSTOP) and, once its statements in flight have settled, `held()` counts what it holds.
    If that is nothing (it was between two pieces of work) it is let go for a moment and frozen again.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        os.killpg(process.pid, signal.SIGSTOP)
        time.sleep(0.1)
        count = held()
        if count:
            kill_group(process)
            return count
        os.killpg(process.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the group never held any work when frozen"
        time.sleep(0.005)
