"""Batch runs in the SQL store: one model's queued items predicted, with counts, progress and history.

A run is created `queued`, then started: the model's failed items with attempts left are queued again
(the partial retry), and the run takes in every queued item up to the newest id (`high_water`), which
fixes its total. Chunk tasks count outcomes into it in the transactions that write them, so its counts are
exact; the run finishes when nothing in its scope is queued or running.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from tasks import db
from tasks.db import iso, items, now, runs
from tasks.items import FAILED, QUEUED, RUNNING, Span
from tasks.status import JobStatus


class RunNotFound(LookupError):
    """No batch run has that id."""


class RunRefused(Exception):
    """A run cannot be created: the model has one queued or running, or its schedule already fired."""

    def __init__(self, message: str, active: int | None):
        super().__init__(message)
        self.active = active


@dataclass(frozen=True)
class Run:
    """A run's record."""

    id: int
    model: str
    triggered_by: str
    status: str
    total: int
    succeeded: int
    failed: int
    created_at: datetime.datetime
    high_water: int | None = None
    started_at: datetime.datetime | None = None
    updated_at: datetime.datetime | None = None
    finished_at: datetime.datetime | None = None
    error: str | None = None
    period: str | None = None
    active: str | None = None
    reconciled_at: datetime.datetime | None = None

    def unwatched(self, longer_than: datetime.timedelta) -> bool:
        """Whether beat's reconciler has not looked at the run for longer than that (counted from its start
        if it never did)."""
        seen = self.reconciled_at or self.started_at or self.created_at
        return seen < now() - longer_than

    def public(self) -> dict[str, Any]:
        """The run as the API shows it, with its progress: done, rate and the time it should still take."""
        done = self.succeeded + self.failed
        end = self.finished_at or now()
        elapsed = (end - self.started_at).total_seconds() if self.started_at else 0.0
        rate = done / elapsed if elapsed > 0 else 0.0
        left = max(self.total - done, 0)
        return {
            "run_id": self.id, "model": self.model, "status": self.status, "triggered_by": self.triggered_by,
            "total": self.total, "done": done, "succeeded": self.succeeded, "failed": self.failed,
            "remaining": left if self.status == RUNNING else 0, "rows_per_s": round(rate, 1),
            "eta_s": round(left / rate, 1) if rate and self.status == RUNNING else None,
            "created_at": iso(self.created_at), "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at), "error": self.error,
        }


