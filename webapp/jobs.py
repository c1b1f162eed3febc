"""The asynchronous pattern's job API: submit a prediction, poll it, cancel it."""

from __future__ import annotations

import logging

import numpy as np
from flask import Blueprint, Response, current_app, request, url_for

import models
from models import instances
from tasks import submission
from webapp import data, ensembles, guard, wire
from webapp.errors import BadRequest, Conflict
from webapp.repository import registry, store
from webapp.responses import json_response

bp = Blueprint("jobs", __name__)
log = logging.getLogger(__name__)


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
    models.prepare(found, inputs, images=False)
    rid, extensions = wire.request_id(request.headers.get("X-Request-ID", "")), current_app.extensions
    guard.check_queue(store(), extensions["batches"], found, inputs)
    job = submission.submit(extensions["celery"], store(), extensions["batches"], found, inputs,
                            "rows" if rows else "columns", wire.callback_url(callback), rid)
    log.info("request %s: job %s queued for %s version %d", rid, job.id, found.name, found.number)
    location = url_for("jobs.status", job_id=job.id)
    headers = {"Location": location, "X-Request-ID": rid}
    return json_response({"job_id": job.id, "status_url": location}, 202, headers)


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
