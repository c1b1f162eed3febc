"""Batch tasks and an unreachable SQL store: which errors say so, and what a task does about it.

A store outage is no fault of the items: a task it stops is retried after a wait that doubles, and counts
no try of theirs. A task beat fires often (the reconciler, the purge) just skips the fire instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NoReturn

import sqlalchemy as sa
from celery import Task
from celery.utils.time import get_exponential_backoff_interval

from tasks.config import TaskSettings

log = logging.getLogger(__name__)
RETRIES = 90
"""Retries of a task the store stops: a quarter of an hour at the longest wait."""
LONGEST_WAIT_S = 10.0
"""The longest wait before such a retry: well inside a visibility timeout, and at most a quarter of a lease,
so a chunk that waited out an outage is back before the lease the reconciler renewed for it runs out."""


def unreachable(exc: sa.exc.DBAPIError) -> bool:
    """Whether an error of the store says it cannot be reached (a connection dropped, refused or timed out)
    rather than that a statement was wrong."""
    return isinstance(exc, sa.exc.OperationalError) or exc.connection_invalidated


def retry(task: Task, exc: sa.exc.DBAPIError, **kwargs: Any) -> NoReturn:
    """Retry a task the store stopped, after a wait that doubles up to LONGEST_WAIT_S; re-raise any other
    error of the store. `kwargs` change the task's keyword arguments."""
    if not unreachable(exc):
        raise exc
    longest = min(LONGEST_WAIT_S, TaskSettings.from_env().batch_item_lease_s / 4)
    wait = get_exponential_backoff_interval(1, task.request.retries, longest, full_jitter=False)
    log.warning("%s: the SQL store is unreachable (%s); retry %d in %.1f s", task.name, exc.orig,
                task.request.retries + 1, wait)
    raise task.retry(kwargs={**(task.request.kwargs or {}), **kwargs}, exc=exc, countdown=wait,
                     max_retries=RETRIES)


def skipped(what: str, call: Callable[[], dict[str, int]]) -> dict[str, int]:
    """`call()`; nothing if the store is unreachable, since beat fires the task again soon."""
    try:
        return call()
    except sa.exc.DBAPIError as exc:
        if not unreachable(exc):
            raise
        log.warning("%s skipped: the SQL store is unreachable (%s)", what, exc.orig)
        return {}
