"""Prediction tasks: thin wrappers over the one prediction entry point in `models`."""

from __future__ import annotations

from typing import Any

from celery import shared_task
from celery.signals import worker_process_init

from models import Registry, Settings, arrays
from models import predict as run_model

_registry: Registry | None = None


def registry() -> Registry:
    """This worker process's model registry, made on first use (after fork)."""
    global _registry
    if _registry is None:
        _registry = Registry(Settings.from_env())
    return _registry


@worker_process_init.connect
def _warm(**_: Any) -> None:
    """Load every model's session in each new worker child, so faults show at start-up."""
    registry().warm()


@shared_task(name="predict", acks_late=True)
def predict(model: str, version: int | None, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run one prediction on JSON inputs; the JSON-ready outputs are the job's result."""
    found = registry().get(model, version)
    outputs = run_model(found, arrays(found, inputs))
    return {name: array.tolist() for name, array in outputs.items()}
