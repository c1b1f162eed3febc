"""The data plane's observer of routed models (`Mirror`): each request counted for its arm, each successful one
mirrored to the model's shadows.

The observer only puts what it was told on a bounded queue; a thread of its own takes it from there, a batch
at a time after a short wait (so after the answers have gone), counts the arms in Redis and queues the shadow
tasks, stashing each request's arrays in Redis first. What the queue cannot hold is dropped and counted, and so
are mirrors past a backlog of the `shadow` queue, so a stalled shadow worker never grows Redis without bound.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from celery import Celery

from tasks import shadow
from tasks.experiments import DROPPED, Experiments
from webapp.served import Served
from webapp.traffic import Choice, Queued, Traffic

log = logging.getLogger(__name__)
CAPACITY = 1000
"""Requests the hand-off queue holds; past it, they are dropped and counted."""
MAX_BACKLOG = 10_000
"""Shadow tasks that may wait in the `shadow` queue; past it, mirrors are dropped and counted."""
MAX_PAYLOAD_BYTES = 4 * 2**20
"""A request whose arrays pack larger is counted but not mirrored."""
WINDOW_S = 0.05
"""How long the thread gathers a batch after its first request."""
MAX_BATCH = 500


@dataclass(frozen=True)
class Seen:
    """What the observer keeps of one request of a routed model."""

    model: str
    version: int
    status: int
    seconds: float
    predict_s: float
    shadows: tuple[Choice, ...] = ()
    inputs: Mapping[str, np.ndarray] | None = None
    outputs: Mapping[str, np.ndarray] | None = None


class Mirror:
    """Counts the arms of routed models and mirrors their requests to shadows, off the serving thread."""

    def __init__(self, traffic: Traffic, experiments: Experiments, celery: Celery, capacity: int = CAPACITY):
        self.traffic, self.experiments, self.celery = traffic, experiments, celery
        self.queue: queue.Queue[Seen | None] = queue.Queue(capacity)
        self.dropped: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.thread: threading.Thread | None = None

    def __call__(self, served: Served) -> None:
        """Hand one served request on to the thread, if its model is routed; drop and count it when full."""
        plan = self.traffic.plans.get(served.model)
        if plan is None or served.version is None or served.status == Queued.status:
            return
        ok = served.status == 200 and served.outputs is not None
        shadows = plan.shadows_of(served.version) if ok else ()
        arrays = (served.inputs, served.outputs) if shadows else (None, None)  # kept only while needed
        seen = Seen(served.model, served.version, served.status, time.perf_counter() - served.started,
                    served.stages.get("predict", 0.0), shadows, *arrays)
        try:
            self.queue.put_nowait(seen)
        except queue.Full:
            self._drop(served.model)
            return
        if self.thread is None:
            self._start()

    def close(self) -> None:
        """Stop the thread once it has handed on what it holds (waiting a few seconds at most)."""
        self.closing.set()
        if self.thread is not None:
            with contextlib.suppress(queue.Full):
                self.queue.put(None, timeout=1)
            self.thread.join(timeout=5)

    def _start(self) -> None:
        with self.lock:
            if self.thread is None and not self.closing.is_set():
                self.thread = threading.Thread(target=self._run, name="experiments", daemon=True)
                self.thread.start()

    def _drop(self, model: str, count: int = 1) -> None:
        DROPPED.labels(model).inc(count)
        with self.lock:
            self.dropped[model] += count

    def _run(self) -> None:
        while not self.closing.is_set():
            batch = self._take()
            try:
                self._flush(batch)
            except Exception:  # the thread must outlive any failure: Redis or the broker down, a bad array
                log.exception("experiments: %d requests neither counted nor mirrored", len(batch))

    def _take(self) -> list[Seen]:
        """The next batch: the first request to come, and those that follow within WINDOW_S."""
        first = self.queue.get()
        batch, until = [first] if first is not None else [], time.monotonic() + WINDOW_S
        while first is not None and len(batch) < MAX_BATCH and (left := until - time.monotonic()) > 0:
            try:
                seen = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if seen is None:
                break
            batch.append(seen)
        return batch

    def _flush(self, batch: list[Seen]) -> None:
        """Count a batch's requests per arm, with the drops since the last; then mirror its successful ones."""
        with self.lock:
            dropped, self.dropped = self.dropped, collections.Counter()
        mirrored = [seen for seen in batch if seen.shadows]
        with self.experiments.client.pipeline(transaction=False) as pipe:
            for seen in batch:
                self.experiments.count(pipe, seen.model, seen.version, seen.status, seen.seconds)
            for model, count in dropped.items():
                self.experiments.dropped(pipe, model, count)
            pipe.llen(shadow.QUEUE)
            backlog = pipe.execute()[-1]
        if mirrored:
            self._mirror(mirrored, MAX_BACKLOG - backlog)

    def _mirror(self, mirrored: list[Seen], room: int) -> None:
        """Stash the arrays of up to `room` requests and queue their shadow tasks; drop and count the rest."""
        payloads = [(seen, shadow.payload(seen.inputs, seen.outputs)) for seen in mirrored[:max(room, 0)]]
        sent = [(seen, packed) for seen, packed in payloads if len(packed) <= MAX_PAYLOAD_BYTES]
        kept = {id(seen) for seen, _ in sent}
        for seen in mirrored:
            if id(seen) not in kept:
                self._drop(seen.model)
        if not sent:
            return
        with self.experiments.client.pipeline(transaction=False) as pipe:
            keys = [self.experiments.stash(pipe, packed) for _, packed in sent]
            pipe.execute()
        with self.celery.producer_or_acquire() as producer:
            for (seen, _), key in zip(sent, keys, strict=True):
                shadow.send(self.celery, key, seen.model, seen.version, list(seen.shadows), seen.predict_s,
                            producer)
