"""The data cache pattern's API: store raw inputs by id, and warm their preprocessed tensors."""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, request, url_for

from models import ModelVersion, image, instances
from webapp import wire
from webapp.datastore import DataStore
from webapp.errors import BadRequest, PayloadTooLarge
from webapp.repository import registry
from webapp.responses import json_response

bp = Blueprint("data", __name__)
MAX_IDS = 1000
CONTENT_TYPE_MAX = 100
"""The length of the SQL store's content-type column."""


@bp.post("/v1/data")
def put() -> Response:
    """Store one raw input: an image (a file upload, a raw image body, or JSON `{"b64"}`), or JSON
    `{"instance": ...}` (one instance as `:predict` takes it). Answers 201 with its `data_id`."""
    if request.mimetype == "multipart/form-data":
        files = list(request.files.values())
        if len(files) != 1:
            raise BadRequest(f"send exactly one file, not {len(files)}")
        kind, content, content_type = "image", files[0].read(), files[0].mimetype or "application/octet-stream"
    elif request.mimetype.startswith("image/") or request.mimetype == "application/octet-stream":
        kind, content, content_type = "image", wire.decode(
            request.get_data(), request.headers.get("Content-Encoding", ""), current_app.config["MAX_CONTENT_LENGTH"]
        ), request.mimetype
    else:
        kind, content, content_type = _json_input(wire.json_object(wire.read(request)))
    _check_storable(content, content_type)
    if kind == "image":
        image.identify(content)
    record = _store().put(kind, content, content_type)
    location = url_for("data.get", data_id=record["data_id"])
    return json_response(record, 201, {"Location": location})


def _check_storable(content: bytes, content_type: str) -> None:
    """Refuse what the SQL store cannot hold: a content type over its column, a blob over MAX_DATA_BYTES."""
    limit = current_app.config["MAX_DATA_BYTES"]
    if len(content) > limit:
        raise PayloadTooLarge(f"a stored input may have at most {limit} bytes, this one has {len(content)}")
    if len(content_type) > CONTENT_TYPE_MAX or not content_type.isascii() or not content_type.isprintable():
        raise BadRequest(f"the content type must be printable ASCII of at most {CONTENT_TYPE_MAX} characters")


@bp.get("/v1/data/<data_id>")
def get(data_id: str) -> Response:
    """A stored input's record: kind, content type, size, time; never its content."""
    return json_response(_store().get(data_id))


@bp.post("/v1/data:warm")
def warm() -> Response:
    """Preprocess stored inputs for a model version now, so that predictions by their ids start warm."""
    body = wire.json_object(wire.read(request))
    if set(body) - {"model", "version", "data_ids"}:
        raise BadRequest("a warm-up is {\"model\", \"version\"?, \"data_ids\": [...]}")
    found = registry().get(wire.model_name(body), wire.version_number(body))
    ids = data_ids(body)
    _, made = _store().prepared(found, ids)
    return json_response({"model": found.name, "version": found.number, "count": len(ids), "made": made})


def parse(store: DataStore | None, version: ModelVersion, body: dict[str, Any]) -> tuple[dict[str, np.ndarray], bool]:
    """The inputs of a `:predict` or `:submit` body and whether the answer takes the row format: the stored
    inputs a body names by `{"data_ids": [...]}` (rows), else its `instances` or `inputs` (`instances.parse`)."""
    if "data_ids" not in body or store is None:
        return instances.parse(body, version)
    if set(body) - {"data_ids", "signature_name"}:
        raise BadRequest("a body with 'data_ids' takes no 'instances' or 'inputs'")
    return store.prepared(version, data_ids(body))[0], True


def data_ids(body: dict[str, Any]) -> list[str]:
    """The `data_ids` of a body: a non-empty list of at most MAX_IDS ids."""
    ids = body.get("data_ids")
    if not isinstance(ids, list) or not ids or len(ids) > MAX_IDS or not all(isinstance(i, str) for i in ids):
        raise BadRequest(f"'data_ids' must be a list of 1 to {MAX_IDS} ids (strings)")
    return ids


def _json_input(body: dict[str, Any]) -> tuple[str, bytes, str]:
    if set(body) == {"b64"} and isinstance(body["b64"], str):
        try:
            return "image", base64.b64decode(body["b64"], validate=True), "application/octet-stream"
        except (binascii.Error, ValueError):
            raise BadRequest("'b64' is not valid base64") from None
    if set(body) != {"instance"} or body["instance"] is None:
        raise BadRequest("send an image, {\"b64\": \"...\"}, or {\"instance\": <one instance as :predict takes it>}")
    try:
        text = instances.encode(body["instance"], nonfinite=True)
    except (ValueError, TypeError, RecursionError):
        raise BadRequest("'instance' cannot be stored as JSON") from None
    return "instance", text.encode(), "application/json"


def _store() -> DataStore:
    return current_app.extensions["data"]
