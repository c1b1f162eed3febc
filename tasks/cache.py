"""The prediction cache pattern: outputs in Redis, keyed by model, version and a hash of the input tensors.

A model's spec turns it on with `options.cache_ttl_s`. The key holds the model's name and version, a
fingerprint of the version's artefact and spec (a version replaced in place never serves the old one's
answers) and `models.tensor.digest` of the request's tensors, so an entry is the one answer its key can have:
copies of it can be stale only by age, never wrong.

Two tiers. Each web process keeps the entries it stored or read lately (`Local`, bounded in bytes, each one
dropped when its Redis copy expires), so a repeated request is answered without leaving the process; Redis
holds them for every process. One Lua script looks up, counts the hit or miss, and on a miss takes the key's
compute lock; it is written on the thread's own connection (`tasks.resp`) and its reply read when wanted,
which is how a miss can proceed without waiting. How it proceeds depends on what the model costs, measured
as it serves (`Costs`):
- a model that costs more than `OVERLAP_BELOW` lookups waits for the lookup first: of concurrent identical
  misses, one runs the model and the others wait a moment for its answer (single flight);
- a cheaper one runs while its lookup is in flight, so a miss costs no round trip (waiting for another
  process's answer would cost about as much as computing it), unless its lookups hit so often that waiting
  for them saves more than the round trip costs;
- while hardly any request is found in either tier (under one in `SAMPLE_EVERY` of those looked up), a
  cheap model's requests are not looked up before they are answered. At first each `SAMPLE_EVERY`-th is a
  sample: answered by the model, then behind its answer stored in Redis unless its key is there (`SET NX`,
  sent by the cache's writer thread), which says whether it would have been found; the next ones of its
  size are counted out (`Costs.skip_next`) and go straight to the model: not timed (costs are learnt from
  the samples), hashed or stored, only counted. The longer nothing is found, the wider the gap between
  samples (up to `SAMPLE_GAP_MAX` requests). A sample found ends the count, and the requests after it are
  looked up again.
The answer is stored and the lock released by commands whose replies nobody waits for (they are read on the
way to the next lookup's, or behind the next sample's answer); a store no other request can be waiting for
(its key was not locked) goes with a batch (`Writes`): each write wakes Redis, which on a host it shares
with the web process takes the cores the next model run needs. Hits answered in-process go to Redis with
the next write, within `COUNT_EVERY_S` of traffic (at once for `stats`). Only the graph's outputs are
stored; derived ones are derived again on a hit.
Redis unreachable: predictions are served uncached, and Redis is left alone for `RETRY_S` before it is tried
again, so no request waits on it twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from enum import StrEnum
from typing import NamedTuple, TypeVar

import numpy as np
import redis

import models
from models import postprocess
from models.tensor import digest, pack, unpack
from tasks.resp import Line, Lines, Wanted, encode

log = logging.getLogger(__name__)
T = TypeVar("T")
STATS = "cache:stats"
RETRY_S = 5.0
LOCK_MS = 10_000
"""Longest a miss holds its key's compute lock; waiters give up and compute themselves after WAIT_S."""
WAIT_S = 2.0
COUNT_EVERY_S = 1.0
"""Hits answered in-process are sent with the next write to Redis, or on their own after this long."""
OVERLAP_BELOW = 80
"""A model run estimated below this many lookup round trips runs while its lookup is in flight; one above it
waits for its lookup first. The wait costs a miss about two of the round trips learnt (the fastest ones, and
the process idles and wakes), so at most 1/40 (2.5%)."""
SAMPLE_EVERY = 16
"""While fewer than one request in this many is found in the cache, at first only every this-many-th is
sampled (the others are neither looked up nor stored); likewise a cheap model's lookups in Redis while they
hit that rarely."""
SAMPLE_GAP_MAX = 256
"""For each SAMPLE_GAP_S in which nothing of a version was found, the gap between samples doubles, up to
this many requests: a sample costs its hash, its store and a write to Redis (about a model run's worth of
a one-row request, here), spread over more requests the longer the traffic stays new; a request found puts
it back to SAMPLE_EVERY. The gap never spans more requests than came in about SAMPLE_GAP_S, so a quiet
server still samples about that often."""
SAMPLE_GAP_S = 1.0
ROUND_TRIP_STALE_S = 1.0
"""A lookup round trip last measured longer ago than this is measured again by the next sampled lookup,
which waits for its reply (lookups that run the model meanwhile measure none), so one slow reply does not
stand for good."""
WRITE_BATCH = 16
"""Commands nobody waits for that are written to Redis together (`Writes`)."""
WRITE_DELAY_S = 0.01
"""Longest such a command waits for others before a thread of the cache's own writes it."""
WRITER_IDLE_S = 1.0
"""That thread ends after this long with nothing to write (and starts again with the next store)."""
_LOOKUP = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':hits', 1)
  return {1, value, redis.call('PTTL', KEYS[1])}
