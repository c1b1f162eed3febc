"""Prediction tasks: thin wrappers over the one prediction entry point in `models`.

The prep-pred pattern: a job with encoded images first runs `preprocess` on the `prep` queue, which
decodes them into tensors that replace the job's inputs in Redis, then `predict` on the `predict`
queue; each queue can have its own worker pool. A task receives only the job id. Bad inputs end the
job `failed` with the reason, never in a retry loop; a worker lost mid-task is retried a bounded
number of times (`task_retry_on_worker_lost`), then the job is failed with that reason. A task that
meets Redis down gives its message back unacknowledged (requeued, or delivered again after the
visibility timeout), so an outage fails no job.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import kombu.exceptions
import numpy as np
import redis
from celery import Task, shared_task
from celery.exceptions import Reject
from celery.signals import task_failure

import models
from models.tensor import pack, unpack
from tasks import metrics, prediction_log
from tasks.jobs import Job
from tasks.lanes import BatchQueue, Lane, dispatch, fill, hand_on, split
from tasks.resources import batches, jobs, registry

log = logging.getLogger(__name__)
STAGES = {"preprocess", "predict"}
STAGE: dict[str, Any] = {
    "bind": True, "acks_late": True, "ignore_result": True,  # the job's record holds the outcome
    "max_retries": 3, "default_retry_delay": 1,  # a worker lost mid-task: retried soon, a bounded number of times
}
Work = Callable[[Job, models.ModelVersion, dict[str, np.ndarray]], str]
OUTAGE = (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError)
"""What a task meets while Redis is down or restarting."""


@shared_task(name="preprocess", **STAGE)
def preprocess(self: Task, job_id: str) -> dict[str, str]:
    """Decode a job's images into the tensors its model takes, then queue its prediction."""

    def work(job: Job, version: models.ModelVersion, inputs: dict[str, np.ndarray]) -> str:
        jobs().replace_inputs(job.id, pack(models.prepare(version, inputs)))
        dispatch(self.app, batch_queue(version), Lane(job.model, job.version), job.id,
                 {"request_id": _request_id(self)})
        return "preprocessed"

    return _stage(self, job_id, work)


@shared_task(name="predict", **STAGE)
def predict(self: Task, job_id: str) -> dict[str, str]:
    """Run one queued job; its outputs go to the job's record, the return value is a summary."""

    def work(job: Job, version: models.ModelVersion, inputs: dict[str, np.ndarray]) -> str:
        outputs = models.predict(version, inputs)
        jobs().succeed(job.id, pack(outputs))
        prediction_log.log_job(version, job, inputs, outputs)
        _call_back(self, job.id, job.callback_url)
        return "succeeded"

    return _stage(self, job_id, work)


@shared_task(name="predict_batch", **STAGE)
def predict_batch(self: Task, model: str, version: int) -> dict[str, int]:
    """Run the jobs waiting in one model version's lane, a batch at a time, while they keep coming, for one
    turn; then leave the lane, to a successor if jobs still wait."""
    lane, queue = Lane(model, version), batches()
    if queue is None:
        return {"jobs": 0}
    try:
        found = registry().get(model, version)
    except models.ModelError as exc:
        return {"jobs": _fail_lane(self, queue, lane, str(exc))}
    with _given_back_in_outage():
        _put_back(self, queue, queue.release(self.request.id))  # an earlier delivery of this batcher was lost
        return {"jobs": _serve(self, queue, lane, found, (self.request.time_limit or self.time_limit) / 4)}


