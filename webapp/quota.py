"""Per-key request rates, counted in Redis by fixed windows (the `limits` library), taken in leases.

A process does not ask Redis for every request: it takes a key's allowance in leases of a hundredth of its
rate (at least one request; `hit` with that cost), spends them in process, and asks again once a lease is
spent or its window ends. A key limited to a few requests a second thus asks for each one, exactly; a key
allowed thousands asks about once per hundredth of its rate. Across processes the count stays exact in
Redis; what a process leased and did not spend by the window's end is lost to the key (at most a hundredth of
its rate per process). Redis unreachable: requests are let through (a rate limit protects capacity, it is no
security boundary) and Redis is left alone for a few seconds, with a warning in the log.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import limits
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from tasks.breaker import Breaker

LEASE_SHARE = 100
"""A lease is this fraction of a key's rate (at least one request)."""


@lru_cache(maxsize=256)
def rate(text: str) -> limits.RateLimitItem:
    """A rate in `limits` notation (`100/second`), parsed once; ValueError if it is not one."""
    return limits.parse(text)


@dataclass
class Lease:
    """What a process may still spend of one key's window, and when that window ends (wall clock)."""

    left: int = 0
    ends: float = 0.0
    refused: bool = False


class Quota:
    """Requests per key and window, against the Redis at `url`; `default` for keys that set none (None: no limit)."""

    def __init__(self, url: str, default: str | None, timeout_s: float = 0.5):
        self.default = None if default is None else rate(default)
        storage = storage_from_string(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.storage, self.limiter = storage, FixedWindowRateLimiter(storage)
        self.breaker = Breaker("rate limiter")
        self.leases: dict[int, Lease] = {}
        self.lock = threading.Lock()

    def take(self, key_id: int, limit: str | None = None) -> bool:
        """Spend one request of the key's lease in this process, with no I/O: False if it has none left (then
        `wait` asks Redis)."""
        if self._item(limit) is None:
            return True
        with self.lock:
            lease = self.leases.get(key_id)
            if lease is None or lease.refused or lease.left <= 0 or time.time() >= lease.ends:
                return False
            lease.left -= 1
            return True

    def wait(self, key_id: int, limit: str | None = None) -> int:
        """Count one request of key `key_id`: 0 if it is within its rate, else the seconds until its window
        resets. Asks Redis for a new lease when the last one is spent or over."""
        item = self._item(limit)
        if item is None or self.take(key_id, limit):
            return 0
        lease = self._lease(item, key_id)
        with self.lock:
            self.leases[key_id] = lease
            if lease.refused:
                return max(1, math.ceil(lease.ends - time.time()))
            lease.left -= 1
        return 0

    def _lease(self, item: limits.RateLimitItem, key_id: int) -> Lease:
        """A new lease from Redis: a hundredth of the rate, or what is left of the window if less."""
        size = max(1, item.amount // LEASE_SHARE)
        granted = self.breaker.call(lambda: self._hit(item, key_id, size))
        if granted is None:  # Redis is unreachable: the request goes through
            return Lease(left=1, ends=time.time() + 1)
        return granted

    def _hit(self, item: limits.RateLimitItem, key_id: int, size: int) -> Lease:
        identifiers = ("key", str(key_id))
        if not self.limiter.hit(item, *identifiers, cost=size):
            remaining = self.limiter.get_window_stats(item, *identifiers).remaining
            size = min(size, remaining)
            if size <= 0 or not self.limiter.hit(item, *identifiers, cost=size):
                return Lease(ends=self.limiter.get_window_stats(item, *identifiers).reset_time, refused=True)
        return Lease(left=size, ends=self.limiter.get_window_stats(item, *identifiers).reset_time)

    def _item(self, limit: str | None) -> limits.RateLimitItem | None:
        return self.default if limit is None else rate(limit)

    def close(self) -> None:
        """Close the connections to Redis."""
        self.storage.get_connection().close()
