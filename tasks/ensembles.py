"""The horizontal-microservice pattern: one job per member model, each on the member's own queue.

Every member model has a queue of its own, `model.<name>`, so each can run on its own worker pool. An
ensemble request records one job per member plus the ensemble's job (which lists them), sends the
member jobs off in parallel, and its answer is read from the members' records: each member succeeded,
failed (with its reason) or, past the ensemble's member timeout, timed out; the aggregate is made from
those that answered. Partial answers are answers, never an error.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from celery import Celery

import models
from models import answer, ensemble
from models.ensemble import EnsembleSpec
from models.tensor import pack, unpack
from tasks.jobs import Job, JobStore
from tasks.status import JobStatus


def member_queue(model: str) -> str:
    """The queue of one member model."""
    return f"model.{model}"


def member_queues(specs: list[EnsembleSpec]) -> list[str]:
    """The queues of every ensemble's members, for a worker that serves them all."""
    return sorted({member_queue(m) for spec in specs for m in spec.members})


def fan_out(app: Celery, store: JobStore, spec: EnsembleSpec, versions: dict[str, models.ModelVersion],
            inputs: dict[str, np.ndarray], shape: str, request_id: str) -> Job:
    """Record and send one job per member, and record the ensemble's job that lists them."""
    packed, members = pack(inputs), {}
    for name in spec.members:
        version = versions[name]
        job, _ = store.create(name, version.number, packed, shape, request_id=request_id)
        members[name] = job.id
    ensemble_job, _ = store.create(spec.name, 0, b"", shape, request_id=request_id, members=members)
    headers = {"request_id": request_id}
    for name, job_id in members.items():
        app.tasks["predict"].apply_async(args=[job_id], queue=member_queue(name), headers=headers)
    return ensemble_job


def outcome(store: JobStore, spec: EnsembleSpec, job: Job, labels: dict[str, tuple[str, ...]]) -> dict[str, Any] | None:
    """The ensemble's answer once every member has answered or timed out; None while any may still answer."""
    waited = time.time() - job.created_at
    parts: dict[str, dict[str, Any]] = {}
    scores: dict[str, np.ndarray] = {}
    for name, member_id in (job.members or {}).items():
        member = store.get(member_id)
        late = member.finished_at is not None and member.finished_at - job.created_at > spec.member_timeout_s
        if member.status is JobStatus.SUCCEEDED and not late:
            outputs = unpack(store.outputs(member_id) or b"")
            scores[name] = np.asarray(outputs[ensemble.SCORES])
            shaped = answer.rows if job.shape == "rows" else answer.columns
            parts[name] = {"status": "succeeded", "result": shaped(outputs, list(outputs))}
        elif member.status is JobStatus.FAILED and not late:
            parts[name] = {"status": "failed", "error": member.error}
        elif waited > spec.member_timeout_s or late:
            parts[name] = {"status": "timed_out", "error": f"no answer within {spec.member_timeout_s * 1000:g} ms"}
        else:
            return None
    return {
        "ensemble": spec.name,
        "aggregate": spec.aggregate,
        "predictions": ensemble.combine(spec, labels, scores),
        "members": parts,
        "failed": [n for n, p in parts.items() if p["status"] == "failed"],
        "timed_out": [n for n, p in parts.items() if p["status"] == "timed_out"],
    }


def wait(store: JobStore, spec: EnsembleSpec, job: Job, labels: dict[str, tuple[str, ...]]) -> dict[str, Any] | None:
    """Poll the members until the answer is complete or the ensemble's overall timeout passes (then None)."""
    deadline = job.created_at + spec.timeout_s
    while True:
        found = outcome(store, spec, job, labels)
        if found is not None or time.time() > deadline:
            return found
        time.sleep(0.002)
