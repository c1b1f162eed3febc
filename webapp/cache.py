"""The prediction cache pattern: a model's answers in Redis, keyed by model, version and a hash of the input tensors.

A model's spec turns it on with `options.cache_ttl_s`. The key holds the model's name and version, a
fingerprint of the version's artefact and spec (a version replaced in place never serves the old one's
answers) and `models.tensor.digest` of the request's tensors, so an entry is the one answer its key can have.

Every request is looked up before the model runs, in two tiers: this process's latest entries (a `TLRUCache`
bounded in bytes, each entry dropped when its Redis copy expires), then Redis, where one Lua script reads the
entry, counts the hit or the miss and, on a miss, takes the key's compute lock. Single flight: of concurrent
identical misses the holder of the lock runs the model and stores the answer; the others wait up to `WAIT_S`
for it and run the model themselves if it does not come. The lock is released whatever the model raises.
The waits sleep in the thread serving the request: the data plane never runs a cached model on the event loop.
Redis unreachable: predictions are served uncached and Redis is left alone for a while (`Breaker`).
Only the graph's outputs are stored in Redis; derived ones are derived again on a Redis hit.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections import Counter
from enum import StrEnum
from typing import NamedTuple

import cachetools
import numpy as np
import redis

import models
from models import postprocess
from models.tensor import digest, pack, unpack
from tasks.breaker import Breaker

STATS = "cache:stats"
LOCK_MS = 10_000
"""Longest a miss holds its key's compute lock (a model run longer than this lets another start)."""
WAIT_S = 2.0
"""Longest a request waits for an identical one's answer before it runs the model itself."""
POLL_S = (0.001, 0.05)
"""The first and the longest pause between two looks for the answer being computed."""
COUNT_EVERY_S = 1.0
"""Hits answered in this process reach Redis's counts within this long (or at once for `stats`)."""
_LOOKUP = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':hits', 1)
  return {1, value, redis.call('PTTL', KEYS[1])}
end
redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':misses', 1)
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[1]) then return {0} end
return {2}
"""
_STORE = """
if ARGV[1] ~= '' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""
Outputs = dict[str, np.ndarray]


class Outcome(StrEnum):
    """How a prediction was answered, as the `X-Cache` header says it."""

    HIT = "HIT"
    MISS = "MISS"


class Answer(NamedTuple):
    """A prediction's outputs and whether they came from the cache."""

    outputs: Outputs
    outcome: Outcome


class Entry(NamedTuple):
    """An answer kept in this process: read-only outputs every hit shares, its size and when it expires."""

    outputs: Outputs
    size: int
    expires: float


