"""Requests: body content type, encoding, size limit and JSON parsing; request ids; callback URLs."""

from __future__ import annotations

import json
import urllib.parse
import uuid
import zlib
from typing import Any

import orjson
from flask import Request, current_app

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


def json_object(data: bytes) -> dict[str, Any]:
    """Parse a JSON object; NaN and Infinity tokens are allowed, as TensorFlow Serving allows them."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        value = _loads_lenient(data)
    if not isinstance(value, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(value).__name__}")
    return value


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
    """A callback URL: absolute http or https, of a sane length."""
    if url is None:
        return None
    try:
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) and len(url) <= 2048 else None
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("callback_url must be an absolute http:// or https:// URL")
    return url


def request_id(request: Request) -> str:
    """The client's X-Request-ID when it is short and printable, else a new one."""
    given = request.headers.get("X-Request-ID", "")
    if given and len(given) <= 128 and given.isprintable() and given.isascii():
        return given
    return uuid.uuid4().hex
