"""The data plane: the inference routes (TF Serving `:predict`, V2 `/infer`) behind one seam for every transport.

`DataPlane.respond` takes what a transport read of a request (`Call`) and answers it: the caller's key and
scope, the version that serves it (`Traffic`), the body checks, the protocol codec, the prediction inside the
guard's admission (`Guard`; through the prediction cache for a model whose spec turns it on) and the reply,
with every error mapped by the one status table; then it tells its observers what it served (`Served`). The ASGI router
(`webapp.asgi`) calls it for the two routes without going through Flask; the Flask views of the same routes
(`webapp.inference`, for the WSGI test client and any WSGI server) call it too, so both take one path.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple, Protocol

import orjson
import redis
import sqlalchemy as sa

import models
from models import Registry, answer
from tasks import logs
from webapp import data, v2_codec, wire
from webapp.auth import Auth, Identity
from webapp.cache import PredictionCache
from webapp.datastore import DataStore
from webapp.errors import status_of
from webapp.served import AsAsked, Guard, Observer, Open, Served, Traffic
from webapp.traffic import Queued

log = logging.getLogger(__name__)
Reply = tuple[int, bytes, str, dict[str, str]]
"""Status, body, content type and further headers."""

PREDICT = re.compile(r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]{1,18}))?:predict")
INFER = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[0-9]{1,18}))?/infer")
JSON = "application/json"
PREDICT_SCOPE = "predict"
INLINE_MAX_BYTES = 16 * 1024
"""Uncompressed bodies up to this size, for a model with no image input and no cache, are answered on the event
loop: short, CPU-bound work (well under a millisecond) that a thread hand-off would cost more than. Anything
else runs on a thread."""


class Enqueue(Protocol):
    """Queues a prediction as a job; the body and headers of its 202 answer (`webapp.jobs.Enqueue`)."""

    def __call__(self, found: models.ModelVersion, inputs: dict, rows: bool, callback: str | None,
                 request_id: str) -> tuple[dict, dict[str, str]]: ...


class Call(NamedTuple):
    """What an inference route reads of a request."""

    method: str
    body: bytes
    content_type: str = ""
    content_encoding: str = ""
    header_length: str | None = None
    authorization: str | None = None
    request_id: str = ""
    headers: Mapping[str, str] = {}
    """Every header of the request, names in lower case (for routing by a header, and the prediction log)."""


class Route(NamedTuple):
    """An inference route a path matched: its handler, the model name and version in the path, its protocol."""

    handler: Callable[[models.ModelVersion, Call, Served], Reply]
    name: str
    version: int | None
    protocol: str


class DataPlane:
    """Answers the inference routes of every transport."""

    def __init__(self, registry: Registry, max_body_bytes: int, auth: Auth,
                 cache: PredictionCache | None = None, stored: DataStore | None = None):
        self.registry, self.max_body_bytes, self.auth = registry, max_body_bytes, auth
        self.cache, self.stored = cache, stored
        self.routes = ((PREDICT, self.predict, "tfserving"), (INFER, self.infer, "v2"))
        self.traffic: Traffic = AsAsked()
        self.guard: Guard = Open()
        self.observers: list[Observer] = []
        self.enqueue: Enqueue | None = None
        """What queues a request of the batch latency class as a job (`webapp.jobs.Enqueue`); None: none is."""

    def route(self, path: str) -> Route | None:
        """The inference route of `path`, or None for any other path."""
        for pattern, handler, protocol in self.routes:
            match = pattern.fullmatch(path)
            if match:
                version = match["version"]
                return Route(handler, match["name"], int(version) if version else None, protocol)
        return None

    def inline(self, route: Route, call: Call) -> Identity | None:
        """Whether the event loop may answer a request itself, being cheap and free of I/O: a small uncompressed
        body for a model with no image input and no cache, naming no stored inputs, from a caller whose key is
        checked in process (`Auth.check_at_once`). When it may, that check is done and its caller is answered
        (`respond(..., identity)`); None when the request must run on a thread."""
        if len(call.body) > INLINE_MAX_BYTES or call.content_encoding or b"data_ids" in call.body:
            return None  # a few KiB of gzip inflate to MAX_REQUEST_BYTES
        try:
            spec = self.registry.get(*self.traffic.choose(route.name, route.version, call.headers)).spec
        except models.ModelError:
            return None  # answered on a thread with its error, after the key's check
        if spec.takes_images or (self.cache is not None and spec.options.cache_ttl_s > 0):
            return None
        return self.auth.check_at_once(call.authorization, PREDICT_SCOPE)

    def respond(self, route: Route, call: Call, identity: Identity | None = None) -> Reply:
        """Answer one inference request (from `identity`, its caller's key already checked, if given); every
        error becomes its status and a JSON body. The observers are told what was served."""
        if call.method != "POST":
            return 405, _error("use POST"), JSON, {"Allow": "POST"}
        served = Served(route.name, route.version, route.protocol, call.request_id, headers=call.headers)
        logs.current.set(served)  # what the lines logged while it is served are about
        try:
            identity = identity or self.auth.check(call.authorization, PREDICT_SCOPE)
            served.key_id = identity.key_id
            found = self.registry.get(*self.traffic.choose(route.name, route.version, call.headers))
            served.model, served.version = found.name, found.number
            with self.guard.admit(found) as running:
                reply = route.handler(running, call, served)
            if running is not found:  # the guard sent the request to the model's fallback
                served.fallback = running.name
                reply = (*reply[:3], {**reply[3], "X-Fallback": running.name})
        except Queued as queued:
            reply = self._queue(route, call, served, queued) if self.enqueue else _failed(route, queued)
        except Exception as exc:
            reply = _failed(route, exc)
        served.status = reply[0]
        self._tell(served)
        return reply

    def _queue(self, route: Route, call: Call, served: Served, queued: Queued) -> Reply:
        """Queue a request of the batch latency class as a job of the version chosen: 202 with the job, as
        `:submit` answers (a V2 request's job keeps its outputs by name, as columns)."""
        try:
            found = self.registry.get(queued.model, queued.version)
            served.model, served.version = found.name, found.number
            if route.protocol == "v2":
                inputs, rows, callback = v2_codec.parse(self._body(call, True), call.header_length, found).inputs, \
                    False, None
            else:
                body = wire.json_object(self._body(call, binary_ok=False), found.spec.max_request_values)
                callback = body.pop("callback_url", None)
                inputs, rows = data.parse(self.stored, found, body)
            job, headers = self.enqueue(found, inputs, rows, wire.callback_url(callback), call.request_id)
        except Exception as exc:
            return _failed(route, exc)
        return 202, orjson.dumps(job), JSON, headers

    def _tell(self, served: Served) -> None:
        """Tell each observer what was served; one that fails is logged, and never fails the request."""
        for observer in self.observers:
            try:
                observer(served)
            except Exception:
                log.exception("observer %r failed on a request for model %s", observer, served.model)

    def predict(self, found: models.ModelVersion, call: Call, served: Served) -> Reply:
        """TensorFlow Serving REST: row or columnar JSON in, predictions or outputs out."""
        body = wire.json_object(self._body(call, binary_ok=False), found.spec.max_request_values)
        inputs, rows = data.parse(self.stored, found, body)
        outputs, headers = self._outputs(found, inputs, served)
        shaped = (answer.rows if rows else answer.columns)(outputs, found.spec.output_names)
        content = orjson.dumps(shaped, option=orjson.OPT_SERIALIZE_NUMPY)
        stages = served.stages  # `predict` holds `preprocess` and `model`
        stages["encode"] = time.perf_counter() - served.started - stages["decode"] - stages["predict"]
        return 200, content, JSON, headers

    def infer(self, found: models.ModelVersion, call: Call, served: Served) -> Reply:
        """Open Inference Protocol V2: JSON or binary tensors in and out."""
        parsed = v2_codec.parse(self._body(call, binary_ok=True), call.header_length, found)
        outputs, headers = self._outputs(found, parsed.inputs, served)
        body, header_length = v2_codec.response(found, parsed, outputs)
        stages = served.stages  # `predict` holds `preprocess` and `model`
        stages["encode"] = time.perf_counter() - served.started - stages["decode"] - stages["predict"]
        if not header_length:
            return 200, body, JSON, headers
        return 200, body, "application/octet-stream", {v2_codec.HEADER: str(header_length), **headers}

    def _outputs(self, found: models.ModelVersion, inputs: dict, served: Served) -> tuple[dict, dict[str, str]]:
        """The prediction, through the prediction cache for a model whose spec turns it on; `served` learns the
        inputs, the outputs and the time each took."""
        decoded = time.perf_counter()
        served.stages["decode"], served.inputs = decoded - served.started, inputs
        headers = {}
        if self.cache is None or found.spec.options.cache_ttl_s <= 0:
            outputs = models.predict(found, inputs, timings=served.stages)  # adds `preprocess` and `model`
        else:
            answered = self.cache.predict(found, inputs)
            outputs, served.cache = answered.outputs, answered.outcome.value
            headers["X-Cache"] = served.cache
        served.stages["predict"], served.outputs = time.perf_counter() - decoded, outputs
        return outputs, headers

    def _body(self, call: Call, binary_ok: bool) -> bytes:
        mimetype = call.content_type.split(";", 1)[0].strip().lower()
        wire.check_content_type(mimetype, binary_ok)
        return wire.decode(call.body, call.content_encoding, self.max_body_bytes)


def _failed(route: Route, exc: Exception) -> Reply:
    """The answer to a request that raised `exc`: its status and message, never a server's internals."""
    status, headers = status_of(exc), getattr(exc, "headers", None) or {}
    if isinstance(exc, sa.exc.DBAPIError | redis.RedisError):
        log.warning("model %s: a backing store failed: %s", route.name, exc)
        return 503, _error("a backing store is unavailable; retry shortly"), JSON, {"Retry-After": "5"}
    if status == 500 and not isinstance(exc, models.ModelError):
        log.exception("unhandled error on model %s", route.name)
        return status, _error(f"internal error: {type(exc).__name__}"), JSON, headers
    return status, _error(str(exc)), JSON, headers


def _error(message: str) -> bytes:
    return orjson.dumps({"error": message})
