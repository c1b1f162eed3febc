"""The prediction log's records: sampled by the model's `log_rate`, built from one prediction (sync, a job, a batch
item), and sent to a Redis stream by a thread of the process's own, which a worker drains into the SQL store.

Sampling is one random draw on the serving thread; a sampled prediction is only queued there. The thread builds
its record (the features or their digest, the outputs, the outlier flags) and adds it to the stream, bounded in
length (`PREDICTION_LOG_MAXLEN`, trimmed approximately, oldest first), so Redis never grows without bound. A full
queue, or Redis down, drops records and counts them: the log is a sample, and never slows or fails a prediction.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import redis
from celery.signals import worker_process_shutdown

import models
from models import instances, reference, tensor
from models.spec import ModelSpec
from tasks.breaker import Breaker
from tasks.config import TaskSettings
from tasks.items import Claimed
from tasks.jobs import Job, JobStore

log = logging.getLogger(__name__)
STREAM = "prediction-log"
FIELD = b"record"
QUEUED_MAX = 10_000
"""Sampled predictions a process holds for its thread at most; past it they are dropped (and counted)."""
LOGGED_VALUES_MAX = 100_000
"""Input values a record holds at most; a bigger request is recorded by its digest alone."""
SEND_MAX = 500
"""Records one round trip adds to the stream."""
SEND_EVERY_S = 0.25
"""How often the thread sends what was queued (at once when SEND_MAX wait): one round trip for many records,
since a round trip per record, on a thread beside the one serving, slowed serving by half."""

try:
    from prometheus_client import Counter
except ImportError:  # the metrics are optional; the log works without them
    RECORDS = None
else:
    RECORDS = Counter("platform_prediction_log_records",
                      "Prediction log records by outcome: sent to the stream, or dropped.", ["outcome"])


@dataclass(frozen=True)
class LogSettings:
    """Settings of the prediction log and the drift checks; each maps to one environment variable."""

    stream_maxlen: int = 100_000
    """PREDICTION_LOG_MAXLEN: records the Redis stream holds at most before the oldest are trimmed."""
    drain_s: float = 2.0
    """PREDICTION_LOG_DRAIN_S: how often beat's `drain_prediction_log` moves the stream into the SQL store."""
    retention_days: float = 30.0
    """PREDICTION_LOG_RETENTION_DAYS: logged predictions and drift checks are deleted this long after; 0 keeps."""
    drift_check_s: float = 300.0
    """DRIFT_CHECK_S: how often beat's `check_drift` compares recent inputs with the reference statistics."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> LogSettings:
        """Read the settings from environment variables, falling back to the defaults."""
        return cls(
            stream_maxlen=int(env.get("PREDICTION_LOG_MAXLEN", cls.stream_maxlen)),
            drain_s=float(env.get("PREDICTION_LOG_DRAIN_S", cls.drain_s)),
            retention_days=float(env.get("PREDICTION_LOG_RETENTION_DAYS", cls.retention_days)),
            drift_check_s=float(env.get("DRIFT_CHECK_S", cls.drift_check_s)),
        )


def sampled(spec: ModelSpec) -> bool:
    """Whether to record one prediction of the model: a random draw against its `log_rate`."""
    rate = spec.monitoring.log_rate
    return rate > 0 and random.random() < rate


def record(version: models.ModelVersion, source: str, request_id: str, latency_s: float | None,
           inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> dict[str, Any]:
    """The log record of one prediction: `inputs` as the model took them (arrays), `outputs` by name (arrays, or
    lists of JSON values); the features are kept if the spec says so and they are numbers, else only the digest."""
    spec = version.spec
    x = reference.matrix(spec, inputs)
    statistics = reference.of(version) if x is not None else None
    kept = spec.monitoring.features and x is not None and x.size <= LOGGED_VALUES_MAX
    arrays = {name: np.asarray(value) for name, value in inputs.items()}
    return {
        "uid": secrets.token_hex(12), "model": version.name, "version": version.number, "source": source,
        "request_id": request_id[:100], "at": time.time(),
        "latency_ms": None if latency_s is None else round(latency_s * 1000, 3),
        "rows": len(x) if x is not None else _rows(arrays), "digest": tensor.digest(arrays),
        "inputs": arrays if kept else None, "outputs": dict(outputs),
        "outliers": reference.outliers(statistics, spec.monitoring, x) if statistics is not None else [],
    }


def _rows(arrays: Mapping[str, np.ndarray]) -> int:
    first = next(iter(arrays.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else 1


def encode(built: dict[str, Any]) -> bytes:
    """A record as the stream holds it: JSON (text outputs as strings)."""
    return orjson.dumps(built, default=_text, option=orjson.OPT_SERIALIZE_NUMPY)


def _text(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):  # text outputs: an array of objects
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def decode(data: bytes) -> dict[str, Any]:
    """A record read back from the stream; ValueError when it is not one."""
    try:
        built = orjson.loads(data)
        built["when"] = datetime.datetime.fromtimestamp(float(built["at"]), datetime.UTC).replace(tzinfo=None)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"not a prediction log record: {exc!r}") from None
    return built


Offered = tuple[models.ModelVersion, str, str, float | None, Mapping[str, Any], Mapping[str, Any]]


class Recorder:
    """Takes sampled predictions on any thread and sends their records to the stream from a thread of its own."""

    def __init__(self, client: redis.Redis, maxlen: int, capacity: int = QUEUED_MAX):
        self.client, self.maxlen, self.capacity = client, maxlen, capacity
        self.pending: collections.deque[Offered] = collections.deque()
        self.wake, self.lock = threading.Event(), threading.Lock()
        self.breaker = Breaker("prediction log", retry_s=1.0)
        self.sent = self.dropped = 0
        self.thread: threading.Thread | None = None
        self.closed = False

    def offer(self, version: models.ModelVersion, source: str, request_id: str, latency_s: float | None,
              inputs: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Queue one sampled prediction for the stream; drop it (counted) if too many wait. Takes microseconds."""
        if len(self.pending) >= self.capacity or self.closed:
            self._count("dropped", 1)
            return
        self.pending.append((version, source, request_id, latency_s, inputs, outputs))
        if self.thread is None:
            self._start()
        if len(self.pending) >= SEND_MAX:
            self.wake.set()

    def _start(self) -> None:
        with self.lock:
            if self.thread is None:  # made on first use: after a fork, in the process that serves
                self.thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
                self.thread.start()

    def _run(self) -> None:
        while not self.closed or self.pending:
            self.wake.wait(SEND_EVERY_S)
            self.wake.clear()
            while self.pending:
                offered = [self.pending.popleft() for _ in range(min(SEND_MAX, len(self.pending)))]
                try:
                    self.send(offered)
                except Exception:  # the thread must outlive any fault, or every later record would pile up
                    log.exception("the prediction log dropped %d records", len(offered))
                    self._count("dropped", len(offered))

    def send(self, offered: list[Offered]) -> None:
        """Build the records of `offered` and add them to the stream in one round trip; drop them if it fails."""
        pipe = self.client.pipeline(transaction=False)
        for item in offered:
            try:
                pipe.xadd(STREAM, {FIELD: encode(record(*item))}, maxlen=self.maxlen, approximate=True)
            except Exception:
                log.exception("a prediction of model %s could not be recorded", item[0].name)
                self._count("dropped", 1)
        count = len(pipe)
        if count and self.breaker.call(pipe.execute) is None:
            self._count("dropped", count)
            log.warning("the prediction log dropped %d records: Redis is unavailable (%d dropped in all)",
                        count, self.dropped)
        elif count:
            self._count("sent", count)

    def _count(self, outcome: str, n: int) -> None:
        with self.lock:
            if outcome == "sent":
                self.sent += n
            else:
                self.dropped += n
        if RECORDS is not None:
            RECORDS.labels(outcome).inc(n)

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (for at most `timeout_s`), stop the thread, close the Redis connections."""
        self.closed = True
        self.wake.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout_s)
        self.client.close()


_recorder: Recorder | None = None


def log_job(version: models.ModelVersion, job: Job, inputs: Mapping[str, np.ndarray],
            outputs: Mapping[str, np.ndarray]) -> None:
    """Record a job's prediction if it is sampled; its latency runs from its submission."""
    if sampled(version.spec):
        _offer_job(version, job, inputs, outputs)


