"""The asynchronous pattern's job API: submit a prediction, poll it, cancel it."""

from __future__ import annotations

import logging

import numpy as np
from celery import Celery
from flask import Blueprint, Response, current_app, request

import models
from models import instances
from tasks import submission
from tasks.jobs import JobStore
from tasks.lanes import BatchQueue
from webapp import data, ensembles, guard, wire
from webapp.errors import BadRequest, Conflict
from webapp.repository import registry, store
from webapp.responses import json_response

bp = Blueprint("jobs", __name__)
log = logging.getLogger(__name__)


class Enqueue:
    """Queues a prediction as a job of a model version: for `:submit`, and for the data plane's batch latency
    class (`X-Latency-Class: batch` to a model whose routing queues it)."""

    def __init__(self, celery: Celery, jobs: JobStore, batches: BatchQueue | None):
        self.celery, self.jobs, self.batches = celery, jobs, batches

    def __call__(self, found: models.ModelVersion, inputs: dict[str, np.ndarray], rows: bool,
                 callback: str | None, request_id: str) -> tuple[dict, dict[str, str]]:
        """Queue the job (429 past the version's queue limit); the body and headers of its 202 answer."""
        models.prepare(found, inputs, images=False)
        guard.check_queue(self.jobs, self.batches, found, inputs)
        job = submission.submit(self.celery, self.jobs, self.batches, found, inputs, "rows" if rows else "columns",
                                callback, request_id)
        log.info("request %s: job %s queued for %s version %d", request_id, job.id, found.name, found.number)
        location = f"/v1/jobs/{job.id}"
        return {"job_id": job.id, "status_url": location}, {"Location": location, "X-Request-ID": request_id}


@bp.post("/v1/models/<model:name>:submit")
@bp.post("/v1/models/<model:name>/versions/<int:version>:submit")
def submit(name: str, version: int | None = None) -> Response:
    """Queue a prediction; the body is the same as `:predict`'s. Answers 202 with the job's id."""
    found = registry().get(name, version)
    if request.mimetype == "multipart/form-data":
        inputs, rows, callback = _uploads(found), True, request.form.get("callback_url")
    else:
        body = wire.json_object(wire.read(request), found.spec.max_request_values)
        callback = body.pop("callback_url", None)
        inputs, rows = data.parse(current_app.extensions["data"], found, body)  # or stored inputs, by id
    rid = wire.request_id(request.headers.get("X-Request-ID", ""))
    job, headers = current_app.extensions["enqueue"](found, inputs, rows, wire.callback_url(callback), rid)
    return json_response(job, 202, headers)


@bp.get("/v1/jobs/<job_id>")
def status(job_id: str) -> Response:
    """A job's state, timestamps, and its result or error."""
    jobs = store()
    job = jobs.get(job_id)
    if job.members:
        return json_response(ensembles.public(job))
    return json_response(jobs.public(job))


@bp.delete("/v1/jobs/<job_id>")
def cancel(job_id: str) -> Response:
    """Cancel a job that has not started; 409 once it has."""
    jobs = store()
    job = jobs.get(job_id)
    if not jobs.cancel(job_id):
        raise Conflict(f"job {job_id} is {jobs.get(job_id).status}; only a queued job can be cancelled")
    return json_response(jobs.public(jobs.get(job.id)))


def _uploads(found: models.ModelVersion) -> dict[str, np.ndarray]:
    """Uploaded files as the encoded images of the model's image input, one instance per file."""
    files = [f.read() for f in request.files.values()]
    if not files:
        raise BadRequest("the multipart body holds no file")
    return instances.encoded(found, files)
