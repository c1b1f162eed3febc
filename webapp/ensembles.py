"""The horizontal-microservice pattern: member models run in parallel, each on its own queue."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, request, url_for

import models
from models import instances
from models.ensemble import EnsembleSpec
from tasks import ensembles
from tasks.jobs import Job
from webapp import guard, wire
from webapp.repository import registry, store
from webapp.responses import json_response

bp = Blueprint("ensembles", __name__)


@bp.post("/v1/ensembles/<model:name>:predict")
def predict(name: str) -> Response:
    """Every member's answer, the aggregate, and which members failed or timed out; 202 with a job
    to poll when the ensemble's overall timeout passes first."""
    spec = registry().ensemble(name)
    versions = {member: registry().get(member) for member in spec.members}
    first = versions[spec.members[0]]
    inputs, rows = instances.parse(wire.json_object(wire.read(request)), first)
    models.prepare(first, inputs, images=False)
    circuits, shut = guard.member_circuits(versions)
    job = ensembles.fan_out(current_app.extensions["celery"], store(), spec, versions, inputs,
                            "rows" if rows else "columns", wire.request_id(request.headers.get("X-Request-ID", "")),
                            shut)
    result = ensembles.wait(store(), spec, job, _labels(spec))
    if result is None:
        location = url_for("jobs.status", job_id=job.id)
        return json_response({"job_id": job.id, "status_url": location}, 202, {"Location": location})
    ensembles.record(circuits, versions, result, shut)
    return json_response(result)


def public(job: Job) -> dict[str, Any]:
    """An ensemble's job as `GET /v1/jobs/{id}` shows it: running until every member answered or timed out."""
    spec = registry().ensemble(job.model)
    result = ensembles.outcome(store(), spec, job, _labels(spec))
    body = store().public(job) | {"status": "running" if result is None else "succeeded", "version": None}
    if result is not None:
        body["result"] = result
    return body


def _labels(spec: EnsembleSpec) -> dict[str, tuple[str, ...]]:
    return {member: registry().get(member).spec.labels for member in spec.members}
