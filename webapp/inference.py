"""The inference routes as Flask views: the same data plane the ASGI router calls, for any WSGI server.

The ASGI router answers these paths without Flask; these views exist so the Flask app alone (the test
client, a plain WSGI server) serves them too, and so they stand in the app's URL map.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, request

from models import VersionNotFound
from webapp import wire
from webapp.dataplane import Call, DataPlane

bp = Blueprint("inference", __name__)


@bp.post("/v1/models/<model:name>:predict")
@bp.post("/v1/models/<model:name>/versions/<int:version>:predict")
@bp.post("/v2/models/<name>/infer")
@bp.post("/v2/models/<name>/versions/<int:version>/infer")
def infer(name: str, version: int | None = None) -> Response:
    """Run a synchronous prediction through the data plane."""
    plane: DataPlane = current_app.extensions["dataplane"]
    route = plane.route(request.path)
    if route is None:  # a version number past the data plane's 18 digits
        raise VersionNotFound(f"model {name!r} has no version {version}")
    headers = {name.lower(): value for name, value in request.headers.items()}
    call = Call(request.method, request.get_data(cache=False), headers.get("content-type", ""),
                headers.get("content-encoding", ""), headers.get("inference-header-content-length"),
                headers.get("authorization"), wire.request_id(headers.get("x-request-id", "")), headers)
    status, body, content_type, extra = plane.respond(route, call)
    return Response(body, status, extra, content_type=content_type)
