"""Prediction tasks: thin wrappers over the one prediction entry point in `models`.

The prep-pred pattern: a job with encoded images first runs `preprocess` on the `prep` queue, which
decodes them into tensors that replace the job's inputs in Redis, then `predict` on the `predict`
queue; each queue can have its own worker pool. A task receives only the job id. Bad inputs end the
job `failed` with the reason, never in a retry loop; a worker lost mid-task is retried a bounded
number of times (`task_retry_on_worker_lost`), then the job is failed with that reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from celery import Task, shared_task
from celery.signals import task_failure

import models
from models.tensor import pack, unpack
from tasks.jobs import Job
from tasks.resources import jobs, registry

log = logging.getLogger(__name__)
STAGES = {"preprocess", "predict"}
Work = Callable[[Job, models.ModelVersion, dict[str, np.ndarray]], str]


@shared_task(name="preprocess", bind=True, acks_late=True, max_retries=3, default_retry_delay=1)
def preprocess(self: Task, job_id: str) -> dict[str, str]:
    """Decode a job's images into the tensors its model takes, then queue its prediction."""

    def work(job: Job, version: models.ModelVersion, inputs: dict[str, np.ndarray]) -> str:
        jobs().replace_inputs(job.id, pack(models.prepare(version, inputs)))
        self.app.tasks["predict"].apply_async(args=[job.id], queue="predict",
                                              headers={"request_id": _request_id(self)})
        return "preprocessed"

    return _stage(self, job_id, work)


@shared_task(name="predict", bind=True, acks_late=True, max_retries=3, default_retry_delay=1)
def predict(self: Task, job_id: str) -> dict[str, str]:
    """Run one queued job; its outputs go to the job's record, the return value is a summary."""

    def work(job: Job, version: models.ModelVersion, inputs: dict[str, np.ndarray]) -> str:
        jobs().succeed(job.id, pack(models.predict(version, inputs)))
        _call_back(self, job)
        return "succeeded"

    return _stage(self, job_id, work)


def _stage(task: Task, job_id: str, work: Work) -> dict[str, str]:
    """Run one stage of a job: start it, do the work on its inputs, fail it with the reason if they are bad."""
    store, request_id = jobs(), _request_id(task)
    log.info("request %s: job %s %s (attempt %d)", request_id, job_id, task.name, task.request.retries + 1)
    if not store.start(job_id):
        return {"job_id": job_id, "status": "skipped: cancelled, finished or expired"}
    job = store.get(job_id)
    try:
        inputs = store.inputs(job_id)
        if inputs is None:
            raise models.InvalidInput("the job's inputs expired before it ran")
        status = work(job, registry().get(job.model, job.version), unpack(inputs))
    except models.ModelError as exc:
        store.fail(job_id, str(exc))
        _call_back(task, job)
        status = f"failed: {exc}"
    log.info("request %s: job %s %s", request_id, job_id, status)
    return {"job_id": job_id, "status": status}


def _request_id(task: Task) -> str:
    return getattr(task.request, "request_id", None) or "-"


def _call_back(task: Task, job: Job) -> None:
    """Queue the delivery of a finished job to its callback URL, if it has one."""
    if job.callback_url:
        task.app.tasks["deliver_callback"].apply_async(args=[job.id], queue="callbacks")


@task_failure.connect
def _record_failure(sender: Task | None = None, args: tuple | None = None, exception: BaseException | None = None,
                    **_: Any) -> None:
    """A stage that raised or whose worker was lost past its retries fails its job with the reason."""
    if sender is not None and sender.name in STAGES and args:
        store = jobs()
        if store.fail(args[0], f"{type(exception).__name__}: {exception}"):
            _call_back(sender, store.get(args[0]))
