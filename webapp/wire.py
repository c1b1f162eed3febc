"""Requests: body content type, encoding, size limit and JSON parsing; request ids; callback URLs."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import numpy as np
import orjson
from flask import Request, current_app

from tasks.config import TaskSettings
from tasks.destinations import Destinations, RefusedDestination
from webapp.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}


def read(request: Request, binary_ok: bool = False) -> bytes:
    """A Flask request's body, decompressed, after checking its content type and size."""
    check_content_type(request.mimetype, binary_ok)
    encoding = request.headers.get("Content-Encoding", "")
    return decode(request.get_data(cache=False), encoding, current_app.config["MAX_CONTENT_LENGTH"])


def check_content_type(mimetype: str, binary_ok: bool = False) -> None:
    """Accept JSON (and, where binary tensors may follow a JSON header, octet-stream); none given is JSON."""
    if mimetype and not _is_json(mimetype) and not (binary_ok and mimetype == "application/octet-stream"):
        accepted = "application/json" + (" or application/octet-stream" if binary_ok else "")
        raise UnsupportedMediaType(f"content type {mimetype!r} is not accepted; send {accepted}")


def decode(data: bytes, content_encoding: str, limit: int) -> bytes:
    """Undo a gzip or deflate Content-Encoding, refusing bodies that inflate past `limit` bytes."""
    encoding = content_encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ENCODINGS:
        raise UnsupportedMediaType(f"content encoding {encoding!r} is not accepted; use gzip or deflate")
    return _inflate(data, ENCODINGS[encoding], limit)


def json_object(data: bytes, max_values: int | None = None) -> dict[str, Any]:
    """Parse a JSON object; NaN and Infinity tokens are allowed, as TensorFlow Serving allows them.

    A body separating more than `max_values` values is refused before it is parsed: a few KB of gzip hold
    millions of tiny values, and the parser holds the interpreter, event loop included, while it builds them.
    """
    # a body separates no more values than it has bytes: a small one needs no count
    if max_values is not None and len(data) > max_values and _separators(data) > max_values:
        raise PayloadTooLarge(f"the body holds more than {max_values} values, more than a request to this model "
                              f"can carry")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = _loads_lenient(data)
    if not isinstance(value, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(value).__name__}")
    return value


def _separators(data: bytes) -> int:
    """The commas in `data`, counted by numpy, which leaves the interpreter to other threads as it compares."""
    return int(np.count_nonzero(np.frombuffer(data, np.uint8) == ord(",")))


def _loads_lenient(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def _is_json(mimetype: str) -> bool:
    return mimetype == "application/json" or mimetype.endswith("+json")


def _inflate(data: bytes, wbits: int, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"body could not be decompressed ({exc})") from None
    if len(out) > limit:
        raise PayloadTooLarge(f"body exceeds {limit} bytes once decompressed")
    if not inflater.eof:
        raise BadRequest("compressed body is truncated")
    return out


def model_name(body: dict[str, Any]) -> str:
    """A body's `model`: the name of a model."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise BadRequest("'model' must name a model")
    return name


def version_number(body: dict[str, Any]) -> int | None:
    """A body's optional `version`: a positive integer."""
    version = body.get("version")
    if version is not None and (type(version) is not int or version < 1):
        raise BadRequest("'version' must be a positive integer")
    return version


def callback_url(url: object) -> str | None:
    """A callback URL: absolute http(s), well formed, and not literally an address callbacks never go to."""
    if url is None:
        return None
    if not isinstance(url, str):
        raise BadRequest("callback_url must be a string: an absolute http:// or https:// URL")
    try:
        _callback_destinations().check_url(url)
    except RefusedDestination as exc:
        raise BadRequest(f"callback_url {exc}") from None
    return url


def _callback_destinations() -> Destinations:
    """Where this app's callbacks may go: CALLBACK_ALLOW_NETWORKS, or its test config's `callback_allow_networks`."""
    destinations = current_app.extensions.get("callback_destinations")
    if destinations is None:
        allowed = current_app.config.get("callback_allow_networks")
        if allowed is None:
            allowed = TaskSettings.from_env().callback_allow_networks
        destinations = current_app.extensions["callback_destinations"] = Destinations(tuple(allowed))
    return destinations


def request_id(given: str) -> str:
    """The client's X-Request-ID, `given`, when it is short and printable, else a new one."""
    if given and len(given) <= 128 and given.isprintable() and given.isascii():
        return given
    return os.urandom(16).hex()
