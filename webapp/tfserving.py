"""TensorFlow Serving REST API (and KServe V1 status): /v1/models/{m}[/versions/{v}]..."""

from __future__ import annotations

from flask import Blueprint, Response
from werkzeug.routing import BaseConverter

import models
from models import ModelVersion
from models.tensor import TensorSpec
from webapp.repository import registry
from webapp.responses import json_response

bp = Blueprint("tfserving", __name__)


class ModelName(BaseConverter):
    """A model name in a URL: no ':', so `/v1/models/m:predict` is never the status of 'm:predict'."""

    regex = "[^/:]+"


@bp.get("/v1/models/<model:name>")
@bp.get("/v1/models/<model:name>/versions/<int:version>")
def status(name: str, version: int | None = None) -> Response:
    """Version status as TensorFlow Serving reports it, plus KServe V1's name and ready."""
    model = registry().model(name)
    versions = [model.version(version)] if version is not None else list(model.versions.values())
    states = [_version_status(v) for v in versions]
    ready = any(s["state"] == "AVAILABLE" for s in states)
    return json_response({"name": name, "ready": ready, "model_version_status": states})


@bp.get("/v1/models/<model:name>/metadata")
@bp.get("/v1/models/<model:name>/versions/<int:version>/metadata")
def metadata(name: str, version: int | None = None) -> Response:
    """The signature_def of a version, as TensorFlow Serving writes it."""
    found = registry().get(name, version)
    spec = found.spec
    signature = {
        "inputs": {t.name: _tensor_info(t) for t in spec.inputs},
        "outputs": {t.name: _tensor_info(t) for t in spec.outputs},
        "method_name": "tensorflow/serving/predict",
    }
    return json_response({
        "model_spec": {"name": name, "signature_name": "", "version": str(found.number)},
        "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}},
    })


def _version_status(version: ModelVersion) -> dict:
    try:
        version.session.load()
        state, code, message = "AVAILABLE", "OK", ""
    except models.ModelNotReady as exc:
        state, code, message = "END", "UNKNOWN", str(exc)
    return {"version": str(version.number), "state": state, "status": {"error_code": code, "error_message": message}}


def _tensor_info(t: TensorSpec) -> dict:
    return {
        "dtype": t.dtype.tf,
        "tensor_shape": {"dim": [{"size": str(d), "name": ""} for d in t.shape], "unknown_rank": False},
        "name": t.name,
    }