def _serve(task: Task, queue: BatchQueue, lane: Lane, found: models.ModelVersion, turn_s: float) -> int:
    """Take and run batches until the lane is empty or `turn_s` has passed; then hand it on. Answer the jobs run."""
    options, holder = found.spec.options, task.request.id
    count, helped, until = 0, False, time.monotonic() + turn_s
    while time.monotonic() < until:
        fill(queue, lane, options.max_batch_size, options.max_batch_delay_ms / 1000)
        taken = queue.take(lane, options.max_batch_size, holder)
        if not taken:
            if queue.disarm(lane):
                return count
            continue  # jobs came while it was leaving
        if not helped and queue.waiting(lane) >= options.max_batch_size:
            helped = True  # a backlog: let one more worker process take batches of this lane too
            task.app.tasks["predict_batch"].apply_async(args=[lane.model, lane.version], queue="predict")
        count += _run_batch(task, found, taken)
        queue.done(lane, taken, holder)
    if hand_on(task.app, queue, lane):
        log.info("batcher of %s version %d hands the lane on after %d jobs", lane.model, lane.version, count)
    return count


@shared_task(name="reclaim_batches", bind=True, ignore_result=True)
def reclaim_batches(self: Task) -> dict[str, int]:
    """Put back in line the batched jobs a lost worker took and never finished."""
    queue = batches()
    if queue is None:
        return {"reclaimed": 0, "lanes restarted": 0}
    count = _put_back(self, queue, queue.reclaim(queue.lease_ms / 1000))
    lanes = queue.idle()
    for lane in lanes:
        self.app.tasks["predict_batch"].apply_async(args=[lane.model, lane.version], queue="predict")
    return {"reclaimed": count, "lanes restarted": len(lanes)}


def _put_back(task: Task, queue: BatchQueue, held: list[tuple[Lane, str]]) -> int:
    """Queue again the unfinished ones of jobs a lost batcher held; answer how many."""
    store, count = jobs(), 0
    for lane, job_id in held:
        with contextlib.suppress(LookupError):
            if not store.get(job_id).status.finished:
                dispatch(task.app, queue, lane, job_id, {})
                count += 1
    if count:
        log.warning("put back %d batched jobs whose worker was lost", count)
    return count


def batch_queue(version: models.ModelVersion) -> BatchQueue | None:
    """The batch queue a version's jobs go through, or None when it is not batched."""
    return batches() if version.spec.options.max_batch_size > 1 else None


def _run_batch(task: Task, found: models.ModelVersion, taken: list[str]) -> int:
    """Run the taken jobs in one call; if the runtime refuses the batch, run them one by one."""
    store = jobs()
    starts = dict(zip(taken, store.start_many(taken), strict=True))
    for job_id in [i for i, started in starts.items() if started < 0]:
        _call_back(task, job_id, store.get(job_id).callback_url)
    ids = [job_id for job_id, started in starts.items() if started > 0]
    packed = dict(zip(ids, store.inputs_many(ids), strict=True))
    expired = "the job's inputs expired before it ran"
    outcomes: dict[str, bytes | str] = {i: expired for i, data in packed.items() if data is None}
    pairs = [(i, unpack(data)) for i, data in packed.items() if data is not None]
    if pairs:
        try:
            batch = {name: np.concatenate([inputs[name] for _, inputs in pairs]) for name in pairs[0][1]}
            results = split(models.predict(found, batch), [len(next(iter(inputs.values()))) for _, inputs in pairs])
        except (models.ModelError, ValueError, KeyError) as exc:
            log.info("batch of %d jobs refused (%s); running them one by one", len(pairs), exc)
            results = [_alone(found, inputs) for _, inputs in pairs]
        outcomes |= {i: r if isinstance(r, str) else pack(r) for (i, _), r in zip(pairs, results, strict=True)}
        prediction_log.log_batch(found, store, pairs, results)
    for job_id, callback_url, request_id in store.finish_many(list(outcomes.items())):
        log.info("request %s: job %s finished in a batch", request_id or "-", job_id)
        _call_back(task, job_id, callback_url)
    metrics.batch_ran(store, found, len(pairs), outcomes)
    log.info("batch of %d jobs for %s version %d done", len(outcomes), found.name, found.number)
    return len(outcomes)


