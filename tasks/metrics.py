"""Prometheus metrics of the queue side: jobs, batches and tasks, counted where they run; each process's endpoint.

Every process kind exposes its own metrics. Celery workers and beat serve them with prometheus-client's HTTP
server on WORKER_METRICS_PORT and BEAT_METRICS_PORT (0: none); the web process at `GET /metrics`
(`webapp.metrics`). A process whose work runs in several processes (gunicorn's workers, a prefork pool's
children) writes its metrics to files in PROMETHEUS_MULTIPROC_DIR, prometheus-client's multiprocess mode,
and its endpoint adds them up; that directory is the process's own, emptied when it starts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Task
from celery.signals import (
    after_task_publish,
    beat_init,
    celeryd_init,
    task_postrun,
    task_prerun,
    worker_process_shutdown,
    worker_ready,
)
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess, start_http_server

import models
from tasks.jobs import Job, JobStore

log = logging.getLogger(__name__)
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
LABELS = ("model", "version")
JOBS = Counter("platform_jobs_finished_total", "Jobs finished by a worker, by their final state.", [*LABELS, "state"])
QUEUE_WAIT = Histogram("platform_job_queue_wait_seconds", "Time from a job's submission to its first start.",
                       LABELS, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
BATCH_SIZE = Histogram("platform_job_batch_size", "Jobs a batcher ran in one runtime call.", LABELS,
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512))
TASKS = Counter("platform_tasks_total", "Celery tasks run, by task and Celery's end state.", ["task", "state"])
TASK_SECONDS = Histogram("platform_task_duration_seconds", "Time a Celery task ran.", ["task"],
                         buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 20, 60))
SENT = Counter("platform_tasks_sent_total", "Celery messages this process sent, by task and queue.", ["task", "queue"])
_started: dict[str, float] = {}
"""When each task running in this process began, by task id."""


@dataclass(frozen=True)
class MetricsSettings:
    """Typed settings of the metrics; each maps to one environment variable."""

    metrics: bool = True
    """METRICS: the web process counts what it serves and answers `GET /metrics` (`on` or `off`)."""
    worker_metrics_port: int = 0
    """WORKER_METRICS_PORT: port of a Celery worker's metrics endpoint; 0: none. One port per worker."""
    beat_metrics_port: int = 0
    """BEAT_METRICS_PORT: port of beat's metrics endpoint; 0: none."""
    metrics_address: str = "127.0.0.1"
    """METRICS_ADDRESS: the address the workers' and beat's metrics endpoints listen on."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> MetricsSettings:
        """Read the settings from environment variables, falling back to the defaults."""
        return cls(
            metrics=env.get("METRICS", "on").lower() not in ("off", "0", "false", "no"),
            worker_metrics_port=int(env.get("WORKER_METRICS_PORT") or 0),
            beat_metrics_port=int(env.get("BEAT_METRICS_PORT") or 0),
            metrics_address=env.get("METRICS_ADDRESS") or cls.metrics_address,
        )


def multiprocess_mode() -> bool:
    """Whether this process's metrics live in files that its endpoint adds up: PROMETHEUS_MULTIPROC_DIR is in
    the environment (set at all, as prometheus-client decides it on import)."""
    return MULTIPROCESS_DIR in os.environ


def collected() -> CollectorRegistry:
    """What this process kind's endpoint shows: the sum over its processes' files in multiprocess mode, else
    this process's own metrics."""
    if not multiprocess_mode():
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def prepare_directory() -> None:
    """Make the multiprocess directory, and empty it of the files an earlier run of this process left."""
    if multiprocess_mode():
        directory = Path(os.environ[MULTIPROCESS_DIR])
        directory.mkdir(parents=True, exist_ok=True)
        for stale in (*directory.glob("*.db"), *directory.glob("tally-*.json")):
            stale.unlink(missing_ok=True)


def serve(port: int, address: str) -> bool:
    """Serve this process kind's metrics on `port`, on a thread; whether it could (a port taken by another
    process is logged, and costs only the metrics)."""
    try:
        start_http_server(port, address, registry=collected())
    except OSError as exc:
        log.error("metrics endpoint not served: %s:%d is taken or refused (%s); give each worker on a machine "
                  "its own WORKER_METRICS_PORT", address, port, exc)
        return False
    log.info("metrics served on http://%s:%d/metrics", address, port)
    return True


def job_ended(job: Job, status: str) -> None:
    """Count a job a stage task finished (`succeeded`, or `failed: reason`), and the time it waited."""
    state = status.partition(":")[0]
    if state not in ("succeeded", "failed"):
        return
    labels = (job.model, str(job.version))
    JOBS.labels(*labels, state).inc()
    if job.started_at is not None:
        QUEUE_WAIT.labels(*labels).observe(max(0.0, job.started_at - job.created_at))


def batch_ran(store: JobStore, found: models.ModelVersion, size: int, outcomes: Mapping[str, bytes | str]) -> None:
    """Count a batch's jobs by their outcome (outputs, or a reason they failed) and its runtime call's size;
    when this worker serves metrics, the time each job waited too (one more read of the job records)."""
    labels = (found.name, str(found.number))
    if size:
        BATCH_SIZE.labels(*labels).observe(size)
    failed = sum(isinstance(outcome, str) for outcome in outcomes.values())
    for state, count in (("succeeded", len(outcomes) - failed), ("failed", failed)):
        if count:
            JOBS.labels(*labels, state).inc(count)
    if outcomes and MetricsSettings.from_env().worker_metrics_port:
        waited = QUEUE_WAIT.labels(*labels)
        for wait in store.queue_waits(list(outcomes)):
            if wait is not None:
                waited.observe(max(0.0, wait))


@celeryd_init.connect
def _worker_starts(**_: Any) -> None:
    prepare_directory()


@worker_ready.connect
def _worker_ready(**_: Any) -> None:
    settings = MetricsSettings.from_env()
    if not settings.worker_metrics_port:
        return
    if not multiprocess_mode():
        log.warning("PROMETHEUS_MULTIPROC_DIR is not set: the metrics endpoint shows only what this worker's main "
                    "process counts, nothing of a prefork pool's processes")
    serve(settings.worker_metrics_port, settings.metrics_address)


@beat_init.connect
def _beat_starts(**_: Any) -> None:
    prepare_directory()
    settings = MetricsSettings.from_env()
    if settings.beat_metrics_port:
        serve(settings.beat_metrics_port, settings.metrics_address)


@worker_process_shutdown.connect
def _child_exits(pid: int | None = None, **_: Any) -> None:
    if multiprocess_mode():
        multiprocess.mark_process_dead(pid or os.getpid())


@task_prerun.connect
def _task_starts(task_id: str | None = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.perf_counter()


@task_postrun.connect
def _task_ends(task_id: str | None = None, task: Task | None = None, state: str | None = None, **_: Any) -> None:
    started = _started.pop(task_id, None) if task_id else None
    if task is None:
        return
    TASKS.labels(task.name, state or "UNKNOWN").inc()
    if started is not None:
        TASK_SECONDS.labels(task.name).observe(time.perf_counter() - started)


@after_task_publish.connect
def _task_sent(sender: str | None = None, routing_key: str | None = None, **_: Any) -> None:
    SENT.labels(sender or "unknown", routing_key or "").inc()
