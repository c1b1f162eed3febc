"""The inference routes (TF Serving `:predict`, V2 `/infer`), served in front of Flask's dispatch.

On small models the model costs a few microseconds and the web framework the rest of a request, so these
two routes are answered by a plain WSGI layer: path match, body checks, the protocol codec, the one
prediction entry point, the reply. It uses the same codecs, errors and status table as the Flask views;
every other path goes on to Flask. Installed by `create_app` as `app.wsgi_app`, so the test client and any
WSGI server take it; the ASGI bridge calls `DataPlane.respond` directly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from typing import NamedTuple

import orjson
from werkzeug.wsgi import ClosingIterator

import models
from models import Registry, answer
from tasks.cache import Outcome, PredictionCache
from tasks.data import DataStore
from webapp import data, v2_codec, wire
from webapp.errors import BadRequest, PayloadTooLarge, RequestError, status_of

log = logging.getLogger(__name__)
WSGIApp = Callable[[dict, Callable], Iterable[bytes]]
Reply = tuple[int, bytes, str, dict[str, str]]

PREDICT = re.compile(r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]{1,18}))?:predict")
INFER = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[0-9]{1,18}))?/infer")
JSON = "application/json"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           413: "Content Too Large", 415: "Unsupported Media Type", 500: "Internal Server Error",
           503: "Service Unavailable"}


class Call(NamedTuple):
    """What an inference route reads of a request."""

    method: str
    body: bytes
    content_type: str = ""
    content_encoding: str = ""
    header_length: str | None = None


Route = tuple[Callable[["models.ModelVersion", Call], Reply], re.Match]


class DataPlane:
    """WSGI middleware answering the inference routes; everything else goes on to `fallback`."""

    def __init__(self, registry: Registry, fallback: WSGIApp, max_body_bytes: int,
                 cache: PredictionCache | None = None, stored: DataStore | None = None):
        self.registry, self.fallback, self.max_body_bytes = registry, fallback, max_body_bytes
        self.cache, self.stored = cache, stored
        self.routes = ((PREDICT, self.predict), (INFER, self.infer))

    def route(self, path: str) -> Route | None:
        """The handler and path match of an inference route, or None for any other path."""
        for pattern, handler in self.routes:
            match = pattern.fullmatch(path)
            if match:
                return handler, match
        return None

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        route = self.route(environ.get("PATH_INFO", ""))
        if route is None:
            return self.fallback(environ, start_response)
        try:
            call = Call(
                environ["REQUEST_METHOD"], _read(environ, self.max_body_bytes),
                environ.get("CONTENT_TYPE", ""), environ.get("HTTP_CONTENT_ENCODING", ""),
                environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"),
            )
            status, body, content_type, extra = self.respond(route, call)
        except RequestError as exc:
            status, body, content_type, extra = exc.status, _error(str(exc)), JSON, {}
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra.items()]
        start_response(f"{status} {REASONS.get(status, '')}", headers)
        return ClosingIterator([body], self.after)  # the server closes it once the body is sent

    def after(self) -> None:
        """Once an answer has been sent: what the prediction cache left to do behind it (keep and store it)."""
        if self.cache is not None:
            self.cache.catch_up()

    def respond(self, route: Route, call: Call) -> Reply:
        """Answer one inference request; every error becomes its status and a JSON body."""
        if call.method != "POST":
            return 405, _error("use POST"), JSON, {"Allow": "POST"}
        handler, match = route
        version = match["version"]
        try:
            found = self.registry.get(match["name"], int(version) if version else None)
            return handler(found, call)
        except Exception as exc:
            status = status_of(exc)
            if status == 500 and not isinstance(exc, models.ModelError):
                log.exception("unhandled error on %s", match.string)
                return status, _error(f"internal error: {type(exc).__name__}"), JSON, {}
            return status, _error(str(exc)), JSON, {}

    def predict(self, found: models.ModelVersion, call: Call) -> Reply:
        """TensorFlow Serving REST: row or columnar JSON in, predictions or outputs out."""
        inputs, rows = data.parse(self.stored, found, wire.json_object(self._body(call, binary_ok=False)))
        outputs, headers = self._outputs(found, inputs)
        wanted = found.spec.output_names
        shaped = (answer.rows if rows else answer.columns)(outputs, wanted)
        return 200, orjson.dumps(shaped, option=orjson.OPT_SERIALIZE_NUMPY), JSON, headers

    def infer(self, found: models.ModelVersion, call: Call) -> Reply:
        """Open Inference Protocol V2: JSON or binary tensors in and out."""
        data = self._body(call, binary_ok=True)
        parsed = v2_codec.parse(data, call.header_length, found)
        outputs, headers = self._outputs(found, parsed.inputs)
        body, header_length = v2_codec.response(found, parsed, outputs)
        if not header_length:
            return 200, body, JSON, headers
        return 200, body, "application/octet-stream", {v2_codec.HEADER: str(header_length), **headers}

    def _outputs(self, found: models.ModelVersion, inputs: dict) -> tuple[dict, dict[str, str]]:
        """The prediction, through the prediction cache for a model whose spec turns it on."""
        if self.cache is None or found.spec.options.cache_ttl_s <= 0:
            return models.predict(found, inputs), {}
        answered = self.cache.predict(found, inputs, behind=True)
        return answered.outputs, {"X-Cache": "HIT" if answered.outcome is Outcome.HIT else "MISS"}

    def _body(self, call: Call, binary_ok: bool) -> bytes:
        mimetype = call.content_type.split(";", 1)[0].strip().lower()
        wire.check_content_type(mimetype, binary_ok)
        return wire.decode(call.body, call.content_encoding, self.max_body_bytes)


def _read(environ: dict, limit: int) -> bytes:
    """The body of a WSGI request, refusing one over `limit` bytes before reading it."""
    stream, length = environ["wsgi.input"], environ.get("CONTENT_LENGTH") or ""
    too_large = PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
    if length:
        if not length.isdigit():
            raise BadRequest("Content-Length must be a whole number")
        if int(length) > limit:
            raise too_large
        return stream.read(int(length))
    if not environ.get("wsgi.input_terminated"):
        return b""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise too_large
    return data


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})