def _alone(found: models.ModelVersion, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | str:
    """One job's outputs, or the reason it failed."""
    try:
        return models.predict(found, inputs)
    except models.ModelError as exc:
        return str(exc)


def _fail_lane(task: Task, queue: BatchQueue, lane: Lane, reason: str) -> int:
    """Fail every job waiting in a lane whose model cannot serve."""
    store, count = jobs(), 0
    while taken := queue.take(lane, 100, task.request.id):
        for job_id in taken:
            if store.fail(job_id, reason):
                _call_back(task, job_id, store.get(job_id).callback_url)
            count += 1
        queue.done(lane, taken, task.request.id)
    queue.disarm(lane)
    return count


@contextlib.contextmanager
def _given_back_in_outage() -> Iterator[None]:
    """Give the task's message back, unacknowledged, if Redis fails under it: it is requeued at once, or, if
    Redis cannot take even that, delivered again after the visibility timeout. Nothing can be recorded while
    Redis is down, so the message is what keeps the job."""
    try:
        yield
    except OUTAGE as exc:
        log.warning("Redis failed under the task (%s); its message goes back to be delivered again", exc)
        raise Reject(exc, requeue=True) from exc


def _stage(task: Task, job_id: str, work: Work) -> dict[str, str]:
    """Run one stage of a job; if Redis fails under it, give its message back."""
    with _given_back_in_outage():
        return _run_stage(task, job_id, work)


def _run_stage(task: Task, job_id: str, work: Work) -> dict[str, str]:
    """Start a job's stage, do the work on its inputs, fail it with the reason if they are bad."""
    store, request_id = jobs(), _request_id(task)
    log.info("request %s: job %s %s (attempt %d)", request_id, job_id, task.name, task.request.retries + 1)
    started = store.start(job_id)
    if started < 0:
        _call_back(task, job_id, store.get(job_id).callback_url)
    if started <= 0:
        return {"job_id": job_id, "status": "skipped: cancelled, finished, expired or given up"}
    job = store.get(job_id)
    try:
        inputs = store.inputs(job_id)
        if inputs is None:
            raise models.InvalidInput("the job's inputs expired before it ran")
        status = work(job, registry().get(job.model, job.version), unpack(inputs))
    except models.ModelError as exc:
        store.fail(job_id, str(exc))
        _call_back(task, job.id, job.callback_url)
        status = f"failed: {exc}"
    metrics.job_ended(job, status)
    log.info("request %s: job %s %s", request_id, job_id, status)
    return {"job_id": job_id, "status": status}


def _request_id(task: Task) -> str:
    return getattr(task.request, "request_id", None) or "-"


def _call_back(task: Task, job_id: str, callback_url: str | None) -> None:
    """Queue the delivery of a finished job to its callback URL, if it has one."""
    if callback_url:
        task.app.tasks["deliver_callback"].apply_async(args=[job_id], queue="callbacks")


@task_failure.connect
def _record_failure(sender: Task | None = None, task_id: str | None = None, args: tuple | None = None,
                    exception: BaseException | None = None, **_: Any) -> None:
    """A stage that raised or whose worker was lost past its retries fails its job with the reason; a batcher
    that did puts back the jobs it held and hands its lane on, so the lane is never left armed with no batcher."""
    if sender is not None and sender.name in STAGES and args:
        store = jobs()
        if store.fail(args[0], f"{type(exception).__name__}: {exception}"):
            _call_back(sender, args[0], store.get(args[0]).callback_url)
    elif sender is not None and sender.name == "predict_batch" and args and task_id:
        _repair(sender, Lane(*args), task_id, exception)


def _repair(task: Task, lane: Lane, holder: str, exception: BaseException | None) -> None:
    """Put back what a failed batcher held and hand its lane on."""
    queue = batches()
    if queue is None:
        return
    log.warning("batcher of %s version %d ended with %r; its lane is handed on", lane.model, lane.version, exception)
    _put_back(task, queue, queue.release(holder))
    hand_on(task.app, queue, lane)
