"""Calls to a Redis that may be down: after one fails, none for a while, so no request waits on it twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_S = 5.0


class Breaker:
    """Skip a Redis that just failed for `retry_s`; callers go on without it (a cache, never the truth)."""

    def __init__(self, what: str, retry_s: float = RETRY_S):
        self.what, self.retry_s, self.until = what, retry_s, 0.0

    @property
    def open(self) -> bool:
        """Whether Redis is being left alone right now."""
        return time.monotonic() < self.until

    def call(self, call: Callable[[], T]) -> T | None:
        """Run one Redis call; None if it failed or Redis is being left alone."""
        if self.open:
            return None
        try:
            return call()
        except redis.RedisError as exc:
            self.trip(exc)
            return None

    def trip(self, exc: Exception) -> None:
        """Leave Redis alone for `retry_s` after `exc`."""
        self.until = time.monotonic() + self.retry_s
        log.warning("%s bypassed for %.0f s: %s", self.what, self.retry_s, exc)
