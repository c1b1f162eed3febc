"""Submitting a job: record it, then send the one message that gets it run."""

from __future__ import annotations

import numpy as np
from celery import Celery

import models
from models.tensor import pack
from tasks.jobs import Job, JobStore
from tasks.lanes import BatchQueue, Lane, send


def submit(app: Celery, store: JobStore, queue: BatchQueue | None, version: models.ModelVersion,
           inputs: dict[str, np.ndarray], shape: str, callback_url: str | None, request_id: str) -> Job:
    """Record a job and queue its first stage: `preprocess` for encoded images, else its batch lane or
    its own `predict` task. The record and the lane push are one Redis round trip."""
    lane = Lane(version.name, version.number)
    images = models.has_encoded_images(version, inputs)
    lanes = _lanes(queue, version, images)
    job, armed = store.create(version.name, version.number, pack(inputs), shape, callback_url, request_id,
                              lanes.push_for(lane) if lanes is not None else None)
    headers = {"request_id": request_id}
    try:
        if images:
            app.tasks["preprocess"].apply_async(args=[job.id], queue="prep", headers=headers)
        else:
            send(app, lane, job.id, headers, batched=lanes is not None, armed=bool(armed))
    except Exception:
        store.delete(job.id)
        if armed:  # no batcher was sent: let the next job arm the lane again
            lanes.disarm_now(lane)
        raise
    return job


def waiting(store: JobStore, queue: BatchQueue | None, version: models.ModelVersion,
            inputs: dict[str, np.ndarray]) -> int:
    """How many jobs wait where a job of these inputs would go: the version's batch lane (its own jobs only),
    else the Celery queue it is sent on, `prep` or `predict` (shared with every model it carries)."""
    images = models.has_encoded_images(version, inputs)
    lanes = _lanes(queue, version, images)
    if lanes is not None:
        return lanes.waiting(Lane(version.name, version.number))
    return store.client.llen("prep" if images else "predict")  # kombu's Redis transport: a queue is a list


def _lanes(queue: BatchQueue | None, version: models.ModelVersion, images: bool) -> BatchQueue | None:
    """The batch queue a job goes through, or None when it is sent as a task of its own."""
    return queue if queue is not None and not images and version.spec.options.max_batch_size > 1 else None