def log_batch(version: models.ModelVersion, store: JobStore, pairs: list[tuple[str, Mapping[str, np.ndarray]]],
              results: list[Mapping[str, np.ndarray] | str]) -> None:
    """Record the sampled ones of jobs predicted in one batch: (job id, inputs) and, in the same order, each one's
    outputs or the reason it failed."""
    for (job_id, inputs), outputs in zip(pairs, results, strict=True):
        if isinstance(outputs, dict) and sampled(version.spec):
            with contextlib.suppress(LookupError):  # its record expired meanwhile
                _offer_job(version, store.get(job_id), inputs, outputs)


def _offer_job(version: models.ModelVersion, job: Job, inputs: Mapping[str, np.ndarray],
               outputs: Mapping[str, np.ndarray]) -> None:
    recorder().offer(version, "job", job.request_id or job.id, time.time() - job.created_at, inputs, outputs)


def log_items(registry: models.Registry, model: str, claimed: list[Claimed], predictions: dict[int, str]) -> None:
    """Record the sampled ones of batch items predicted in one chunk, by their stored instance and prediction."""
    for item in claimed:
        if item.id not in predictions:
            continue
        try:
            version = registry.get(model, item.version)
        except models.ModelError:
            continue
        if sampled(version.spec):
            _log_item(version, item, predictions[item.id])


def _log_item(version: models.ModelVersion, item: Claimed, prediction: str) -> None:
    spec = version.spec
    try:
        inputs, _ = instances.parse({"instances": [instances.decode(item.input)]}, version)
    except (models.ModelError, ValueError):
        return  # it was predicted, so it parses; unless the spec changed since
    row = orjson.loads(prediction)  # as :predict answers one instance: the bare value of a single output
    outputs = {spec.output_names[0]: [row]} if len(spec.output_names) == 1 else {k: [v] for k, v in row.items()}
    recorder().offer(version, "batch", f"item:{item.id}", None, inputs, outputs)


def recorder() -> Recorder:
    """This worker process's recorder, made on first use."""
    global _recorder
    if _recorder is None:
        client = redis.Redis.from_url(TaskSettings.from_env().redis_url, socket_timeout=5, socket_connect_timeout=5)
        _recorder = Recorder(client, LogSettings.from_env().stream_maxlen)
    return _recorder


@worker_process_shutdown.connect
def _flush(**_: Any) -> None:
    """Send what a worker process still holds before it exits."""
    if _recorder is not None:
        _recorder.close(timeout_s=2.0)