end
redis.call('HINCRBY', KEYS[3], ARGV[2] .. ':misses', 1)
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[1]) then return {0} end
return {2}
"""
_LOOKUP_SHA = hashlib.sha1(_LOOKUP.encode()).hexdigest()
Outputs = dict[str, np.ndarray]


class Outcome(StrEnum):
    """How a prediction was answered, as the `X-Cache` header says it."""

    HIT = "HIT"
    MISS = "MISS"


class Answer(NamedTuple):
    """A prediction's outputs and whether they came from the cache."""

    outputs: Outputs
    outcome: Outcome


class Lookup(StrEnum):
    """How a miss in this process's copy goes to Redis (`Costs.lookup` chooses)."""

    FIRST = "first"
    """Wait for the lookup, then run the model: single flight, and a hit saves the whole run."""
    OVERLAP = "overlap"
    """Run the model while the lookup is in flight: a miss costs no round trip."""
    SKIP = "skip"
    """Run the model without a lookup (its lookups hardly ever hit); the answer is still stored."""


class PredictionCache:
    """Cached predictions on one Redis, with a copy of the latest ones in this process."""

    def __init__(self, client: redis.Redis, local_bytes: int = 64 << 20):
        self.client = client
        self.breaker = Breaker("prediction cache")
        self.local = Local(local_bytes)
        self.costs = Costs()
        self.lines = Lines(client)
        self.writes = Writes(self)
        self.script_known = False
        """Whether Redis holds the lookup script: lookups send its text (EVAL) until one has been answered, then
        name it by its digest (EVALSHA)."""
        self._counts: Counter[tuple[str, str]] = Counter()
        self._counts_lock = threading.Lock()
        self._counted_out: deque[str] = deque()
        """A model name per miss counted out or sampled, taken into `_counts` with the next write (appending to a
        deque and taking from it are each atomic: no lock on the path of those requests)."""
        self._counted_at = time.monotonic()
        self._behind = Behind()

    def predict(self, version: models.ModelVersion, inputs: dict[str, np.ndarray], behind: bool = False) -> Answer:
        """The version's outputs for `inputs`: from the cache when it holds them, else computed and stored.

        With `behind`, what is left to do once the answer is known (keeping and storing it) waits for
        `catch_up`, which the server calls after sending the answer.
        """
        ttl_s = version.spec.options.cache_ttl_s
        if ttl_s <= 0:
            return Answer(models.predict(version, inputs), Outcome.MISS)
        rows = _rows(inputs)
        if self.costs.skipping(version, rows):  # not looked up, timed, hashed or stored; counted
            self._counted_out.append(version.name)
            return Answer(models.predict(version, inputs), Outcome.MISS)
        if self._behind.work:
            self.catch_up()  # in case the server did not, after this thread's previous answer
        ttl_ms = int(ttl_s * 1000)
        if self.costs.rarely_found(version) and self.costs.cheap(version, rows):
            # the request after the counted-out ones: answered by the model, and behind its answer stored
            # unless the cache holds it (which says whether it would have been found), `_sample`
            outputs = self._run(version, inputs, rows)
            self._finish(behind, lambda: self._sample(version, inputs, outputs, rows, ttl_ms))
            self.costs.skip_next(version, rows)
            return Answer(outputs, Outcome.MISS)
        answer = self._look(version, inputs, rows, ttl_ms, self.costs.sampled(version), behind)
        self.costs.found(version, answer.outcome is Outcome.HIT)
        return answer

    def _look(self, version: models.ModelVersion, inputs: dict[str, np.ndarray], rows: int, ttl_ms: int,
              sampled: bool, behind: bool) -> Answer:
        """The answer from this process's copy, else from Redis or the model as `Costs.lookup` says."""
        key = _key(version, inputs)
        if (kept := self.local.get(key)) is not None:
            self._count(version.name, "hits")
            return Answer(dict(kept), Outcome.HIT)
        if self.breaker.open:
            return Answer(models.predict(version, inputs), Outcome.MISS)
        way = self.costs.lookup(version, rows, sampled)
        line = None if way is Lookup.SKIP else \
            self._send((*self._lookup_script(), 3, key, key + ":lock", STATS, LOCK_MS, version.name))
        if line is None:  # not looked up, or Redis just failed
            outputs = self._run(version, inputs, rows)
            if way is Lookup.SKIP:
                self._count(version.name, "misses")
                self._finish(behind, lambda: self._store(version, key, outputs, ttl_ms, locked=False))
            return Answer(outputs, Outcome.MISS)
        outputs, hit, locked = self._ask(version, key, inputs, rows, ttl_ms, line, way)
        if locked:
            self._finish(behind, lambda: self._store(version, key, outputs, ttl_ms, locked=True))
        return Answer(outputs, Outcome.HIT if hit else Outcome.MISS)

    def _ask(self, version: models.ModelVersion, key: str, inputs: dict[str, np.ndarray], rows: int, ttl_ms: int,
             line: Line, way: Lookup) -> tuple[Outputs, bool, bool]:
        """The outputs, whether they were a hit, and whether this request holds the key's lock (so stores)."""
        if way is Lookup.OVERLAP:
            outputs = self._run(version, inputs, rows)  # while the lookup is in flight
            found = self._reply(version, line, None)
            if found is not None and found[0] == 1:
                return self._kept(version, key, found[1], found[2]), True, False
            return outputs, False, found is not None and found[0] == 0
        found = self._reply(version, line, time.perf_counter())
        if found is not None and found[0] == 1:
            return self._kept(version, key, found[1], found[2]), True, False
        if found is not None and found[0] == 2 and (waited := self._wait(key)) is not None:
            return self._kept(version, key, waited, ttl_ms), True, False
        return self._run(version, inputs, rows), False, found is not None and found[0] == 0

    def _sample(self, version: models.ModelVersion, inputs: dict[str, np.ndarray], outputs: Outputs, rows: int,
                ttl_ms: int) -> None:
        """Behind an answer sampled while requests are rarely found: whether the cache held it (Redis holds
        what this process keeps), learnt from a store made unless it was there, in Redis only (as those
        counted out). The writer thread sends it (`Writes`), so no request writes it or waits for it."""
        self._collect()
        self._counted_out.append(version.name)  # counted as those counted out: its store's write takes it
        if self.breaker.open:
            return
        stored = _packed(version, outputs)

        def held(reply: object) -> None:  # SET NX answers nil when the key was there
            if not isinstance(reply, redis.ResponseError):
                self._learn(version, rows, reply is None)

        self.writes.add(("SET", _key(version, inputs), stored, "NX", "PX", ttl_ms), taker=held)

    def _collect(self) -> None:
        """Read the replies owed on the line this thread last wrote a batch of stores on (`Writes.add`): no
        lookup may read past them for a while (they came long since)."""
        if (line := self._behind.owing) is not None:
            self._behind.owing = None
            self._settle(line)

    def _learn(self, version: models.ModelVersion, rows: int, found: bool) -> None:
        """What a sample behind an answer found: the rates learn it, and once found, the next request of its
        size is looked up rather than counted out."""
        self.costs.found(version, found)
        self.costs.looked_up(version, None, found)
        if found:
            self.costs.skips.pop((version.key, _bucket(rows)), None)

    def _finish(self, behind: bool, work: Callable[[], None]) -> None:
        """Do `work` now, or with `behind` once the answer has been sent (`catch_up`)."""
        if not behind:
            work()
            return
        self._behind.work.append(work)

    def catch_up(self) -> None:
        """Do what this thread's answers left for after they were sent (keep and store them)."""
        pending = self._behind.work
        while pending:
            pending.pop(0)()

    def _send(self, *commands: tuple[object, ...], wanted: Wanted = True) -> Line | None:
        """Write `commands` on this thread's line, with the counts taken here since the last write; None if
        Redis failed (then left alone a while)."""
        return self._write([(command, wanted) for command in commands])

    def _write(self, commands: list[tuple[tuple[object, ...], Wanted]]) -> Line | None:
        """`_send` for commands each with whether its reply is wanted, or the function it goes to."""
        counts = self._take_counts()
        line = self.lines.get()
        try:
            line.send(encode(*(command for command, _ in commands), *counts),
                      [wanted for _, wanted in commands] + [False] * len(counts))
        except redis.RedisError as exc:
            self.breaker.trip(exc)
            return None
        return line

    def _settle(self, line: Line) -> None:
        """Read every reply owed on `line`; Redis failing is noted (then left alone a while)."""
        try:
            line.settle()
        except redis.RedisError as exc:
            self.breaker.trip(exc)

    def _read(self, line: Line) -> object | None:
        """The next wanted reply on `line` (never nil for the commands sent here); None if Redis failed."""
        try:
            return line.reply()
        except redis.RedisError as exc:
            self.breaker.trip(exc)
            return None

    def _run(self, version: models.ModelVersion, inputs: dict[str, np.ndarray], rows: int) -> Outputs:
        started = time.perf_counter()
        outputs = models.predict(version, inputs)
        self.costs.ran(version, time.perf_counter() - started, rows)
        return outputs

    def _lookup_script(self) -> tuple[str, str]:
        """How a lookup names its script: by its digest once Redis is known to hold it, else with its text
        (which Redis then keeps)."""
        return ("EVALSHA", _LOOKUP_SHA) if self.script_known else ("EVAL", _LOOKUP)

    def _reply(self, version: models.ModelVersion, line: Line, sent_at: float | None) -> list | None:
        """The lookup script's reply; None when Redis failed (then left alone a while) or refused it (then
        the request is a miss Redis did not count). With `sent_at`, the wait is a round trip to learn from."""
        reply = self._read(line)
        if reply is None:
            return None
        if isinstance(reply, redis.ResponseError):  # this answer goes uncached
            self._count(version.name, "misses")
            if str(reply).startswith("NOSCRIPT"):  # Redis restarted, or its scripts were flushed
                self.script_known = False  # the next lookup sends the text again
                log.info("prediction cache: Redis no longer holds the lookup script; sending it again")
            else:  # e.g. out of memory
                log.warning("prediction cache: a lookup failed: %s", reply)
            return None
        self.script_known = True
        self.costs.looked_up(version, None if sent_at is None else time.perf_counter() - sent_at, reply[0] == 1)
        return reply

    def _kept(self, version: models.ModelVersion, key: str, packed: bytes, ttl_ms: int) -> Outputs:
        """A hit's outputs, its entry kept in this process for the rest of its Redis entry's life."""
        outputs = _outputs(version, packed)
        self.local.put(key, outputs, len(packed), ttl_ms)
        return dict(outputs)

    def _store(self, version: models.ModelVersion, key: str, outputs: Outputs, ttl_ms: int, locked: bool,
               keep: bool = True) -> None:
        """Keep the answer here (with `keep`), and store it in Redis without waiting: at once when this
        request holds the key's lock (others may be waiting for the answer), else with the next batch."""
        stored = _packed(version, outputs)
        if keep:
            self.local.put(key, outputs, len(stored), ttl_ms)
        if self.breaker.open:
            return
        if locked:
            self.writes.add(("SET", key, stored, "PX", ttl_ms), ("DEL", key + ":lock"), now=True)
        else:
            self.writes.add(("SET", key, stored, "PX", ttl_ms))

    def _count(self, model: str, kind: str) -> None:
        """Count a hit or miss Redis did not see; the counts go with the next write, or alone after
        COUNT_EVERY_S."""
        with self._counts_lock:
            self._counts[model, kind] += 1
        if time.monotonic() - self._counted_at >= COUNT_EVERY_S and not self.breaker.open:
            self._send()

    def _take_counts(self) -> list[tuple[object, ...]]:
        if not self._counts and not self._counted_out:
            return []
        with self._counts_lock:
            counts, self._counts, out = self._counts, Counter(), self._counted_out
            for _ in range(len(out)):  # those appended meanwhile go with a later write
                counts[out.popleft(), "misses"] += 1
            self._counted_at = time.monotonic()
        return [("HINCRBY", STATS, f"{model}:{kind}", n) for (model, kind), n in counts.items()]

    def flush(self) -> None:
        """Wait until this process's stores and counts have reached Redis."""
        self.catch_up()
        self.writes.write()
        if (line := self._send(("PING",))) is not None:
            self._read(line)

    def close(self) -> None:
        """Close this cache's Redis lines, every thread's, once its writer thread has ended (what is waiting
        to be written is dropped)."""
        self.writes.stop()
        self.lines.close_all()

    def stats(self) -> dict[str, dict[str, int]]:
        """Hits and misses counted per model, across every web process."""
        self.flush()
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


