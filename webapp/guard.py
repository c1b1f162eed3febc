"""Load shedding and circuit breaking: what a model's `[limits]` lets in, and what answers when it may not.

A model with limits has, in each web process, a number of places (`max_concurrency`, shared by its versions)
and, per version, a circuit (`breaker_failures`, see `tasks.circuits`). A request takes a place without ever
waiting for one: when none is free it is shed (429), when its version's circuit is open it is refused (503),
both with `Retry-After`; or, when the spec names a `fallback` model taking the same inputs, that model answers
instead (admitted by its own limits, never by a fallback of its own). A model with no limits costs one dict
lookup. `:submit` is held to `max_queue_depth` (`check_queue`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator

import numpy as np
from flask import Flask, current_app

import models
from models import Registry
from models.spec import ModelSpec, ServingLimits
from tasks import ensembles, submission
from tasks.circuits import Circuit, Circuits
from tasks.jobs import JobStore
from tasks.lanes import BatchQueue
from webapp.errors import RequestError

log = logging.getLogger(__name__)


class Refused(RequestError):
    """A request a model's limits refuse: too many at once (429), or its circuit open (503)."""

    def __init__(self, message: str, status: int, retry_after_s: float):
        super().__init__(message)
        self.status = status
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))}


class Gate:
    """What admits requests to one model version: the model's places, and the version's circuit."""

    def __init__(self, found: models.ModelVersion, places: threading.BoundedSemaphore | None,
                 circuit: Circuit | None):
        self.name, self.places, self.circuit = found.name, places, circuit
        self.limits: ServingLimits = found.spec.limits

    def enter(self) -> Refused | None:
        """Take a place, never waiting for one; answer why not instead."""
        wait = self.circuit.retry_after() if self.circuit is not None else 0.0
        if wait > 0:
            return Refused(f"model {self.name!r} keeps failing: its circuit is open; retry later", 503, wait)
        if self.places is not None and not self.places.acquire(blocking=False):
            return Refused(f"model {self.name!r} is serving its limit of {self.limits.max_concurrency} requests "
                           "at once; retry later", 429, self.limits.retry_after_s)
        return None

    @contextlib.contextmanager
    def running(self, found: models.ModelVersion) -> Iterator[models.ModelVersion]:
        """Hold the place taken while the block runs; tell the circuit how the model's run went."""
        try:
            yield found
        except models.ModelFailed as exc:
            if self.circuit is not None:
                self.circuit.failed(exc)
            raise
        else:
            if self.circuit is not None:
                self.circuit.succeeded()
        finally:
            if self.places is not None:
                self.places.release()


class Guard:
    """The data plane's admission by every model's `[limits]`, in this process."""

    def __init__(self, registry: Registry, circuits: Circuits):
        self.registry, self.circuits = registry, circuits
        self.free: dict[str, tuple[models.ModelVersion, contextlib.nullcontext]] = {}
        """Per version key, of versions with no limits: the version and its (reusable) admission that admits all."""
        self.gates: dict[str, Gate] = {}
        self.places: dict[tuple[str, int], threading.BoundedSemaphore] = {}
        self.lock = threading.Lock()

    def admit(self, found: models.ModelVersion) -> contextlib.AbstractContextManager[models.ModelVersion]:
        """Hold a place for one request while the block runs; yield `found`, or its fallback when `found` may not
        take it; raise Refused (429 or 503, with Retry-After) when neither may."""
        free = self.free.get(found.key)
        if free is not None and free[0] is found:  # a version reloaded unchanged has the key of its predecessor
            return free[1]
        return self._admit(found)

    @contextlib.contextmanager
    def _admit(self, found: models.ModelVersion) -> Iterator[models.ModelVersion]:
        gate, refused = self._enter(found)
        if refused is not None:
            fallback = self._fallback(found)
            gate, refused_too = self._enter(fallback) if fallback is not None else (None, refused)
            if refused_too is not None:  # the fallback's own limits hold it back too: the model's answer stands
                raise refused
            log.info("model %s: %s; answered by %s", found.name, refused, fallback.name)
            found = fallback
        if gate is None:
            yield found
            return
        with gate.running(found):
            yield found

    def _enter(self, found: models.ModelVersion) -> tuple[Gate | None, Refused | None]:
        """The gate of a version with limits, with its place taken, or why not; (None, None) for one without."""
        gate = self._gate(found)
        return gate, gate.enter() if gate is not None else None

    def _gate(self, found: models.ModelVersion) -> Gate | None:
        """The gate of a version with limits; None (and the version remembered as free) for one without."""
        gate = self.gates.get(found.key)
        if gate is not None:
            return gate
        limits = found.spec.limits
        with self.lock:
            if limits is None or (limits.max_concurrency is None and limits.breaker_failures is None):
                self.free[found.key] = (found, contextlib.nullcontext(found))
                return None
            return self.gates.setdefault(found.key, Gate(found, self._places(found.name, limits), self._circuit(found)))

    def _places(self, name: str, limits: ServingLimits) -> threading.BoundedSemaphore | None:
        if limits.max_concurrency is None:
            return None
        count = limits.max_concurrency
        return self.places.setdefault((name, count), threading.BoundedSemaphore(count))

    def _circuit(self, found: models.ModelVersion) -> Circuit | None:
        limits = found.spec.limits
        if limits.breaker_failures is None:
            return None
        return self.circuits.get(found.key, limits.breaker_failures, limits.breaker_reset_s)

    def _fallback(self, found: models.ModelVersion) -> models.ModelVersion | None:
        """The default version of the model's fallback; None when it declares none or that cannot serve."""
        name = found.spec.limits.fallback
        if name is None:
            return None
        try:
            fallback = self.registry.get(name)
        except models.ModelError as exc:
            log.warning("model %s: its fallback cannot answer: %s", found.name, exc)
            return None
        if signature(fallback.spec) != signature(found.spec):
            log.warning("model %s: its fallback %s takes other inputs", found.name, name)
            return None
        return fallback


def signature(spec: ModelSpec) -> tuple:
    """What a model's inputs are: the name, type and shape of each."""
    return tuple((t.name, t.dtype, t.shape) for t in spec.inputs)


def check_queue(store: JobStore, lanes: BatchQueue | None, found: models.ModelVersion,
                inputs: dict[str, np.ndarray]) -> None:
    """Refuse a job (429) when `max_queue_depth` jobs of its model version wait already."""
    limits = found.spec.limits
    if limits is None or limits.max_queue_depth is None:
        return
    waiting = submission.waiting(store, lanes, found, inputs)
    if waiting >= limits.max_queue_depth:
        raise Refused(f"model {found.name!r} has {waiting} jobs waiting, its limit is {limits.max_queue_depth}; "
                      "retry later", 429, limits.retry_after_s)


def install(app: Flask) -> None:
    """Guard the app's data plane by the models' limits; keep the circuits for the ensembles' members."""
    circuits = app.extensions["circuits"] = Circuits()
    app.extensions["dataplane"].guard = Guard(app.extensions["registry"], circuits)


def member_circuits(versions: dict[str, models.ModelVersion]) -> tuple[Circuits, dict[str, float]]:
    """The app's circuits, and the ensemble members among `versions` whose circuit is open; 503 when all are."""
    circuits: Circuits = current_app.extensions["circuits"]
    shut = ensembles.shut(circuits, versions)
    if shut and len(shut) == len(versions):
        raise Refused(f"every member keeps failing ({', '.join(shut)}): their circuits are open; retry later", 503,
                      min(shut.values()))
    return circuits, shut
