"""The prediction log in the SQL store: records drained from the Redis stream in bulk, and read back filtered.

The drain reads the stream as a consumer group (XREADGROUP), writes what it read in one statement, then
acknowledges and deletes it (XACK, XDEL). Entries a drain read and never acknowledged (its worker was lost) are
taken over by a later drain once they have been pending longer than any drain can live (XAUTOCLAIM). A record
written twice that way is stored once: its `uid`, made with the record, is unique.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, sqlite

from tasks.db import MYSQL, iso, prediction_log
from tasks.prediction_log import FIELD, STREAM, decode

log = logging.getLogger(__name__)
GROUP = "sql"
CONSUMER = "drain"
READ_MAX = 500
"""Records one drain reads, writes and acknowledges at a time."""
SHOWN = ("id", "model", "version", "source", "request_id", "created_at", "latency_ms", "row_count", "digest",
         "inputs", "outputs", "outlier", "outliers")
COLUMNS = tuple(prediction_log.c[c] for c in SHOWN)
Cursor = tuple[datetime.datetime, int]
"""Where a page ended: the time and id of its last record (pages run newest first)."""


@dataclass(frozen=True)
class LogQuery:
    """Which logged predictions of a model to read."""

    model: str
    version: int | None = None
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    request_id: str | None = None
    outlier: bool | None = None

    def where(self) -> list[sa.ColumnElement[bool]]:
        """The query as SQL conditions."""
        c = prediction_log.c
        given = [(self.version, c.version.__eq__), (self.since, c.created_at.__ge__), (self.until, c.created_at.__lt__),
                 (self.request_id, c.request_id.__eq__), (self.outlier, c.outlier.__eq__)]
        return [c.model == self.model, *(condition(value) for value, condition in given if value is not None)]


class LogBook:
    """The logged predictions in the SQL store."""

    def __init__(self, engine: sa.Engine):
        self.engine = engine

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Store rows (`row` of each record) in one statement; one already stored (the same `uid`) stays as it is."""
        if rows:
            with self.engine.begin() as connection:
                connection.execute(_insert(connection.dialect.name), rows)

    def page(self, query: LogQuery, limit: int, after: Cursor | None = None) -> tuple[list[dict], Cursor | None]:
        """Up to `limit` records, newest first, from `after` on; and the cursor of the next page, if any."""
        select = sa.select(*COLUMNS).where(*query.where(), *_before(after))
        select = select.order_by(prediction_log.c.created_at.desc(), prediction_log.c.id.desc()).limit(limit + 1)
        with self.engine.connect() as connection:
            rows = connection.execute(select).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return [public(row) for row in rows], (rows[-1].created_at, rows[-1].id) if more and rows else None

    def export(self, query: LogQuery, limit: int | None = None, chunk: int = 1000) -> Iterator[dict]:
        """Every record the query matches (up to `limit`), newest first, read a page at a time."""
        after, left = None, limit
        while left is None or left > 0:
            records, after = self.page(query, chunk if left is None else min(chunk, left), after)
            yield from records
            left = None if left is None else left - len(records)
            if after is None:
                return

    def recent_inputs(self, model: str, version: int, records: int) -> list[dict[str, Any]]:
        """The input features of the latest `records` records of a model version that kept them, newest first."""
        c = prediction_log.c
        select = (sa.select(c.inputs).where(c.model == model, c.version == version, c.inputs.is_not(None))
                  .order_by(c.created_at.desc(), c.id.desc()).limit(records))
        with self.engine.connect() as connection:
            return [orjson.loads(text) for text in connection.execute(select).scalars()]


def _insert(dialect: str) -> sa.Insert:
    """An INSERT that skips rows whose `uid` is stored already (and nothing else: other errors still raise)."""
    if dialect in MYSQL:
        statement = mysql.insert(prediction_log)
        return statement.on_duplicate_key_update(uid=statement.inserted.uid)
    if dialect == "sqlite":
        return sqlite.insert(prediction_log).on_conflict_do_nothing(index_elements=["uid"])
    return prediction_log.insert()


def row(built: dict[str, Any]) -> dict[str, Any]:
    """A decoded record as a row of the table; KeyError, TypeError or ValueError for what is not one."""
    latency, outliers = built["latency_ms"], built["outliers"]
    return {
        "uid": _text(built["uid"], 24), "model": _text(built["model"], 100), "version": int(built["version"]),
        "source": _text(built["source"], 8), "request_id": _text(built["request_id"], 100),
        "created_at": built["when"], "latency_ms": None if latency is None else float(latency),
        "row_count": int(built["rows"]), "digest": _text(built["digest"], 40),
        "inputs": None if built["inputs"] is None else orjson.dumps(built["inputs"]).decode(),
        "outputs": orjson.dumps(built["outputs"]).decode(), "outlier": bool(outliers),
        "outliers": orjson.dumps(outliers).decode() if outliers else None,
    }


def _text(value: object, most: int) -> str:
    if not isinstance(value, str) or len(value) > most:
        raise ValueError(f"expected a string of at most {most} characters, got {value!r:.120}")
    return value


def _before(after: Cursor | None) -> list[sa.ColumnElement[bool]]:
    if after is None:
        return []
    c = prediction_log.c
    return [sa.or_(c.created_at < after[0], sa.and_(c.created_at == after[0], c.id < after[1]))]


def public(row: sa.Row) -> dict[str, Any]:
    """A stored record as the API shows it."""
    return {
        "id": row.id, "model": row.model, "version": row.version, "source": row.source, "request_id": row.request_id,
        "time": iso(row.created_at), "latency_ms": row.latency_ms, "rows": row.row_count, "digest": row.digest,
        "inputs": None if row.inputs is None else orjson.loads(row.inputs), "outputs": orjson.loads(row.outputs),
        "outlier": bool(row.outlier), "outliers": orjson.loads(row.outliers) if row.outliers else [],
    }


def drain(client: redis.Redis, book: LogBook, budget_s: float, pending_s: float) -> int:
    """Move records from the stream to the SQL store for about `budget_s`: first those another drain read and
    left pending longer than `pending_s` (it was lost), then new ones; answer how many were read."""
    _group(client)
    deadline, moved = time.monotonic() + budget_s, 0
    start = "0-0"
    while time.monotonic() < deadline:
        start, entries, _ = client.xautoclaim(STREAM, GROUP, CONSUMER, int(pending_s * 1000), start, count=READ_MAX)
        moved += _store(client, book, entries)
        if start in (b"0-0", "0-0"):
            break
    while time.monotonic() < deadline:
        read = client.xreadgroup(GROUP, CONSUMER, {STREAM: ">"}, count=READ_MAX)
        entries = read[0][1] if read else []
        if not entries:
            break
        moved += _store(client, book, entries)
    return moved


def _group(client: redis.Redis) -> None:
    """Make the consumer group (and the stream) unless they exist."""
    try:
        client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _store(client: redis.Redis, book: LogBook, entries: list[tuple[bytes, dict]]) -> int:
    """Write the records of some stream entries, then acknowledge and delete the entries."""
    if not entries:
        return 0
    rows = []
    for entry_id, fields in entries:
        try:
            rows.append(row(decode(fields[FIELD])))
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("prediction log entry %s is not a record, skipped: %s", entry_id, exc)
    book.write(rows)
    ids = [entry_id for entry_id, _ in entries]
    pipe = client.pipeline(transaction=True)
    pipe.xack(STREAM, GROUP, *ids)
    pipe.xdel(STREAM, *ids)
    pipe.execute()
    return len(entries)
