"""One table from error class to HTTP status, and the handlers that answer `{"error": ...}`."""

from __future__ import annotations

import logging

import kombu.exceptions
import redis
import sqlalchemy as sa
from flask import Flask, Response, current_app
from werkzeug.exceptions import HTTPException

import models
from tasks.items import ItemNotFound
from tasks.jobs import JobExpired, JobNotFound
from tasks.runs import RunNotFound
from webapp.datastore import DataNotFound, StoreUnavailable
from webapp.responses import json_response

log = logging.getLogger(__name__)


class RequestError(Exception):
    """A request the web layer refuses before any model is involved."""

    status = 400


class BadRequest(RequestError):
    """Malformed body, missing field, wrong type."""


class PayloadTooLarge(RequestError):
    """A body over the configured limit, also once decompressed."""

    status = 413


class Conflict(RequestError):
    """The resource is in a state that does not allow the request."""

    status = 409


class UnsupportedMediaType(RequestError):
    """A content type or encoding the endpoint does not take."""

    status = 415


STATUS: dict[type[Exception], int] = {
    JobNotFound: 404,
    JobExpired: 410,
    ItemNotFound: 404,
    DataNotFound: 404,
    StoreUnavailable: 503,
    RunNotFound: 404,
    models.ModelNotFound: 404,
    models.VersionNotFound: 404,
    models.InvalidInput: 400,
    models.InputTooLarge: 413,
    models.ModelNotReady: 503,
    models.ModelFailed: 500,
    models.SpecError: 500,
}


def status_of(exc: Exception) -> int:
    """The HTTP status an error maps to."""
    if isinstance(exc, RequestError):
        return exc.status
    return next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)


def register(app: Flask) -> None:
    """Answer every error, ours, Werkzeug's and unexpected ones, as JSON."""
    app.register_error_handler(RequestError, _known)
    app.register_error_handler(models.ModelError, _known)
    app.register_error_handler(JobNotFound, _known)
    app.register_error_handler(JobExpired, _known)
    app.register_error_handler(ItemNotFound, _known)
    app.register_error_handler(DataNotFound, _known)
    app.register_error_handler(StoreUnavailable, _known)
    app.register_error_handler(RunNotFound, _known)
    app.register_error_handler(sa.exc.DBAPIError, _store_down)
    app.register_error_handler(redis.RedisError, _queue_down)
    app.register_error_handler(kombu.exceptions.OperationalError, _queue_down)
    app.register_error_handler(HTTPException, _http)
    app.register_error_handler(Exception, _unexpected)


def _known(exc: Exception) -> Response:
    return json_response({"error": str(exc)}, status_of(exc), getattr(exc, "headers", None))


def _queue_down(exc: Exception) -> Response:
    return _unavailable("job queue", exc, "synchronous :predict keeps working")


def _store_down(exc: Exception) -> Response:
    return _unavailable("batch store", exc, "is the database up and migrated, `python -m tasks.db upgrade`?")


def _unavailable(what: str, exc: Exception, hint: str) -> Response:
    """503 for a backing service that failed: a retry later may succeed."""
    log.warning("%s unavailable: %s", what, exc)
    return json_response({"error": f"the {what} is unavailable; retry shortly ({hint})"}, 503, {"Retry-After": "5"})


def _http(exc: HTTPException) -> Response:
    message = exc.description or exc.name
    if exc.code == 413:
        message = f"request body exceeds the limit of {current_app.config['MAX_CONTENT_LENGTH']} bytes"
    response = json_response({"error": message}, exc.code or 500)
    if exc.code == 405 and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


def _unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    return json_response({"error": f"internal error: {type(exc).__name__}"}, 500)
