"""The batch pattern's API: register items in bulk, trigger runs, follow their progress and history."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, request, url_for

import models
from models import instances
from tasks.items import ItemStore
from tasks.runs import RunRefused, RunStore
from tasks.status import JobStatus
from webapp import wire
from webapp.errors import BadRequest, PayloadTooLarge
from webapp.repository import registry
from webapp.responses import json_response

bp = Blueprint("batch", __name__)
MAX_ID = 2**63 - 1
MAX_PAGE, MAX_PER_PAGE = 1_000_000, 1000


@bp.post("/v1/batch/items")
def register() -> Response:
    """Store items to predict in the model's next run: one per instance, checked against its inputs."""
    body = wire.json_object(wire.read(request))
    found = registry().get(wire.model_name(body), wire.version_number(body))
    given = body.get("instances")
    if set(body) - {"model", "version", "instances"} or not isinstance(given, list) or not given:
        raise BadRequest("a batch registration is {\"model\", \"version\"?, \"instances\": [...]}, "
                         "each instance as :predict takes it in the row format")
    limit = current_app.config["BATCH_MAX_ITEMS"]
    if len(given) > limit:
        raise PayloadTooLarge(f"{len(given)} items in one request; register at most {limit} at a time")
    models.prepare(found, instances.parse({"instances": given}, found)[0], images=False)
    nonfinite = any(t.allow_nonfinite for t in found.spec.inputs)
    ids = _items().register(found.name, found.number, [instances.encode(i, nonfinite) for i in given])
    return json_response({"model": found.name, "version": found.number, "count": len(ids), "ids": ids}, 201)


@bp.get("/v1/batch/items/<int:item_id>")
def item(item_id: int) -> Response:
    """One item: its status, attempts, and its prediction or error."""
    return json_response(_items().get(min(item_id, MAX_ID)))


@bp.get("/v1/batch/items")
def list_items() -> Response:
    """Items, newest first, filtered by `model` and `status`, a page at a time."""
    status = request.args.get("status")
    if status is not None and status not in JobStatus.__members__.values():
        raise BadRequest(f"status must be one of {', '.join(s.value for s in JobStatus)}")
    page, per_page = _paging()
    found, total = _items().page(request.args.get("model"), status, page, per_page)
    return json_response({"items": found, **_links("batch.list_items", page, per_page, total)})


@bp.post("/v1/batch/runs")
def trigger() -> Response:
    """Start a run of a model now; 409 while it has one queued or running."""
    body = wire.json_object(wire.read(request))
    if set(body) - {"model"}:
        raise BadRequest(f"unknown field {sorted(set(body) - {'model'})[0]!r}; a run takes {{\"model\"}}")
    name = registry().get(wire.model_name(body)).name
    try:
        run = _runs().create(name, "api")
    except RunRefused as exc:
        return json_response({"error": str(exc), "run_id": exc.active}, 409)
    try:
        current_app.extensions["celery"].tasks["batch_run"].apply_async(args=[run.id], queue="batch")
    except Exception as exc:
        _runs().fail(run.id, f"could not be queued: {exc}")
        raise
    location = url_for("batch.run", run_id=run.id)
    return json_response({"run_id": run.id, "status_url": location}, 202, {"Location": location})


@bp.get("/v1/batch/runs/<int:run_id>")
def run(run_id: int) -> Response:
    """A run's state and progress: total, done, failed, rows/s, estimated seconds left."""
    return json_response(_runs().get(min(run_id, MAX_ID)).public())


@bp.get("/v1/batch/runs")
def history() -> Response:
    """The run history, newest first, optionally of one `model`, a page at a time."""
    page, per_page = _paging()
    found, total = _runs().page(request.args.get("model"), page, per_page)
    return json_response({"runs": [r.public() for r in found], **_links("batch.history", page, per_page, total)})


def _paging() -> tuple[int, int]:
    values = []
    for name, default, most in (("page", 1, MAX_PAGE), ("per_page", 100, MAX_PER_PAGE)):
        text = request.args.get(name, str(default))
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:
            raise BadRequest(f"{name!r} must be a whole number from 1 to {most}")
        values.append(int(text))
    return values[0], values[1]


def _links(endpoint: str, page: int, per_page: int, total: int) -> dict[str, Any]:
    args = {k: v for k, v in request.args.items() if k not in ("page", "per_page")}
    more = page * per_page < total
    following = url_for(endpoint, **args, page=page + 1, per_page=per_page) if more else None
    return {"page": page, "per_page": per_page, "total": total, "next": following}


def _items() -> ItemStore:
    return current_app.extensions["items"]


def _runs() -> RunStore:
    return current_app.extensions["runs"]
