"""Batch items in the SQL store: registered in bulk, claimed a chunk at a time, written back in bulk.

An item is `queued` until a run's chunk task claims it: `running`, with the chunk's claim token and a
lease. The chunk writes its outcomes in bulk, only to rows that still carry its token, and counts them
into its run in the same transaction. An item that failed is `failed` with its reason;
while it has attempts left, the next run of its model tries it again (the partial retry). Rows whose
lease ran out (their worker was lost) go back to `queued`, or to `failed` once out of attempts; a chunk
stopped by the SQL store going away takes its rows back without counting a try.
"""

from __future__ import annotations

import datetime
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa

from tasks import db
from tasks.db import MYSQL, iso, items, now, runs
from tasks.status import JobStatus

QUEUED, RUNNING = JobStatus.QUEUED.value, JobStatus.RUNNING.value
SUCCEEDED, FAILED = JobStatus.SUCCEEDED.value, JobStatus.FAILED.value
WRITE_ROWS = 250
"""Rows one write-back statement updates."""
SHOWN = ("id", "model", "version", "status", "prediction", "error", "attempts", "run_id",
         "created_at", "started_at", "finished_at")
COLUMNS = tuple(items.c[c] for c in SHOWN)


class ItemNotFound(LookupError):
    """No batch item has that id."""


Span = tuple[int, int]
"""The first and last item id of a chunk."""


@dataclass(frozen=True)
class Claimed:
    """An item a chunk task holds: what it needs to predict it."""

    id: int
    version: int
    input: str


@dataclass(frozen=True)
class Progress:
    """A run's counts."""

    total: int
    succeeded: int
    failed: int

    @property
    def complete(self) -> bool:
        """Whether every item of the run's total has an outcome."""
        return self.succeeded + self.failed >= self.total


