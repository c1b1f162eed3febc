"""The prediction cache pattern: outputs in Redis, keyed by model, version and a hash of the input tensors.

A model's spec turns it on with `options.cache_ttl_s`. The key holds the model's name and version, a
fingerprint of the version's artefact and spec (a version replaced in place never serves the old one's
answers) and `models.tensor.digest` of the request's tensors. One Lua script looks up, counts the hit or
miss, and on a miss takes the key's compute lock: of concurrent identical misses, one runs the model and
the others wait a moment for its answer (single flight). Redis unreachable: predictions are served
uncached, and Redis is left alone for `RETRY_S` before it is tried again, so no request waits on it twice.
A miss waits on Redis once, for the lookup: the answer is stored and the lock released by commands sent on a
connection of their own without waiting for the replies (`Writer`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import numpy as np
import redis

import models
from models.tensor import digest, pack, unpack

log = logging.getLogger(__name__)
T = TypeVar("T")
STATS = "cache:stats"
RETRY_S = 5.0
LOCK_MS = 10_000
"""Longest a miss holds its key's compute lock; waiters give up and compute themselves after WAIT_S."""
WAIT_S = 2.0
_LOOKUP = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':hits', 1)
  return {1, value}
end
redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':misses', 1)
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return {0} end
return {2}
"""


class Outcome(StrEnum):
    """How a prediction was answered, as the `X-Cache` header says it."""

    HIT = "HIT"
    MISS = "MISS"


@dataclass(frozen=True)
class Answer:
    """A prediction's outputs and whether they came from the cache."""

    outputs: dict[str, np.ndarray]
    outcome: Outcome


class PredictionCache:
    """Cached predictions on one Redis."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._lookup = client.register_script(_LOOKUP)
        self.breaker = Breaker("prediction cache")
        self._lock = threading.Lock()
        self._writer = Writer(client)

    def predict(self, version: models.ModelVersion, inputs: dict[str, np.ndarray]) -> Answer:
        """The version's outputs for `inputs`: from the cache when it holds them, else computed and stored."""
        ttl_s = version.spec.options.cache_ttl_s
        if ttl_s <= 0 or self.breaker.open:
            return Answer(models.predict(version, inputs), Outcome.MISS)
        key = f"cache:{version.name}:{version.number}:{version.fingerprint}:{digest(inputs)}"
        found = self.breaker.call(lambda: self._lookup(keys=[key, key + ":lock", STATS], args=[LOCK_MS, version.name]))
        if found is not None and found[0] == 1:
            return Answer(unpack(found[1]), Outcome.HIT)
        if found is not None and found[0] == 2 and (waited := self._wait(key)) is not None:
            return Answer(unpack(waited), Outcome.HIT)
        outputs = models.predict(version, inputs)
        if found is not None:
            self._later(key, pack(outputs), int(ttl_s * 1000))
        return Answer(outputs, Outcome.MISS)

    def _later(self, key: str, packed: bytes, ttl_ms: int) -> None:
        """Store the answer and release its lock without waiting for Redis's replies (read on later stores)."""
        with self._lock:
            try:
                self._writer.send(("SET", key, packed, "PX", ttl_ms), ("DEL", key + ":lock"))
            except redis.RedisError as exc:
                self.breaker.trip(exc)

    def stats(self) -> dict[str, dict[str, int]]:
        """Hits and misses counted per model, across every web process."""
        counts: dict[str, dict[str, int]] = {}
        for field, value in self.client.hgetall(STATS).items():
            model, _, kind = field.decode().rpartition(":")
            counts.setdefault(model, {"hits": 0, "misses": 0})[kind] = int(value)
        return counts

    def _wait(self, key: str) -> bytes | None:
        """Another process is computing this answer: poll for it a while."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            time.sleep(0.002)
            value, locked = self.breaker.call(lambda: self.client.pipeline().get(key).exists(key + ":lock").execute()) \
                or (None, 0)
            if value is not None or not locked:
                return value
        return None


class Breaker:
    """Calls to a Redis that may be down: after a failure, none for RETRY_S, so no request waits on it twice."""

    def __init__(self, what: str):
        self.what, self.until = what, 0.0

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
        """Leave Redis alone for RETRY_S after `exc`."""
        self.until = time.monotonic() + RETRY_S
        log.warning("%s bypassed for %.0f s: %s", self.what, RETRY_S, exc)


class Writer:
    """One connection of its own that sends commands without waiting for their replies, reading those
    that have arrived before each new command, so a miss's store never holds up the request."""

    MAX_PENDING = 256
    DRAIN_AT = 32
    """Replies are read once this many are owed, not after every command: fewer syscalls per miss."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self.connection: redis.connection.AbstractConnection | None = None
        self.pending = 0

    def send(self, *commands: tuple[object, ...]) -> None:
        """Send commands in one write; a reply of an earlier one that reports an error is logged."""
        if self.connection is None:
            self.connection = self.client.connection_pool.make_connection()
        try:
            if self.pending >= self.DRAIN_AT:
                self.drain(block=self.pending >= self.MAX_PENDING)
            self.connection.send_packed_command(self.connection.pack_commands(commands))
            self.pending += len(commands)
        except redis.RedisError:
            self.connection.disconnect()
            self.pending = 0
            raise

    def drain(self, block: bool = False) -> None:
        """Read the replies that have come (all of them, with `block`)."""
        while self.connection is not None and self.pending and (block or self.connection.can_read(timeout=0)):
            self.pending -= 1
            try:
                self.connection.read_response()
            except redis.ResponseError as exc:  # e.g. out of memory: that answer goes uncached
                log.warning("prediction cache: a store failed: %s", exc)
