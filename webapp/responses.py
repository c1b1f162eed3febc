"""JSON responses, serialised with orjson (numpy arrays included)."""

from __future__ import annotations

import orjson
from flask import Response

JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def json_response(payload: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response of `payload`."""
    return Response(orjson.dumps(payload, option=JSON_OPTIONS), status, headers, mimetype="application/json")
