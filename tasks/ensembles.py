"""The horizontal-microservice pattern: one job per member model, each on the member's own queue.

Every member model has a queue of its own, `model.<name>`, so each can run on its own worker pool. An
ensemble request records one job per member plus the ensemble's job (which lists them), sends the
member jobs off in parallel, and its answer is read from the members' records: each member succeeded,
failed (with its reason) or, past the ensemble's member timeout, timed out; the aggregate is made from
those that answered. Partial answers are answers, never an error.

A member whose spec declares `breaker_failures` has a circuit in the web process (`tasks.circuits`): it opens
after that many member answers in a row failed or timed out, and while it is open the member's job is not sent
but failed at once, saying so, and the aggregate is made from the others.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from celery import Celery

import models
from models import answer, ensemble
from models.ensemble import EnsembleSpec
from models.tensor import pack, unpack
from tasks.circuits import Circuit, Circuits
from tasks.jobs import Job, JobStore
from tasks.status import JobStatus


def member_queue(model: str) -> str:
    """The queue of one member model."""
    return f"model.{model}"


def member_queues(specs: list[EnsembleSpec]) -> list[str]:
    """The queues of every ensemble's members, for a worker that serves them all."""
    return sorted({member_queue(m) for spec in specs for m in spec.members})


def fan_out(app: Celery, store: JobStore, spec: EnsembleSpec, versions: dict[str, models.ModelVersion],
            inputs: dict[str, np.ndarray], shape: str, request_id: str,
            skipped: Mapping[str, float] | None = None) -> Job:
    """Record and send one job per member, and record the ensemble's job that lists them; the job of a member
    in `skipped` (its circuit open, for so many seconds more) is failed, not sent."""
    packed, members = pack(inputs), {}
    for name in spec.members:
        version = versions[name]
        job, _ = store.create(name, version.number, packed, shape, request_id=request_id)
        members[name] = job.id
    ensemble_job, _ = store.create(spec.name, 0, b"", shape, request_id=request_id, members=members)
    headers = {"request_id": request_id}
    skipped = skipped or {}
    for name, job_id in members.items():
        if name in skipped:
            store.fail(job_id, f"not sent: member {name!r} keeps failing and its circuit is open "
                               f"for {math.ceil(skipped[name])} s more")
        else:
            app.tasks["predict"].apply_async(args=[job_id], queue=member_queue(name), headers=headers)
    return ensemble_job


def member_circuit(circuits: Circuits, version: models.ModelVersion) -> Circuit | None:
    """The circuit of a member version, if its spec declares one."""
    limits = version.spec.limits
    if limits is None or limits.breaker_failures is None:
        return None
    return circuits.get(f"member {version.key}", limits.breaker_failures, limits.breaker_reset_s)


def shut(circuits: Circuits, versions: dict[str, models.ModelVersion]) -> dict[str, float]:
    """The members whose circuit is open, with the seconds each stays so."""
    waits = {name: (c.retry_after() if (c := member_circuit(circuits, v)) else 0.0) for name, v in versions.items()}
    return {name: wait for name, wait in waits.items() if wait > 0}


def record(circuits: Circuits, versions: dict[str, models.ModelVersion], result: dict[str, Any],
           skipped: Mapping[str, float]) -> None:
    """Tell each sent member's circuit whether it answered: failing and timing out count against it."""
    for name, part in result["members"].items():
        circuit = member_circuit(circuits, versions[name])
        if circuit is None or name in skipped:
            continue
        if part["status"] == "succeeded":
            circuit.succeeded()
        else:
            circuit.failed(models.ModelFailed(part["error"]))


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
