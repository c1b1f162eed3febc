"""A model's `[routing]` table: traffic split between its versions, rules by request header, shadows, and
whether a client may ask for its request to be queued (the batch latency class)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from models.errors import SpecError
from models.fields import Fields

HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,100}$")
"""An HTTP header name (a token)."""


@dataclass(frozen=True)
class Target:
    """A model and version a request may go to; version None is that model's default."""

    model: str
    version: int | None = None

    def __str__(self) -> str:
        return self.model if self.version is None else f"{self.model}:{self.version}"


@dataclass(frozen=True)
class Rule:
    """Requests whose header `header` (lower case) equals `equals` go to `to`."""

    header: str
    equals: str
    to: Target


@dataclass(frozen=True)
class Routing:
    """Where the requests of one model go."""

    split: tuple[tuple[int, float], ...] = ()
    """(version, share) pairs, the shares summing to 1; empty: the default version serves."""
    sticky_header: str | None = None
    """The header (lower case) whose value picks the arm of the split, so one client always sees one version;
    None, or the header absent: a random arm for each request."""
    rules: tuple[Rule, ...] = ()
    """Tried in order before the split; the first whose header matches chooses."""
    shadow: tuple[Target, ...] = ()
    """Versions or models each successful request is mirrored to, after its answer."""
    queue_batch: bool = False
    """Whether a request with `X-Latency-Class: batch` is sent on to `:submit`, to be queued as a job."""


def parse(name: str, t: Fields) -> Routing | None:
    """The `[routing]` table of model `name`; None when the spec has none."""
    if not t.table:
        return None
    routing = Routing(
        split=_split(t.sub("split")),
        sticky_header=_header(t, "sticky_header", required=False),
        rules=tuple(_rule(name, r) for r in t.table_list("rules")),
        shadow=tuple(_target(name, s) for s in t.table_list("shadow")),
        queue_batch=t.bool("queue_batch"),
    )
    t.done()
    if routing.sticky_header is not None and not routing.split:
        raise t.fail("sticky_header", "needs a split")
    if Target(name) in routing.shadow:
        raise t.fail("shadow", "a shadow must name another version or model than the default it serves")
    return routing


def _split(t: Fields) -> tuple[tuple[int, float], ...]:
    weights = []
    for key in sorted(t.table, key=lambda k: (len(k), k)):
        if not key.isdigit() or key.startswith("0"):
            raise t.fail(key, "a split's keys are version numbers")
        weights.append((int(key), t.number(key, minimum=0.0)))
    t.done()
    total = sum(w for _, w in weights)
    if weights and total <= 0:
        raise SpecError(t.path, t.prefix, "the weights must not all be 0")
    return tuple((version, weight / total) for version, weight in weights)


def _header(t: Fields, key: str, required: bool = True) -> str | None:
    value = t.str(key, required=required)
    if value is not None and not HEADER.match(value):
        raise t.fail(key, f"{value!r} is not a header name")
    return None if value is None else value.lower()


def _rule(name: str, t: Fields) -> Rule:
    header, equals = _header(t, "header"), t.str("equals", required=True)
    return Rule(header, equals, _target(name, t))


def _target(name: str, t: Fields) -> Target:
    if "model" not in t.table and "version" not in t.table:
        raise SpecError(t.path, t.prefix, "name a version, a model, or both")
    target = Target(t.str("model", name), t.int("version", minimum=1))
    t.done()
    return target
