"""The sync-async pattern: a light model's answer at once, and the heavy model's job to poll."""

from __future__ import annotations

from typing import Any

import kombu.exceptions
import redis
from flask import Blueprint, Response, current_app, request, url_for

import models
from models import answer, instances
from tasks import submission
from webapp import wire
from webapp.repository import registry, store
from webapp.responses import json_response

bp = Blueprint("pipelines", __name__)


@bp.post("/v1/pipelines/<model:name>:predict")
def predict(name: str) -> Response:
    """Queue the heavy model's job, then answer with the light model's result and the job.

    The job is queued first, so a light model that fails never costs the heavy answer; what failed
    is said in its part of the response. 200 with the light answer, 202 with only the job, 503 with neither.
    """
    pipeline = registry().pipeline(name)
    heavy = registry().get(pipeline.heavy)
    body = wire.json_object(wire.read(request))
    callback = wire.callback_url(body.pop("callback_url", None))
    inputs, rows = instances.parse(body, heavy)
    models.prepare(heavy, inputs, images=False)
    job = _queue(heavy, inputs, rows, callback)
    light = _light(pipeline.light, inputs, rows)
    status = 200 if "result" in light else 202 if "job_id" in job else 503
    headers = {"Location": job["status_url"]} if "job_id" in job else {}
    return json_response({"pipeline": name, "light": light, "heavy": job}, status, headers)


def _queue(heavy: models.ModelVersion, inputs: dict, rows: bool, callback: str | None) -> dict[str, Any]:
    part: dict[str, Any] = {"model": heavy.name, "version": heavy.number}
    extensions = current_app.extensions
    rid = wire.request_id(request.headers.get("X-Request-ID", ""))
    try:
        job = submission.submit(extensions["celery"], store(), extensions["batches"], heavy, inputs,
                                "rows" if rows else "columns", callback, rid)
    except (redis.RedisError, kombu.exceptions.OperationalError) as exc:
        return part | {"error": f"the job queue is unavailable ({type(exc).__name__}); retry shortly"}
    return part | {"job_id": job.id, "status_url": url_for("jobs.status", job_id=job.id)}


def _light(name: str, inputs: dict, rows: bool) -> dict[str, Any]:
    part: dict[str, Any] = {"model": name}
    try:
        found = registry().get(name)
        outputs = models.predict(found, inputs)
    except models.ModelError as exc:
        return part | {"error": str(exc)}
    shape = answer.rows if rows else answer.columns
    return part | {"version": found.number, "result": shape(outputs, found.spec.output_names)}