class Behind(threading.local):
    """A thread's work left for after its answers are sent (`PredictionCache.catch_up`), and the line it last
    wrote a batch of stores on, if their replies are still owed."""

    def __init__(self) -> None:
        self.work: list[Callable[[], None]] = []
        self.owing: Line | None = None


class Writes:
    """Commands nobody waits for (stores), written to Redis together: once WRITE_BATCH of them are waiting or
    one must go at once, by the request that adds it; otherwise WRITE_DELAY_S after the first of them by a
    thread of their own, which waits for Redis to have run them; that thread writes at once a command whose
    reply some function takes (`add`), which it hands the reply. Those waiting when the process ends are lost
    (they are cache entries: the answers were sent)."""

    def __init__(self, cache: PredictionCache):
        self.cache = cache
        self._start()

    def _start(self) -> None:
        self.pid, self.waiting = os.getpid(), []
        self.urgent = False
        """Whether a command waiting has a taker: the writer thread writes it without waiting for others."""
        self.lock = threading.Lock()
        self.came = threading.Condition(self.lock)
        self.writing = threading.Lock()
        """Held while a batch is written and its replies read."""
        self.writer: threading.Thread | None = None
        self.stopped = False
        """Whether `stop` was called: commands are dropped, and the writer thread ends."""

    def add(self, *commands: tuple[object, ...], now: bool = False, taker: Wanted = False) -> None:
        """Write `commands` with the next batch, or `now` (with those waiting); their replies go to `taker`."""
        if self.pid != os.getpid():
            self._start()  # a new process: no writer thread here, nothing of the parent's to write
        with self.lock:
            if self.stopped:
                return
            self.waiting.extend((command, taker) for command in commands)
            if not now and len(self.waiting) < WRITE_BATCH:
                if self.writer is None:
                    self.writer = threading.Thread(target=self._write_later, name="cache-writes", daemon=True)
                    self.writer.start()
                elif len(self.waiting) == len(commands) or (taker and not self.urgent):
                    self.came.notify()
                self.urgent = self.urgent or bool(taker)
                return
            batch, self.waiting, self.urgent = self.waiting, [], False
        self.cache._behind.owing = self.cache._write(batch)  # read on the way to a lookup, or collected

    def write(self) -> None:
        """Write what is waiting now, on the calling thread's line, and wait until Redis has run it (and any
        batch being written meanwhile)."""
        with self.writing:
            with self.lock:
                batch, self.waiting, self.urgent = self.waiting, [], False
            if batch and (line := self.cache._write(batch)) is not None:
                self.cache._settle(line)

    def stop(self) -> None:
        """Drop what is waiting and end the writer thread, once what it is writing is written (the cache's
        lines are about to close: no thread may be using one then)."""
        with self.lock:
            self.stopped, self.waiting, writer = True, [], self.writer
            self.came.notify_all()
        if writer is not None and writer is not threading.current_thread():
            writer.join()

    def _write_later(self) -> None:
        while True:
            with self.lock:
                if not self.came.wait_for(lambda: self.waiting or self.stopped, timeout=WRITER_IDLE_S) or \
                        self.stopped:
                    self.writer = None
                    break
                self.came.wait_for(lambda: self.urgent or self.stopped, timeout=WRITE_DELAY_S)
            self.write()
        self.cache.lines.close()