class ItemStore:
    """Batch items on one engine."""

    def __init__(self, engine: sa.Engine, lease_s: float, max_attempts: int):
        self.engine, self.lease, self.max_attempts = engine, datetime.timedelta(seconds=lease_s), max_attempts
        self.mysql = engine.dialect.name in MYSQL
        self._mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"

    def register(self, model: str, version: int, inputs: list[str]) -> list[int]:
        """Store queued items, one per input (JSON of one instance); answer their ids in order."""
        created = now()
        rows = [{"model": model, "version": version, "input": text, "status": QUEUED, "created_at": created}
                for text in inputs]
        with self.engine.begin() as connection:
            if self.engine.dialect.insert_executemany_returning_sort_by_parameter_order:
                query = items.insert().returning(items.c.id, sort_by_parameter_order=True)
                return [row.id for row in connection.execute(query, rows)]
            return [connection.execute(items.insert(), row).inserted_primary_key[0] for row in rows]

    def get(self, item_id: int) -> dict[str, Any]:
        """One item as the API shows it; ItemNotFound if there is none."""
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(*COLUMNS).where(items.c.id == item_id)).first()
        if row is None:
            raise ItemNotFound(f"no batch item {item_id}")
        return self.public(row)

    def page(self, model: str | None, status: str | None, page: int, per_page: int) -> tuple[list[dict], int]:
        """One page of items, newest first, filtered by model and status; and how many match in all."""
        where = [column == value for column, value in ((items.c.model, model), (items.c.status, status))
                 if value is not None]
        rows, total = db.page(self.engine, items, COLUMNS, where, page, per_page)
        return [self.public(r) for r in rows], total

    def claim(self, run_id: int, model: str, span: Span, token: str, limit: int) -> list[Claimed]:
        """Take up to `limit` queued items of a run's model with ids in `span` (both ends in) under `token`.

        MySQL and MariaDB lock the rows with SELECT ... FOR UPDATE SKIP LOCKED, so concurrent claims
        pass each other by; SQLite has one writer at a time, and claims in one UPDATE ... RETURNING.
        A span keeps the index scan off the entries of rows other chunks just finished, which InnoDB
        keeps until it purges them.
        """
        started = now()
        taken = {"status": RUNNING, "claim": token, "run_id": run_id, "leased_until": started + self.lease,
                 "started_at": started, "attempts": items.c.attempts + 1}
        eligible = (items.c.model == model, items.c.status == QUEUED, items.c.id.between(*span))
        columns = (items.c.id, items.c.version, items.c.input)
        with self.engine.begin() as connection:
            if not self.mysql:
                chosen = sa.select(items.c.id).where(*eligible).order_by(items.c.id).limit(limit)
                query = items.update().where(items.c.id.in_(chosen.scalar_subquery())).values(taken)
                return [Claimed(*row) for row in connection.execute(query.returning(*columns))]
            query = sa.select(*columns).where(*eligible).order_by(items.c.id).limit(limit)
            rows = connection.execute(query.with_for_update(skip_locked=True)).all()
            if rows:
                ids = [r.id for r in rows]
                connection.execute(items.update().where(sa.or_(*(items.c.id.between(*r) for r in runs_of(ids))),
                                                        items.c.status == QUEUED).values(taken))
        return [Claimed(*row) for row in rows]

    def reclaim(self, model: str, span: Span, token: str, count: bool = True) -> list[Claimed]:
        """Take back, under a fresh lease, the items an earlier attempt of the same chunk task held; count a
        try unless `count` is false (that attempt was stopped by the store, not by the items)."""
        held = (items.c.model == model, items.c.status == RUNNING, items.c.id.between(*span), items.c.claim == token)
        started = now()
        tries = items.c.attempts + 1 if count else items.c.attempts
        with self.engine.begin() as connection:
            connection.execute(items.update().where(*held).values(
                leased_until=started + self.lease, started_at=started, attempts=tries))
            query = sa.select(items.c.id, items.c.version, items.c.input).where(*held)
            return [Claimed(*row) for row in connection.execute(query.order_by(items.c.id))]

    def public(self, row: sa.Row) -> dict[str, Any]:
        """An item row as the API shows it: JSON prediction, ISO times, and tries left after a failure."""
        item = dict(zip(SHOWN, row, strict=True))
        item["prediction"] = orjson.loads(item["prediction"]) if item["prediction"] is not None else None
        for name in ("created_at", "started_at", "finished_at"):
            item[name] = iso(item[name])
        if item["status"] == FAILED:
            item["retries_left"] = max(self.max_attempts - item["attempts"], 0)
        return item

    def finish(self, run_id: int, token: str, predictions: dict[int, str], errors: dict[int, str]) -> Progress:
        """Write a chunk's predictions and errors to the rows it still holds and count them into the run;
        answer the run's counts after it."""
        finished = now()
        with self.engine.begin() as connection:
            done = self._write(connection, token, SUCCEEDED, "prediction", predictions, finished)
            failed = self._write(connection, token, FAILED, "error", errors, finished)
            counts = runs.update().where(runs.c.id == run_id).values(
                succeeded=runs.c.succeeded + done, failed=runs.c.failed + failed, updated_at=finished)
            connection.execute(counts)
            row = connection.execute(sa.select(runs.c.total, runs.c.succeeded, runs.c.failed)
                                     .where(runs.c.id == run_id)).one()
        return Progress(row.total, row.succeeded, row.failed)

    def _write(self, connection: sa.Connection, token: str, status: str, column: str, values: dict[int, str],
               finished: datetime.datetime) -> int:
        """UPDATEs of many rows each, `column` = CASE id WHEN ... END, only where the token still holds.

        A CASE is searched row by row, so one statement costs the square of its rows: WRITE_ROWS at a time.
        """
        mark, other, written = self._mark, "error" if column == "prediction" else "prediction", 0
        pairs = sorted(values.items())
        for start in range(0, len(pairs), WRITE_ROWS):
            part = pairs[start:start + WRITE_ROWS]
            spans = runs_of([i for i, _ in part])
            sql = (f"UPDATE batch_items SET status = {mark}, {column} = CASE id "
                   f"{' '.join([f'WHEN {mark} THEN {mark}'] * len(part))} END, {other} = NULL, finished_at = {mark}, "
                   f"claim = NULL, leased_until = NULL WHERE claim = {mark} AND status = {mark} "
                   f"AND ({' OR '.join([f'id BETWEEN {mark} AND {mark}'] * len(spans))})")
            params = (status, *(v for pair in part for v in pair), finished, token, RUNNING,
                      *(end for span in spans for end in span))
            written += connection.exec_driver_sql(sql, params).rowcount
        return written

    def expire_leases(self, models: list[str], limit: int = 10_000) -> dict[int, int]:
        """Return the models' items whose lease ran out to `queued` (to `failed` once out of attempts),
        counting the failures into their runs; answer, per run, how many went back in line."""
        if not models:
            return {}
        expired = (items.c.model.in_(models), items.c.status == RUNNING, items.c.leased_until < now())
        query = sa.select(items.c.id, items.c.run_id, items.c.attempts).where(*expired).limit(limit)
        with self.engine.begin() as connection:
            rows = connection.execute(query.with_for_update(skip_locked=True) if self.mysql else query).all()
            spent = [r for r in rows if r.attempts >= self.max_attempts]
            again = [r for r in rows if r.attempts < self.max_attempts]
            self._expire(connection, [r.id for r in again], {"status": QUEUED})
            reason = f"its worker was lost {self.max_attempts} times; given up"
            self._expire(connection, [r.id for r in spent], {"status": FAILED, "error": reason, "finished_at": now()})
            for run_id, count in Counter(r.run_id for r in spent).items():
                connection.execute(runs.update().where(runs.c.id == run_id).values(failed=runs.c.failed + count))
        return dict(Counter(r.run_id for r in again))

    def renew_leases(self, models: list[str]) -> int:
        """Give the models' items whose lease ran out a fresh lease; answer how many.

        For runs the reconciler could not look at for a while: what kept it away (the store unreachable)
        likely kept the items' holders from writing back too, and a holder retrying through an outage takes
        its items back within the new lease. Those still held when it runs out are expired as usual.
        """
        if not models:
            return 0
        renewed = now()
        lapsed = items.update().where(items.c.model.in_(models), items.c.status == RUNNING,
                                      items.c.leased_until < renewed)
        with self.engine.begin() as connection:
            return connection.execute(lapsed.values(leased_until=renewed + self.lease)).rowcount

    @staticmethod
    def _expire(connection: sa.Connection, ids: list[int], values: dict[str, Any]) -> None:
        if ids:
            query = items.update().where(items.c.id.in_(ids), items.c.status == RUNNING)
            connection.execute(query.values(claim=None, leased_until=None, **values))


def runs_of(ids: list[int]) -> list[Span]:
    """Sorted ids as the spans of consecutive ids they make: a WHERE clause of a few ranges, not of every id."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return [(first, last) for first, last in spans]
