"""The prediction log and drift API (`/v1/models/{m}/log`, `/v1/models/{m}/drift`), and the data plane's observer
that samples the predictions it serves into the log."""

from __future__ import annotations

import datetime
import random
import re
import time
from collections.abc import Iterator

import orjson
import redis
import sqlalchemy as sa
from flask import Blueprint, Flask, Response, current_app, request, url_for

import models
from models import reference
from tasks.drift import DriftStore
from tasks.logbook import Cursor, LogBook, LogQuery
from tasks.prediction_log import LogSettings, Recorder
from webapp.errors import BadRequest
from webapp.repository import registry
from webapp.responses import json_response
from webapp.served import Served

bp = Blueprint("monitoring", __name__)
LOG_PARAMETERS = frozenset({"version", "since", "until", "request_id", "outlier", "limit", "cursor", "format"})
RATES_REREAD_S = 1.0
"""How often the observer reads the models' `log_rate` again: a changed spec is sampled by its rate within this."""
MAX_LIMIT = 1000
"""Most records one page holds."""
EXPORT_LIMIT = 10**9
CURSOR = re.compile(r"(\d{1,17})-(\d{1,18})")


class PredictionObserver:
    """Samples the successful predictions the data plane serves by their model's `log_rate`, into the log."""

    def __init__(self, registry: models.Registry, recorder: Recorder, reread_s: float = RATES_REREAD_S):
        self.registry, self.recorder, self.reread_s = registry, recorder, reread_s
        self.rates: dict[str, float] = {}
        self.reread_at = 0.0

    def __call__(self, served: Served) -> None:
        """Queue the record of a sampled prediction; for the others, a lookup and one random draw."""
        if served.status != 200 or served.outputs is None:
            return
        if time.monotonic() >= self.reread_at:
            self._reread()
        name = served.fallback or served.model  # a fallback's answer is its own model's prediction
        rate = self.rates.get(name, 0.0)
        if rate <= 0 or random.random() >= rate:
            return
        try:
            found = self.registry.get(name, None if served.fallback else served.version)
        except models.ModelError:
            return
        self.recorder.offer(found, "sync", served.request_id, time.perf_counter() - served.started,
                            served.inputs or {}, served.outputs)

    def _reread(self) -> None:
        """Read every model's `log_rate` again (specs are reloaded while serving)."""
        self.reread_at = time.monotonic() + self.reread_s
        self.rates = {m.spec.name: m.spec.monitoring.log_rate for m in self.registry.models()}


def install(app: Flask, engine: sa.Engine, redis_url: str) -> None:
    """Serve the log and drift API, and log the data plane's sampled predictions through a recorder of the app's."""
    client = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
    recorder = app.extensions["prediction_log"] = Recorder(client, LogSettings.from_env().stream_maxlen)
    app.extensions["logbook"], app.extensions["drift"] = LogBook(engine), DriftStore(engine)
    app.extensions["dataplane"].observers.append(PredictionObserver(app.extensions["registry"], recorder))
    app.register_blueprint(bp)


def close(app: Flask) -> None:
    """Send the records the app still holds, and close the recorder's connections."""
    app.extensions["prediction_log"].close()


@bp.get("/v1/models/<model:name>/log")
def log(name: str) -> Response:
    """Logged predictions of a model, newest first, filtered; a page of JSON, or every one as JSON lines."""
    unknown = sorted(set(request.args) - LOG_PARAMETERS)
    if unknown:
        raise BadRequest(f"unknown parameter {unknown[0]!r}; the log takes {', '.join(sorted(LOG_PARAMETERS))}")
    query = LogQuery(registry().model(name).spec.name, _version(), _time("since"), _time("until"),
                     _request_id(), _flag("outlier"))
    book: LogBook = current_app.extensions["logbook"]
    kind = request.args.get("format", "json")
    if kind == "jsonl":
        return Response(_lines(book.export(query, _limit(None, EXPORT_LIMIT))), mimetype="application/x-ndjson")
    if kind != "json":
        raise BadRequest("'format' must be json (a page) or jsonl (every record, one per line)")
    records, after = book.page(query, _limit(100, MAX_LIMIT), _cursor())
    following = url_for("monitoring.log", name=name, **{**request.args, "cursor": _token(after)}) if after else None
    return json_response({"model": query.model, "records": records, "next": following})


@bp.get("/v1/models/<model:name>/drift")
def drift(name: str) -> Response:
    """The latest drift check of each version of a model (or of `version`): the PSI of each feature, and alerts."""
    model = registry().model(name)
    number = _version()
    versions = [model.version(number)] if number is not None else list(model.versions.values())
    store: DriftStore = current_app.extensions["drift"]
    answers = []
    for version in versions:
        found = store.latest(model.spec.name, version.number)
        answer = found.public() if found else {"version": version.number, "checked_at": None}
        answers.append({**answer, "reference": reference.of(version) is not None})
    return json_response({"model": model.spec.name, "versions": answers})


def _lines(records: Iterator[dict]) -> Iterator[bytes]:
    for record in records:
        yield orjson.dumps(record) + b"\n"


def _version() -> int | None:
    text = request.args.get("version")
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) < 2**31:
        raise BadRequest("'version' must be a positive whole number")
    return int(text)


def _time(name: str) -> datetime.datetime | None:
    text = request.args.get(name)
    if text is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(text)
        return when.astimezone(datetime.UTC).replace(tzinfo=None) if when.tzinfo is not None else when
    except (ValueError, OverflowError):
        raise BadRequest(f"{name!r} must be an ISO 8601 time, e.g. 2026-01-31T12:00:00Z") from None


def _request_id() -> str | None:
    text = request.args.get("request_id")
    if text is not None and not 1 <= len(text) <= 100:
        raise BadRequest("'request_id' must have 1 to 100 characters")
    return text


def _flag(name: str) -> bool | None:
    text = request.args.get(name)
    if text is None:
        return None
    if text not in ("true", "false"):
        raise BadRequest(f"{name!r} must be true or false")
    return text == "true"


def _limit(default: int | None, most: int) -> int | None:
    text = request.args.get("limit")
    if text is None:
        return default
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:
        raise BadRequest(f"'limit' must be a whole number from 1 to {most}")
    return int(text)


def _cursor() -> Cursor | None:
    text = request.args.get("cursor")
    if text is None:
        return None
    match = CURSOR.fullmatch(text)
    if match is None:
        raise BadRequest("'cursor' must be the value a previous page's `next` link gave")
    try:
        when = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=int(match[1]))
    except OverflowError:
        raise BadRequest("'cursor' must be the value a previous page's `next` link gave") from None
    return when, int(match[2])


def _token(after: Cursor) -> str:
    micros = (after[0] - datetime.datetime(1970, 1, 1)) // datetime.timedelta(microseconds=1)
    return f"{micros}-{after[1]}"
