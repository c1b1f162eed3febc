"""The Flask application: TensorFlow Serving REST and Open Inference Protocol V2 over one model registry."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from models import Registry, Settings
from webapp import catalog, errors, tfserving, v2
from webapp.config import WebSettings


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; `test_config` overrides settings by field name (e.g. models_dir)."""
    overrides = dict(test_config or {})
    model_settings = _settings(Settings.from_env(), overrides)
    web_settings = _settings(WebSettings.from_env(), overrides)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=web_settings.max_request_bytes, **overrides)
    app.extensions["registry"] = Registry(model_settings)
    logging.getLogger("models").setLevel(web_settings.log_level)
    errors.register(app)
    for blueprint in (catalog.bp, tfserving.bp, v2.bp):
        app.register_blueprint(blueprint)
    return app


def _settings(settings: Any, overrides: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(settings)}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if k in fields})
