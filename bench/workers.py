"""The worker processes of the designs: started, awaited until ready, paused and resumed, stopped.

Ours is one Celery worker process with two prefork children; the reference is two processes of
bench/brpop_reference.py. Pausing is SIGSTOP and SIGCONT to every process of a worker, children included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from celery import Celery

from bench import brpop_reference
from bench.servers import ROOT, stop

WORKERS = 2
START_TIMEOUT_S = 60


@contextlib.contextmanager
def celery_worker(celery: Celery, url: str, batching: bool, log: Path) -> Iterator[list[int]]:
    """`celery -A tasks.worker worker -Q prep,predict,callbacks -c 2` with REDIS_URL and BATCHING set, ready
    (answering `celery`'s ping) when this yields its process id."""
    name = f"bench-jobs-{os.getpid()}-{'on' if batching else 'off'}"
    command = [sys.executable, "-m", "celery", "-A", "tasks.worker", "worker", "-Q", "prep,predict,callbacks",
               "-c", str(WORKERS), "-n", f"{name}@%h", "-l", "WARNING"]
    env = {**os.environ, "REDIS_URL": url, "BATCHING": "on" if batching else "off"}
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any(name in replied for reply in celery.control.ping(timeout=0.5) for replied in reply):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the Celery worker did not start:\n{log.read_text()[-3000:]}")
        yield [process.pid]
    finally:
        stop(process)


@contextlib.contextmanager
def brpop_workers(url: str, log: Path) -> Iterator[list[int]]:
    """The reference's worker processes, ready when this yields their ids."""
    command = [sys.executable, "-m", "bench.brpop_reference", url]
    client = redis.Redis.from_url(url)
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log.open("wb"))
        processes = [subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
                     for _ in range(WORKERS)]
        for process in processes:
            stack.callback(stop, process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while int(client.get(brpop_reference.READY) or 0) < WORKERS:
            if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
                raise SystemExit(f"the reference's workers did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        yield [p.pid for p in processes]
    client.close()


@contextlib.contextmanager
def paused(workers: list[int]) -> Iterator[None]:
    """Stop the worker processes and their children (SIGSTOP) for the duration, then let them go on."""
    pids = [pid for root in workers for pid in family(root)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def family(pid: int) -> list[int]:
    """A process and all its descendants, read from /proc."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return [pid] + [p for child in children for p in family(child)]
