"""Which model and version serve each request, as the models' `[routing]` tables declare (`Traffic`, the data
plane's `traffic`).

A request naming a version is served by it. Otherwise the first rule whose header matches chooses the model
and version; else the split picks an arm: by a stable hash of the sticky header's value, so one client always
sees one version, or at random without it. The choice is made from headers alone, before the body is read, so
it never costs a parse and the data plane knows at once how to serve the request. A routed model that queues
its batch latency class has a request with `X-Latency-Class: batch` queued as a job of the version chosen
(`Queued`): the data plane answers 202 with the job, as `:submit` does. A model without `[routing]` costs one
dict lookup.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass

import models
from models import Model, Registry
from models.routing import Rule, Target
from webapp.errors import RequestError

log = logging.getLogger(__name__)
LATENCY_CLASS = "x-latency-class"
BATCH = "batch"
Choice = tuple[str, int | None]


class Queued(RequestError, models.ModelError):
    """A request of the batch latency class: the data plane queues it as a job of `model`/`version` and answers
    202 (`DataPlane.enqueue`). A ModelError, so the data plane never answers it on the event loop."""

    status = 503
    """The status where no job queue is at hand to take it."""

    def __init__(self, model: str, version: int | None):
        super().__init__(f"model {model!r}: the batch latency class is queued, and this server queues no jobs")
        self.model, self.version = model, version


@dataclass(frozen=True)
class Plan:
    """How one routed model's requests are chosen a version."""

    name: str
    arms: tuple[int, ...] = ()
    bounds: tuple[float, ...] = ()
    """The split's cumulative shares but the last: a point in [0, 1) falls in arm `bisect(bounds, point)`."""
    sticky: str | None = None
    rules: tuple[Rule, ...] = ()
    shadows: tuple[Target, ...] = ()
    queue_batch: bool = False

    @classmethod
    def of(cls, model: Model) -> Plan:
        """The plan of a model whose spec has `[routing]`; arms of its split without a version are left out."""
        routing = model.spec.routing
        split = [(v, share) for v, share in routing.split if v in model.versions]
        total = sum(share for _, share in split) or 1.0
        bounds = tuple(itertools.accumulate(share / total for _, share in split))[:-1]
        return cls(model.spec.name, tuple(v for v, _ in split), bounds, routing.sticky_header, routing.rules,
                   routing.shadow, routing.queue_batch)

    def choose(self, version: int | None, headers: Mapping[str, str]) -> Choice:
        """The model and version to serve a request for this model at `version` (None: as routed)."""
        chosen = (self.name, version) if version is not None else self._route(headers)
        if self.queue_batch and headers.get(LATENCY_CLASS, "").strip().lower() == BATCH:
            raise Queued(*chosen)
        return chosen

    def _route(self, headers: Mapping[str, str]) -> Choice:
        for rule in self.rules:
            if headers.get(rule.header) == rule.equals:
                return rule.to.model, rule.to.version
        if not self.arms:
            return self.name, None
        key = headers.get(self.sticky) if self.sticky else None
        point = random.random() if key is None else bucket(self.name, key)
        return self.name, self.arms[bisect.bisect_right(self.bounds, point)]

    def shadows_of(self, version: int) -> tuple[Choice, ...]:
        """Where a request this model's `version` answered is mirrored: every shadow but that version."""
        return tuple((t.model, t.version) for t in self.shadows if (t.model, t.version) != (self.name, version))


def bucket(model: str, key: str) -> float:
    """A point in [0, 1) fixed by a model and a client's key (blake2b): the same in every process and run, and
    independent between models, so one client's arms in two experiments are not tied."""
    digest = hashlib.blake2b(f"{model}\n{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


class Traffic:
    """The data plane's traffic: each routed model's plan, made again whenever the registry rescans."""

    def __init__(self, registry: Registry):
        self.plans: dict[str, Plan] = {}
        registry.watchers.append(self.update)
        self.update({model.spec.name: model for model in registry.models()})

    def choose(self, name: str, version: int | None, headers: Mapping[str, str]) -> Choice:
        """The model name and version (None: the model's default) to serve a request for `name`/`version`."""
        plan = self.plans.get(name)
        if plan is None:
            return name, version
        return plan.choose(version, headers)

    def update(self, found: Mapping[str, Model]) -> None:
        """Make the plans of the routed models among `found`; an unchanged plan is kept as it was."""
        plans = {}
        for name, model in found.items():
            if model.spec.routing is not None:
                plan = Plan.of(model)
                plans[name] = plan if self.plans.get(name) != plan else self.plans[name]
                if plans[name] is plan:
                    _missing(model)
        self.plans = plans


def _missing(model: Model) -> None:
    """Log the arms of a model's split that have no version (they take no traffic until they have one)."""
    absent = [v for v, _ in model.spec.routing.split if v not in model.versions]
    if absent:
        log.error("model %s: its split names versions %s, which are not present: their share goes to the others",
                  model.spec.name, absent)
