"""The model registry of the running app."""

from __future__ import annotations

from flask import current_app

from models import Registry


def registry() -> Registry:
    """The registry `create_app` attached to the current app."""
    return current_app.extensions["registry"]
