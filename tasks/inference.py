"""Prediction tasks: thin wrappers over the one prediction entry point in `models`.

A task receives a job id; the job's inputs wait in Redis under a TTL. Bad inputs end the job
`failed` with the reason, never in a retry loop; a worker lost mid-task is retried a bounded
number of times (`task_retry_on_worker_lost`), then the job is failed with that reason.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Task, shared_task
from celery.signals import task_failure, worker_process_init

import models
from models import Registry, Settings
from models.tensor import pack, unpack
from tasks.config import TaskSettings
from tasks.jobs import JobStore

log = logging.getLogger(__name__)
_registry: Registry | None = None
_jobs: JobStore | None = None


def registry() -> Registry:
    """This worker process's model registry, made on first use (after fork)."""
    global _registry
    if _registry is None:
        _registry = Registry(Settings.from_env())
    return _registry


def jobs() -> JobStore:
    """This worker process's job store, made on first use."""
    global _jobs
    if _jobs is None:
        settings = TaskSettings.from_env()
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        _jobs = JobStore(client, settings.result_expires_s, settings.job_id_retention_s)
    return _jobs


@worker_process_init.connect
def _warm(**_: Any) -> None:
    """Load every model's session in each new worker child, so faults show at start-up."""
    registry().warm()


@shared_task(name="predict", bind=True, acks_late=True, max_retries=3, default_retry_delay=1)
def predict(self: Task, job_id: str) -> dict[str, str]:
    """Run one queued job; its outputs go to the job's record, the return value is a summary."""
    store = jobs()
    request_id = getattr(self.request, "request_id", None) or "-"
    log.info("request %s: job %s starting (attempt %d)", request_id, job_id, self.request.retries + 1)
    if not store.start(job_id):
        return {"job_id": job_id, "status": "skipped: cancelled, finished or expired"}
    inputs = store.inputs(job_id)
    job = store.get(job_id)
    try:
        if inputs is None:
            raise models.InvalidInput("the job's inputs expired before it ran")
        outputs = models.predict(registry().get(job.model, job.version), unpack(inputs))
    except models.ModelError as exc:
        store.fail(job_id, str(exc))
        log.info("request %s: job %s failed: %s", request_id, job_id, exc)
        return {"job_id": job_id, "status": "failed"}
    store.succeed(job_id, pack(outputs))
    log.info("request %s: job %s succeeded", request_id, job_id)
    return {"job_id": job_id, "status": "succeeded"}


@task_failure.connect
def _record_failure(sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None,
                    **_: Any) -> None:
    """A task that raised or whose worker was lost past its retries fails its job with the reason."""
    if sender is not None and sender.name == "predict" and task_id:
        jobs().fail(task_id, f"{type(exception).__name__}: {exception}")