class Local:
    """The entries this process stored or read lately, least recently used dropped past `max_bytes`, each one
    kept no longer than its Redis copy. An entry is an answer's outputs, derived ones included, as arrays made
    read-only and shared by every hit (each gets a dictionary of its own), so a hit neither unpacks nor
    derives; it is counted as its packed bytes, as stored in Redis, and OVERHEAD."""

    OVERHEAD = 128
    """Bytes counted per entry beyond its packed bytes (key, tuple, dictionary slot)."""
    ARRAY_OVERHEAD = 112
    """And per array (the array object and its dictionary slot)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self.entries: OrderedDict[str, tuple[float, Outputs, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Outputs | None:
        """The entry's outputs (not to be changed), None if not kept or expired."""
        if not self.max_bytes:
            return None
        with self._lock:
            entry = self.entries.get(key)
            if entry is None:
                return None
            if entry[0] <= time.monotonic():
                self._drop(key)
                return None
            self.entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, outputs: Outputs, packed_size: int, ttl_ms: int) -> None:
        """Keep `outputs` (their arrays made read-only), whose packed form takes `packed_size` bytes, for
        `ttl_ms`."""
        size = packed_size + self.OVERHEAD + self.ARRAY_OVERHEAD * len(outputs)
        if ttl_ms <= 0 or size > self.max_bytes:
            return
        for array in outputs.values():
            array.flags.writeable = False
        with self._lock:
            if key in self.entries:
                self._drop(key)
            self.entries[key] = (time.monotonic() + ttl_ms / 1000, outputs, size)
            self.size += size
            while self.size > self.max_bytes:
                self._drop(next(iter(self.entries)))

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self.entries.clear()
            self.size = 0

    def _drop(self, key: str) -> None:
        self.size -= self.entries.pop(key)[2]


