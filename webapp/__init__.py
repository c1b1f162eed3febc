"""The Flask application: TensorFlow Serving REST and Open Inference Protocol V2 over one model registry."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import redis
from flask import Flask

from models import Registry, Settings
from tasks import TaskSettings, create_celery, db
from tasks.cache import PredictionCache
from tasks.data import DataStore
from tasks.items import ItemStore
from tasks.jobs import JobStore
from tasks.lanes import BatchQueue
from tasks.runs import RunStore
from webapp import batch, catalog, data, ensembles, errors, jobs, pipelines, tfserving, v2
from webapp.config import WebSettings
from webapp.dataplane import DataPlane


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; `test_config` overrides settings by field name (e.g. models_dir).

    Its key `celery` holds Celery options to override (tests use eager mode).
    """
    overrides = dict(test_config or {})
    celery_options = overrides.pop("celery", None)
    model_settings = _settings(Settings.from_env(), overrides)
    web_settings = _settings(WebSettings.from_env(), overrides)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=web_settings.max_request_bytes, **overrides)
    registry = app.extensions["registry"] = Registry(model_settings)
    task_settings = _settings(TaskSettings.from_env(), overrides)
    app.extensions["celery"] = create_celery(task_settings, celery_options)
    client = redis.Redis.from_url(task_settings.redis_url, socket_timeout=2, socket_connect_timeout=1)
    app.extensions["jobs"] = JobStore(client, task_settings.result_expires_s, task_settings.job_id_retention_s)
    app.extensions["batches"] = BatchQueue(client, task_settings.batch_lease_s) if task_settings.batching else None
    engine = db.create_engine(task_settings.database_url)  # connects on first use, in the serving process
    app.extensions["items"] = ItemStore(engine, task_settings.batch_item_lease_s, task_settings.batch_max_attempts)
    app.extensions["runs"] = RunStore(engine, task_settings.batch_max_attempts)
    app.config["BATCH_MAX_ITEMS"] = task_settings.batch_max_items
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    for name in ("models", "webapp"):
        logging.getLogger(name).setLevel(web_settings.log_level)
    errors.register(app)
    app.url_map.converters["model"] = tfserving.ModelName
    for blueprint in (catalog.bp, tfserving.bp, v2.bp, jobs.bp, pipelines.bp, ensembles.bp, batch.bp, data.bp):
        app.register_blueprint(blueprint)
    cache_client = redis.Redis.from_url(task_settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    cache = app.extensions["cache"] = PredictionCache(cache_client, int(web_settings.prediction_cache_local_mb * 2**20))
    app.config["PREDICTION_CACHE"] = web_settings.prediction_cache
    stored = app.extensions["data"] = DataStore(engine, cache_client, task_settings.data_cache_ttl_s)
    app.wsgi_app = DataPlane(registry, app.wsgi_app, web_settings.max_request_bytes,  # type: ignore[method-assign]
                             cache if web_settings.prediction_cache else None, stored)
    return app


def close_app(app: Flask) -> None:
    """Close the Redis connections the app opened: its job store's and prediction cache's lines, every
    thread's, and their clients' pools (the data store shares the cache's). The app is done serving (the
    ASGI bridge's shutdown; a test's teardown)."""
    jobs, cache = app.extensions["jobs"], app.extensions["cache"]
    jobs.close()
    cache.close()
    for client in (jobs.client, cache.client):
        client.close()


def _settings(settings: Any, overrides: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(settings)}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if k in fields})
