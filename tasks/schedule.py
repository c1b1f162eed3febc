"""Scheduled batch runs: `BATCH_SCHEDULE` parsed into beat entries, and the period each fire belongs to.

`BATCH_SCHEDULE="iris=*/10 * * * *; digits-light=300"` runs `iris` every ten minutes (a five-field
crontab, UTC) and `digits-light` every 300 seconds. Each fire is tagged with its period (the minute of a
crontab fire, the interval's ordinal for an interval), and a model runs once per period, so a duplicate
fire (a second beat, a restarted one) is harmless.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from celery.schedules import crontab

TASK = "batch_scheduled"


@dataclass(frozen=True)
class Entry:
    """One scheduled run: the model and when, as configured and as a beat schedule."""

    model: str
    when: str
    schedule: crontab | float

    @property
    def beat(self) -> dict:
        """The entry as Celery's `beat_schedule` holds it."""
        return {"task": TASK, "schedule": self.schedule, "args": [self.model, self.when],
                "options": {"queue": "batch"}}


def parse(text: str) -> list[Entry]:
    """The entries of a `BATCH_SCHEDULE` value; ValueError naming the entry that is wrong."""
    entries: dict[str, Entry] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        model, sep, when = (s.strip() for s in part.partition("="))
        if not sep or not model or not when:
            raise ValueError(f"BATCH_SCHEDULE entry {part!r}: write model=<five-field crontab or seconds>")
        if model in entries:
            raise ValueError(f"BATCH_SCHEDULE names model {model!r} twice")
        entries[model] = Entry(model, when, _schedule(when, part))
    return list(entries.values())


def _schedule(when: str, part: str) -> crontab | float:
    fields = when.split()
    try:
        if len(fields) == 1:
            seconds = float(when.removesuffix("s"))
            if seconds > 0:
                return seconds
        elif len(fields) == 5:
            minute, hour, day_of_month, month_of_year, day_of_week = fields
            return crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
                           day_of_week=day_of_week)
    except ValueError:
        pass
    raise ValueError(f"BATCH_SCHEDULE entry {part!r}: {when!r} is neither a five-field crontab nor seconds > 0")


def period(when: str, at: float | None = None) -> str:
    """The period a fire of schedule `when` at time `at` belongs to: the same for a duplicate fire."""
    at = time.time() if at is None else at
    fields = when.split()
    stamp = (f"i{int(at // float(when.removesuffix('s')))}" if len(fields) == 1
             else time.strftime("%Y-%m-%dT%H:%M", time.gmtime(at)))
    return f"{stamp} {hashlib.sha1(when.encode()).hexdigest()[:12]}"
