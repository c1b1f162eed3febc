"""Prediction tasks: thin wrappers over the one prediction entry point in `models`.

A task receives a job id; the job's inputs wait in Redis under a TTL. Bad inputs end the job
`failed` with the reason, never in a retry loop; a worker lost mid-task is retried a bounded
number of times (`task_retry_on_worker_lost`), then the job is failed with that reason.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task, shared_task
from celery.signals import task_failure

import models
from models.tensor import pack, unpack
from tasks.callbacks import deliver_callback
from tasks.resources import jobs, registry

log = logging.getLogger(__name__)


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
        _call_back(job.callback_url, job_id)
        return {"job_id": job_id, "status": "failed"}
    store.succeed(job_id, pack(outputs))
    log.info("request %s: job %s succeeded", request_id, job_id)
    _call_back(job.callback_url, job_id)
    return {"job_id": job_id, "status": "succeeded"}


def _call_back(url: str | None, job_id: str) -> None:
    """Queue the delivery of a finished job to its callback URL, if it has one."""
    if url:
        deliver_callback.apply_async(args=[job_id], queue="callbacks")


@task_failure.connect
def _record_failure(sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None,
                    **_: Any) -> None:
    """A task that raised or whose worker was lost past its retries fails its job with the reason."""
    if sender is not None and sender.name == "predict" and task_id:
        store = jobs()
        if store.fail(task_id, f"{type(exception).__name__}: {exception}"):
            _call_back(store.get(task_id).callback_url, task_id)
