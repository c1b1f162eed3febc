"""What the data plane tells the parts that watch or steer it: the record of a request served, and its seams.

`DataPlane.respond` asks a `Traffic` which version serves a request (A/B splits, routing by a header or field),
runs the prediction inside a `Guard`'s admission (load shedding, fallbacks), and tells every `Observer` what it
served (metrics, the prediction log, shadows). The defaults here change nothing; each is replaced by the part
that implements it. An observer runs on the thread that served the request, before the answer is sent: it must
take microseconds, and hand anything slower (I/O) to a thread of its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

import models


@dataclass
class Served:
    """One inference request as the data plane served it."""

    model: str
    version: int | None
    protocol: str
    request_id: str = ""
    key_id: int | None = None
    status: int = 0
    fallback: str | None = None
    """The model that answered instead, when the guard sent the request to the asked model's fallback."""
    cache: str | None = None
    """`HIT` or `MISS` for a model the prediction cache serves, else None."""
    inputs: Mapping[str, np.ndarray] | None = None
    outputs: Mapping[str, np.ndarray] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    """The request's headers, names in lower case."""
    stages: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: `decode` (the body to arrays), `predict` (checks, preprocessing, the model), `encode`;
    and, when the model ran in the request (not the cache), `predict`'s two parts: `preprocess` and `model`."""
    started: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        """The number of rows predicted (0 when no input was read)."""
        first = next(iter(self.inputs.values()), None) if self.inputs else None
        return int(first.shape[0]) if first is not None and first.ndim else 0


class Traffic(Protocol):
    """Which model and version serve a request."""

    def choose(self, name: str, version: int | None, headers: Mapping[str, str]) -> tuple[str, int | None]:
        """The model name and version (None: the model's default) to serve a request for `name`/`version`."""


class Guard(Protocol):
    """Whether a model version may take one more request now."""

    def admit(self, found: models.ModelVersion) -> contextlib.AbstractContextManager[models.ModelVersion]:
        """Hold a place for one request while the block runs; yield the version to run (itself, or a fallback);
        raise an error carrying its status (and Retry-After) when it may not."""


Observer = Callable[[Served], None]


class AsAsked:
    """Traffic that goes where the request says."""

    def choose(self, name: str, version: int | None, headers: Mapping[str, str]) -> tuple[str, int | None]:
        """`name` and `version`, unchanged."""
        return name, version


class Open:
    """A guard that admits every request."""

    @contextlib.contextmanager
    def admit(self, found: models.ModelVersion) -> Iterator[models.ModelVersion]:
        """Yield `found`."""
        yield found
