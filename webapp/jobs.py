"""The asynchronous pattern's job API: submit a prediction, poll it, cancel it."""

from __future__ import annotations

import datetime

from flask import Blueprint, Response, current_app, request, url_for

import models
from models.tensor import pack, unpack
from tasks.jobs import Job, JobStore
from tasks.status import JobStatus
from webapp import tfserving_codec, wire
from webapp.errors import Conflict
from webapp.repository import registry
from webapp.responses import json_response

bp = Blueprint("jobs", __name__)


@bp.post("/v1/models/<model:name>:submit")
@bp.post("/v1/models/<model:name>/versions/<int:version>:submit")
def submit(name: str, version: int | None = None) -> Response:
    """Queue a prediction; the body is the same as `:predict`'s. Answers 202 with the job's id."""
    found = registry().get(name, version)
    inputs, rows = tfserving_codec.parse(wire.json_object(wire.read(request)), found)
    models.prepare(found, inputs, images=False)
    job = store().create(found.name, found.number, pack(inputs), "rows" if rows else "columns")
    try:
        current_app.extensions["celery"].tasks["predict"].apply_async(args=[job.id], task_id=job.id, queue="predict")
    except Exception:
        store().delete(job.id)
        raise
    location = url_for("jobs.status", job_id=job.id)
    return json_response({"job_id": job.id, "status_url": location}, 202, {"Location": location})


@bp.get("/v1/jobs/<job_id>")
def status(job_id: str) -> Response:
    """A job's state, timestamps, and its result or error."""
    return json_response(_public(store().get(job_id)))


@bp.delete("/v1/jobs/<job_id>")
def cancel(job_id: str) -> Response:
    """Cancel a job that has not started; 409 once it has."""
    jobs = store()
    job = jobs.get(job_id)
    if not jobs.cancel(job_id):
        raise Conflict(f"job {job_id} is {jobs.get(job_id).status}; only a queued job can be cancelled")
    return json_response(_public(jobs.get(job.id)))


def store() -> JobStore:
    """The job store `create_app` attached to the current app."""
    return current_app.extensions["jobs"]


def _public(job: Job) -> dict:
    body = {
        "job_id": job.id, "status": job.status.value, "model": job.model, "version": job.version,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at), "finished_at": _iso(job.finished_at),
    }
    if job.status is JobStatus.SUCCEEDED:
        outputs = unpack(store().outputs(job.id) or b"")
        shape = tfserving_codec.predictions if job.shape == "rows" else tfserving_codec.columnar
        body["result"] = shape(outputs, list(outputs))
    elif job.status is JobStatus.FAILED:
        body["error"] = job.error
    return body


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat(timespec="milliseconds")
