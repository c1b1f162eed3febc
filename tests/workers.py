"""Real Celery processes for the integration tests: workers on chosen queues, and beat."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import redis
from celery import Celery

from models import Registry, Settings
from models.config import PACKAGE_DIR
from tasks import TaskSettings, create_celery, submission
from tasks.jobs import Job, JobStore
from tasks.lanes import BatchQueue
from tasks.status import JobStatus

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
    with frozen_holding(process, held, timeout_s) as count:
        kill_group(process)
    return count


def finished_jobs(store: JobStore, job_ids: list[str], timeout_s: float) -> dict[str, Job]:
    """Poll jobs until every one is finished; answer their records, or fail naming those still unfinished."""
    deadline, jobs = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        jobs = {job_id: store.get(job_id) for job_id in job_ids}
        if all(job.status.finished for job in jobs.values()):
            return jobs
        time.sleep(0.1)
    waiting = {i: job.status.value for i, job in jobs.items() if not job.status.finished}
    pytest.fail(f"{len(waiting)} of {len(job_ids)} jobs unfinished after {timeout_s} s: {waiting}")


@contextlib.contextmanager
def frozen_holding(process: subprocess.Popen, held: Callable[[], int], timeout_s: float = 60) -> Iterator[int]:
    """Freeze a process group (SIGSTOP) at a moment it holds work, yield how much it held then, and let it
    go on (SIGCONT) after; as `kill_group_holding`, it is let go for a moment and frozen again while it
    holds nothing."""
    deadline = time.monotonic() + timeout_s
    while True:
        os.killpg(process.pid, signal.SIGSTOP)
        time.sleep(0.1)
        count = held()
        if count:
            break
        os.killpg(process.pid, signal.SIGCONT)
        assert time.monotonic() < deadline, "the group never held any work when frozen"
        time.sleep(0.005)
    try:
        yield count
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may have been killed meanwhile
            os.killpg(process.pid, signal.SIGCONT)


@dataclass
class Platform:
    """What a web process holds to submit jobs, on a Redis database and a model repository."""

    app: Celery
    store: JobStore
    queue: BatchQueue
    registry: Registry

    @classmethod
    def on(cls, url: str, models_dir: Path = PACKAGE_DIR, env: dict[str, str] | None = None) -> Platform:
        """A platform on `url`, its database flushed first, with the settings `env` gives its workers too
        (a message carries the time limits of the process that sends it)."""
        client = redis.Redis.from_url(url)
        client.flushdb()
        settings = TaskSettings.from_env({**(env or {}), "REDIS_URL": url})
        return cls(create_celery(settings), JobStore(client, 3600, 3600), BatchQueue(client, settings.batch_lease_s),
                   Registry(Settings(models_dir=models_dir)))

    def submit(self, model: str, rows: np.ndarray, batched: bool = True) -> str:
        """Submit a job through the submission API, to its lane or as a task of its own; answer its id."""
        version = self.registry.get(model)
        inputs = {version.spec.inputs[0].name: rows}
        queue = self.queue if batched else None
        return submission.submit(self.app, self.store, queue, version, inputs, "rows", None, "-").id

    def statuses(self, job_ids: list[str]) -> list[JobStatus]:
        """The jobs' current states."""
        return [self.store.get(job_id).status for job_id in job_ids]