class RunStore:
    """Batch runs on one engine."""

    def __init__(self, engine: sa.Engine, max_attempts: int):
        self.engine, self.max_attempts = engine, max_attempts

    def create(self, model: str, triggered_by: str, period: str | None = None) -> Run:
        """Record a queued run; RunRefused if the model has a run queued or running, or the period ran."""
        values = {"model": model, "triggered_by": triggered_by, "period": period, "active": model,
                  "status": QUEUED, "created_at": now()}
        try:
            with self.engine.begin() as connection:
                run_id = connection.execute(runs.insert().values(values)).inserted_primary_key[0]
        except sa.exc.IntegrityError:
            active = self.active_of(model)
            if active is not None:
                raise RunRefused(f"model {model!r} has run {active} queued or running", active) from None
            raise RunRefused(f"model {model!r} was run for period {period!r} already", None) from None
        return self.get(run_id)

    def active_of(self, model: str) -> int | None:
        """The id of the model's queued or running run, if any."""
        with self.engine.connect() as connection:
            return connection.execute(sa.select(runs.c.id).where(runs.c.active == model)).scalar()

    def get(self, run_id: int) -> Run:
        """A run's record; RunNotFound if there is none."""
        with self.engine.connect() as connection:
            row = connection.execute(sa.select(runs).where(runs.c.id == run_id)).first()
        if row is None:
            raise RunNotFound(f"no batch run {run_id}")
        return Run(**row._asdict())

    def page(self, model: str | None, page: int, per_page: int) -> tuple[list[Run], int]:
        """One page of the run history, newest first; and how many runs there are in all."""
        where = [runs.c.model == model] if model is not None else []
        rows, total = db.page(self.engine, runs, (runs,), where, page, per_page)
        return [Run(**r._asdict()) for r in rows], total

    def start(self, run_id: int) -> Run | None:
        """Mark a queued run running, queue the model's retryable failures again and fix the run's scope and
        total, in one transaction; None if the run is not queued (a duplicate start finds it taken)."""
        run = self.get(run_id)
        of_model = items.c.model == run.model
        with self.engine.begin() as connection:
            started = now()
            taken = runs.update().where(runs.c.id == run_id, runs.c.status == QUEUED).values(
                status=RUNNING, started_at=started, updated_at=started)
            if connection.execute(taken).rowcount != 1:
                return None
            retry = items.update().where(of_model, items.c.status == FAILED, items.c.attempts < self.max_attempts)
            connection.execute(retry.values(status=QUEUED))
            high = connection.execute(sa.select(sa.func.max(items.c.id)).where(of_model)).scalar() or 0
            count = sa.select(sa.func.count()).select_from(items).where(
                of_model, items.c.status == QUEUED, items.c.id <= high)
            total = connection.execute(count).scalar_one()
            connection.execute(runs.update().where(runs.c.id == run_id).values(high_water=high, total=total))
        return self.get(run_id)

    def finish_if_done(self, run_id: int) -> bool:
        """Finish a running run whose scope holds nothing queued or running. Its counts are exact: every
        outcome is counted in the transaction that writes it."""
        run = self.get(run_id)
        if run.status != RUNNING:
            return False
        with self.engine.begin() as connection:
            if self._unfinished(connection, run):
                return False
            ended = runs.update().where(runs.c.id == run_id, runs.c.status == RUNNING).values(
                status=JobStatus.SUCCEEDED.value, active=None, finished_at=now(),
                total=sa.case((runs.c.total < runs.c.succeeded + runs.c.failed, runs.c.succeeded + runs.c.failed),
                              else_=runs.c.total))  # an item committed late under the high-water mark counts too
            return connection.execute(ended).rowcount == 1

    def spans(self, run: Run, size: int) -> list[Span]:
        """The run's queued items cut into spans of at most `size` items, in id order."""
        queued = (items.c.model == run.model, items.c.status == QUEUED, items.c.id <= (run.high_water or 0))
        numbered = sa.select(items.c.id, sa.func.row_number().over(order_by=items.c.id).label("n")).where(*queued)
        inner = numbered.subquery()
        with self.engine.connect() as connection:
            starts = connection.execute(sa.select(inner.c.id).where((inner.c.n - 1) % size == 0)
                                        .order_by(inner.c.id)).scalars().all()
        ends = [after - 1 for after in starts[1:]] + [run.high_water or 0]
        return list(zip(starts, ends[:len(starts)], strict=True))

    @staticmethod
    def _unfinished(connection: sa.Connection, run: Run) -> int:
        """Items of the run's scope still queued or running (a model has one run at a time)."""
        queued = sa.select(sa.func.count()).select_from(items).where(
            items.c.model == run.model, items.c.status == QUEUED, items.c.id <= (run.high_water or 0))
        running = sa.select(sa.func.count()).select_from(items).where(
            items.c.model == run.model, items.c.status == RUNNING)
        return connection.execute(queued).scalar_one() + connection.execute(running).scalar_one()

    def fail(self, run_id: int, error: str) -> None:
        """End a queued or running run as failed with its reason; its items stay as they are."""
        with self.engine.begin() as connection:
            connection.execute(runs.update().where(runs.c.id == run_id, runs.c.status.in_([QUEUED, RUNNING]))
                               .values(status=FAILED, active=None, error=error, finished_at=now()))

    def touch(self, run_id: int) -> None:
        """Note progress on a run now, so the reconciler leaves it alone for a lease."""
        with self.engine.begin() as connection:
            connection.execute(runs.update().where(runs.c.id == run_id).values(updated_at=now()))

    def reconciled(self, run_ids: list[int]) -> None:
        """Note that the reconciler looked at these runs now."""
        if run_ids:
            with self.engine.begin() as connection:
                connection.execute(runs.update().where(runs.c.id.in_(run_ids)).values(reconciled_at=now()))

    def live(self) -> list[Run]:
        """Every queued or running run."""
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(runs).where(runs.c.active.is_not(None))).all()
        return [Run(**r._asdict()) for r in rows]