class Costs:
    """What each version's runs cost (per row, for runs of about as many rows: a row costs less in a bigger
    batch) and how often its lookups hit, and what a lookup costs: moving averages. Costs fall at once to a
    cheaper figure and rise slowly, so a first run that loaded the session, a first lookup that connected, or
    a pause of the process does not stand for the usual cost. Round trips are learnt from the lookups that
    wait for their reply."""

    WEIGHT = 0.2

    def __init__(self) -> None:
        self.per_row_s: dict[tuple[str, int], float] = {}
        """By `ModelVersion.key` (as the rest) and the run's rows rounded down to a power of two."""
        self.hit_rate: dict[str, float] = {}
        """Of the lookups sent to Redis, how many hit."""
        self.found_rate: dict[str, float] = {}
        """Of the requests looked up at all, how many were answered from either tier."""
        self.requests: dict[str, int] = {}
        self.skips: dict[tuple[str, int], Iterator[int]] = {}
        """Requests left to answer without a lookup, by version and batch-size bucket (`skipping`): an
        iterator over them, so two threads never take the same one (`next` on it is atomic)."""
        self.gaps: dict[tuple[str, int], tuple[int, float]] = {}
        """By version and bucket: the requests between the last sample and the next, and when it was taken."""
        self.new_since: dict[str, float] = {}
        """By version, while it is rarely found: since when nothing of it was (`time.monotonic`)."""
        self.round_trip_s: float | None = None
        self.round_trip_at = 0.0
        """When `round_trip_s` last learnt a round trip (`time.monotonic`)."""

    def sampled(self, version: models.ModelVersion) -> bool:
        """Whether this request is the version's SAMPLE_EVERY-th: looked up in both tiers whatever the rates
        say, so the rates follow the traffic."""
        key = version.key
        self.requests[key] = count = (self.requests.get(key, 0) + 1) % SAMPLE_EVERY
        return count == 0

    def skip_next(self, version: models.ModelVersion, rows: int) -> None:
        """After a sample's run: if the version is still rarely found and the run, just timed, still cheap,
        the requests of this size up to the next sample are answered without a lookup (`skipping` counts them
        out); rates and costs are judged again at the next sample. The gap is SAMPLE_EVERY requests, doubled
        for each SAMPLE_GAP_S in which nothing of the version was found, up to SAMPLE_GAP_MAX, and no more
        than came in SAMPLE_GAP_S at the rate since the last sample."""
        if not (self.rarely_found(version) and self.cheap(version, rows)):
            return
        key, now = (version.key, _bucket(rows)), time.monotonic()
        doublings = int((now - self.new_since.setdefault(version.key, now)) / SAMPLE_GAP_S)
        gap = min(SAMPLE_EVERY << min(doublings, SAMPLE_GAP_MAX.bit_length()), SAMPLE_GAP_MAX)
        if (last := self.gaps.get(key)) is not None:
            came = last[0] / max(now - last[1], 1e-6) * SAMPLE_GAP_S  # at the rate since the last sample
            gap = min(gap, max(SAMPLE_EVERY, int(came)))
        self.gaps[key] = gap, now
        self.count_out(version, rows, gap - 1)

    def count_out(self, version: models.ModelVersion, rows: int, requests: int) -> None:
        """Answer the next `requests` requests of this size without a lookup."""
        self.skips[version.key, _bucket(rows)] = iter(range(requests))

    def skipping(self, version: models.ModelVersion, rows: int) -> bool:
        """Whether this request is one of those `skip_next` left to answer without a lookup."""
        left = self.skips.get((version.key, _bucket(rows)))
        return left is not None and next(left, None) is not None

    def rarely_found(self, version: models.ModelVersion) -> bool:
        """Whether fewer than one request in SAMPLE_EVERY looked up lately was answered by the cache (then
        the others are not looked up: hashing the inputs and looking costs more than it finds). A version
        starts as found, so that takes a dozen misses in a row."""
        return self.found_rate.get(version.key, 1.0) < 1 / SAMPLE_EVERY

    def lookup(self, version: models.ModelVersion, rows: int, sampled: bool = False) -> Lookup:
        """How a run of `rows` rows missing in this process's copy should go to Redis. FIRST until the costs
        are measured, for a run over OVERLAP_BELOW round trips (single flight is worth its wait), when the
        run's cost times the hit rate (what waiting saves) passes a round trip (what it loses), and when
        `sampled` and the round trip is stale (ROUND_TRIP_STALE_S). Otherwise OVERLAP, or SKIP while fewer
        than one lookup in SAMPLE_EVERY hits, unless `sampled`."""
        if not self.cheap(version, rows):
            return Lookup.FIRST
        if sampled and time.monotonic() - self.round_trip_at > ROUND_TRIP_STALE_S:
            return Lookup.FIRST
        cost, hit_rate = self.cost(version, rows) or 0.0, self.hit_rate.get(version.key, 0.0)
        if cost * hit_rate >= (self.round_trip_s or 0.0):
            return Lookup.FIRST
        if hit_rate < 1 / SAMPLE_EVERY and not sampled:
            return Lookup.SKIP
        return Lookup.OVERLAP

    def cost(self, version: models.ModelVersion, rows: int) -> float | None:
        """The seconds a run of `rows` rows is expected to take; None before one of about as many was timed."""
        per_row = self.per_row_s.get((version.key, _bucket(rows)))
        return None if per_row is None else per_row * rows

    def cheap(self, version: models.ModelVersion, rows: int) -> bool:
        """Whether a run of `rows` rows is known to cost less than OVERLAP_BELOW lookup round trips."""
        cost, round_trip = self.cost(version, rows), self.round_trip_s
        return cost is not None and round_trip is not None and cost < OVERLAP_BELOW * round_trip

    def found(self, version: models.ModelVersion, hit: bool) -> None:
        key = version.key
        self.found_rate[key] = _average(self.found_rate.get(key, 1.0), float(hit), self.WEIGHT)
        if hit:
            self.new_since.pop(key, None)

    def ran(self, version: models.ModelVersion, seconds: float, rows: int) -> None:
        key = version.key, _bucket(rows)
        self.per_row_s[key] = _falling(self.per_row_s.get(key), seconds / max(rows, 1), self.WEIGHT)

    def looked_up(self, version: models.ModelVersion, round_trip_s: float | None, hit: bool) -> None:
        key = version.key
        self.hit_rate[key] = _average(self.hit_rate.get(key), float(hit), self.WEIGHT)
        if round_trip_s is not None:
            self.round_trip_s = _falling(self.round_trip_s, round_trip_s, self.WEIGHT)
            self.round_trip_at = time.monotonic()


def _bucket(rows: int) -> int:
    """Runs of 1, 2-3, 4-7, 8-15, ... rows."""
    return max(rows, 1).bit_length()


def _average(before: float | None, now: float, weight: float) -> float:
    return now if before is None else before + weight * (now - before)


def _falling(before: float | None, now: float, weight: float) -> float:
    """An average that falls at once to a lower figure and rises by `weight` towards a higher one."""
    return now if before is None or now < before else before + weight * (now - before)


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    first = next(iter(inputs.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def _key(version: models.ModelVersion, inputs: Mapping[str, np.ndarray]) -> str:
    """The cache key of a version's answer to `inputs`."""
    return f"cache:{version.key}:{digest(inputs)}"


def _packed(version: models.ModelVersion, outputs: Outputs) -> bytes:
    """An answer as it is stored: the graph's outputs only (the derived ones are derived again on a hit)."""
    return pack({o.name: outputs[o.name] for o in version.spec.runtime_outputs})


def _outputs(version: models.ModelVersion, packed: bytes) -> Outputs:
    """The outputs of a stored answer: the graph's, as stored, and those derived from them."""
    return postprocess.derive(version.spec, unpack(packed))


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