class PredictionCache:
    """Cached predictions on one Redis, with the latest ones kept in this process too."""

    def __init__(self, client: redis.Redis, local_bytes: int = 64 << 20):
        self.client = client
        self.breaker = Breaker("prediction cache")
        self.local = cachetools.TLRUCache(max(local_bytes, 1), ttu=lambda _key, entry, _now: entry.expires,
                                          getsizeof=lambda entry: entry.size)
        self.keep_local = local_bytes > 0
        self._lock = threading.Lock()
        self._lookup = client.register_script(_LOOKUP)
        self._store = client.register_script(_STORE)
        self._hits: Counter[str] = Counter()
        self._counted_at = time.monotonic()

    def predict(self, version: models.ModelVersion, inputs: dict[str, np.ndarray]) -> Answer:
        """The version's outputs for `inputs`: from the cache when it holds them, else computed and stored."""
        ttl_ms = int(version.spec.options.cache_ttl_s * 1000)
        if ttl_ms <= 0:
            return Answer(models.predict(version, inputs), Outcome.MISS)
        key = f"cache:{version.key}:{digest(inputs)}"
        with self._lock:
            entry = self.local.get(key)
        if entry is not None:
            self._count_hit(version.name)
            return Answer(dict(entry.outputs), Outcome.HIT)
        token = secrets.token_hex(8)
        found = self.breaker.call(lambda: self._lookup([key, key + ":lock", STATS], [LOCK_MS, version.name, token]))
        if found is None:  # Redis failed, or is being left alone
            return Answer(models.predict(version, inputs), Outcome.MISS)
        if found[0] == 1:
            return Answer(self._kept(version, key, found[1], found[2]), Outcome.HIT)
        if found[0] == 2 and (value := self._wait(key)) is not None:
            return Answer(self._kept(version, key, value, ttl_ms), Outcome.HIT)
        return Answer(self._compute(version, key, inputs, ttl_ms, token if found[0] == 0 else ""), Outcome.MISS)

    def _compute(self, version: models.ModelVersion, key: str, inputs: dict[str, np.ndarray], ttl_ms: int,
                 token: str) -> Outputs:
        """Run the model and store its answer; the compute lock (held when `token` is set) is released
        whatever the model raises."""
        try:
            outputs = models.predict(version, inputs)
        except BaseException:
            if token:
                self.breaker.call(lambda: self._store([key, key + ":lock"], ["", ttl_ms, token]))
            raise
        packed = pack({o.name: outputs[o.name] for o in version.spec.runtime_outputs})
        self._keep(key, outputs, len(packed), ttl_ms)
        self.breaker.call(lambda: self._store([key, key + ":lock"], [packed, ttl_ms, token]))
        return outputs

    def _kept(self, version: models.ModelVersion, key: str, packed: bytes, ttl_ms: int) -> Outputs:
        """A Redis hit's outputs (the graph's as stored, and those derived from them), kept here for the rest
        of its Redis entry's life."""
        outputs = postprocess.derive(version.spec, unpack(packed))
        self._keep(key, outputs, len(packed), ttl_ms)
        return dict(outputs)

    def _keep(self, key: str, outputs: Outputs, size: int, ttl_ms: int) -> None:
        if not self.keep_local or ttl_ms <= 0:
            return
        for array in outputs.values():
            array.setflags(write=False)  # shared by every hit from now on
        entry = Entry(dict(outputs), size, time.monotonic() + ttl_ms / 1000)
        with self._lock, contextlib.suppress(ValueError):  # larger than the whole local tier: Redis only
            self.local[key] = entry

    def _wait(self, key: str) -> bytes | None:
        """Another request is computing this answer: look for it, with growing pauses, for up to WAIT_S."""
        deadline, pause = time.monotonic() + WAIT_S, POLL_S[0]
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(pause * 2, POLL_S[1])
            value, locked = self.breaker.call(lambda: self.client.pipeline().get(key).exists(key + ":lock").execute()) \
                or (None, 0)
            if value is not None or not locked:
                return value
        return None

    def _count_hit(self, model: str) -> None:
        """Count a hit Redis did not see; the counts go to Redis at most every COUNT_EVERY_S."""
        with self._lock:
            self._hits[model] += 1
            due = time.monotonic() - self._counted_at >= COUNT_EVERY_S
        if due:
            self.flush()

    def flush(self) -> None:
        """Send the hits counted in this process to Redis."""
        with self._lock:
            hits, self._hits, self._counted_at = self._hits, Counter(), time.monotonic()
        if hits:
            pipe = self.client.pipeline(transaction=False)
            for model, n in hits.items():
                pipe.hincrby(STATS, f"{model}:hits", n)
            self.breaker.call(pipe.execute)

    def stats(self) -> dict[str, dict[str, int]]:
        """Hits and misses counted per model, across every web process."""
        self.flush()
        counts: dict[str, dict[str, int]] = {}
        for field, value in self.client.hgetall(STATS).items():
            model, _, kind = field.decode().rpartition(":")
            counts.setdefault(model, {"hits": 0, "misses": 0})[kind] = int(value)
        return counts

    def clear_local(self) -> None:
        """Forget the entries kept in this process (Redis keeps its copies)."""
        with self._lock:
            self.local.clear()

    def close(self) -> None:
        """Send the counts left and close the cache's Redis connections."""
        self.flush()
        self.client.close()
