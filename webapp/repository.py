"""What the running app holds: its model registry and its job store."""

from __future__ import annotations

from flask import current_app

from models import Registry
from tasks.jobs import JobStore


def registry() -> Registry:
    """The registry `create_app` attached to the current app."""
    return current_app.extensions["registry"]


def store() -> JobStore:
    """The job store `create_app` attached to the current app."""
    return current_app.extensions["jobs"]
