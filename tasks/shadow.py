"""The shadow task: a live request's inputs run again on the model's shadows, their answers compared with the live
one. It runs on the `shadow` queue, whose own worker keeps it from ever delaying live or queued work.

Mirrors are best effort, at most once: the message is acknowledged when taken, the arrays are removed as they
are read, and a task that waited past their lifetime expires unrun; none is ever counted twice.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from celery import Celery, shared_task
from kombu import Producer

import models
from models import agreement
from models.tensor import pack, unpack
from tasks.experiments import PAYLOAD_TTL_S, Experiments
from tasks.resources import jobs, registry

log = logging.getLogger(__name__)
QUEUE = "shadow"
INPUT, OUTPUT = "in/", "out/"
"""Prefixes of the packed arrays' names: the request's inputs, the live version's outputs."""
_experiments: Experiments | None = None


def experiments() -> Experiments:
    """This worker process's experiment records, on the job store's Redis."""
    global _experiments
    if _experiments is None:
        _experiments = Experiments(jobs().client)
    return _experiments


def payload(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> bytes:
    """A live request's inputs and outputs packed as one buffer, for its shadow task."""
    return pack({**{INPUT + k: v for k, v in inputs.items()}, **{OUTPUT + k: v for k, v in outputs.items()}})


def send(app: Celery, key: str, model: str, version: int, shadows: list[tuple[str, int | None]],
         live_seconds: float, producer: Producer | None = None) -> None:
    """Queue the shadow task of one mirrored request (its arrays stashed under `key`)."""
    app.tasks["shadow"].apply_async(args=[key, model, version, shadows, live_seconds], queue=QUEUE,
                                    expires=PAYLOAD_TTL_S, producer=producer)


@shared_task(name="shadow", acks_late=False, ignore_result=True)
def shadow(key: str, model: str, version: int, shadows: list[tuple[str, int | None]], live_seconds: float) -> int:
    """Run a live request's inputs on each shadow and record how its answer agrees; answer how many ran."""
    packed = experiments().take(key)
    if packed is None:
        return 0  # past its lifetime, or already taken
    arrays = unpack(packed)
    inputs = {k.removeprefix(INPUT): v for k, v in arrays.items() if k.startswith(INPUT)}
    live = {k.removeprefix(OUTPUT): v for k, v in arrays.items() if k.startswith(OUTPUT)}
    for name, number in shadows:
        _compare(model, version, name, number, inputs, live, live_seconds)
    return len(shadows)


def _compare(model: str, version: int, name: str, number: int | None, inputs: dict[str, np.ndarray],
             live: dict[str, np.ndarray], live_seconds: float) -> None:
    """Run one shadow, compare its answer with the live one and record both."""
    label = name if number is None else f"{name}:{number}"
    try:
        found = registry().get(name, number)
        label, started = f"{found.name}:{found.number}", time.perf_counter()
        outputs = models.predict(found, inputs)
        seconds = time.perf_counter() - started
        rows, agreed = agreement.compare(live, unpack(pack(outputs)))  # packed as the live answer was
    except models.ModelError as exc:
        log.warning("shadow %s of %s version %d failed: %s", label, model, version, exc)
        experiments().failed(model, version, label)
        return
    experiments().compared(model, version, label, rows, agreed, seconds, live_seconds)
