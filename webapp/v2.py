"""Open Inference Protocol V2, as Triton, KServe and MLServer speak it: /v2/..."""

from __future__ import annotations

from flask import Blueprint, Response

from models.tensor import TensorSpec
from webapp.repository import registry
from webapp.responses import json_response

bp = Blueprint("v2", __name__, url_prefix="/v2")
SERVER = {"name": "ml-serving-platform", "version": "0.1.0", "extensions": ["binary_tensor_data"]}


@bp.get("")
def server_metadata() -> Response:
    """Server name, version and the protocol extensions that work."""
    return json_response(SERVER)


@bp.get("/health/live")
def live() -> Response:
    """The process answers."""
    return json_response({"live": True})


@bp.get("/health/ready")
def ready() -> Response:
    """Ready when the repository can be read and holds at least one model."""
    reg = registry()
    if not reg.models():
        problems = reg.problems
        reason = next(iter(problems.values()), f"no models in {reg.root}")
        return json_response({"ready": False, "error": reason}, 503)
    return json_response({"ready": True})


@bp.get("/models/<name>")
@bp.get("/models/<name>/versions/<int:version>")
def model_metadata(name: str, version: int | None = None) -> Response:
    """A model's versions and signature."""
    model = registry().model(name)
    found = model.version(version)
    versions = [str(found.number)] if version is not None else [str(n) for n in model.versions]
    return json_response({
        "name": name,
        "versions": versions,
        "platform": "onnx_onnxv1",
        "inputs": [_tensor(t) for t in found.spec.inputs],
        "outputs": [_tensor(t) for t in found.spec.outputs],
    })


@bp.get("/models/<name>/ready")
@bp.get("/models/<name>/versions/<int:version>/ready")
def model_ready(name: str, version: int | None = None) -> Response:
    """200 when the version's session is loaded or loads now; 503 with the reason otherwise."""
    found = registry().get(name, version)
    found.session.load()
    return json_response({"name": name, "ready": True})


def _tensor(t: TensorSpec) -> dict:
    entry: dict = {"name": t.name, "datatype": t.dtype.v2, "shape": list(t.shape)}
    if t.image is not None:
        entry["parameters"] = {"accepts": ["BYTES"], "content_type": "image"}
    return entry

