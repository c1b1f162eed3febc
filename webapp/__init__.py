"""The Flask application: TensorFlow Serving REST and Open Inference Protocol V2 over one model registry."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import redis
import sqlalchemy as sa
from flask import Flask

from models import Registry, Settings
from tasks import TaskSettings, create_celery, db
from tasks.items import ItemStore
from tasks.jobs import JobStore
from tasks.lanes import BatchQueue
from tasks.metrics import MetricsSettings
from tasks.runs import RunStore
from webapp import batch, catalog, data, ensembles, errors, guard, inference, jobs, pipelines, tfserving, v2
from webapp.auth import Auth, install
from webapp.cache import PredictionCache
from webapp.config import WebSettings
from webapp.dataplane import DataPlane
from webapp.datastore import DataStore
from webapp.experiments import close as close_experiments
from webapp.experiments import install as install_experiments
from webapp.logs import install as install_logs
from webapp.metrics import install as install_metrics
from webapp.monitoring import close as close_monitoring
from webapp.monitoring import install as install_monitoring


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app; `test_config` overrides settings by field name (e.g. models_dir).

    Its key `celery` holds Celery options to override (tests use eager mode).
    """
    overrides = dict(test_config or {})
    celery_options = overrides.pop("celery", None)
    web_settings = _settings(WebSettings.from_env(), overrides)
    task_settings = _settings(TaskSettings.from_env(), overrides)
    app = Flask(__name__)
    app.config.update(MAX_CONTENT_LENGTH=web_settings.max_request_bytes,
                      REQUEST_BODY_TIMEOUT_S=web_settings.request_body_timeout_s,
                      MAX_DATA_BYTES=web_settings.max_data_bytes,
                      BATCH_MAX_ITEMS=task_settings.batch_max_items,
                      PREDICTION_CACHE=web_settings.prediction_cache, **overrides)
    _logging(web_settings.log_level)
    registry = app.extensions["registry"] = Registry(_settings(Settings.from_env(), overrides))
    app.extensions["celery"] = create_celery(task_settings, celery_options)
    engine = db.create_engine(task_settings.database_url)  # connects on first use, in the serving process
    _stores(app, task_settings, engine, int(web_settings.prediction_cache_local_mb * 2**20))
    errors.register(app)
    auth = Auth.from_settings(web_settings, engine, task_settings.redis_url)
    install(app, auth)
    app.url_map.converters["model"] = tfserving.ModelName
    for blueprint in (catalog.bp, tfserving.bp, v2.bp, inference.bp, jobs.bp, pipelines.bp, ensembles.bp, batch.bp,
                      data.bp):
        app.register_blueprint(blueprint)
    cache = app.extensions["cache"]
    app.extensions["dataplane"] = DataPlane(registry, web_settings.max_request_bytes, auth,
                                            cache if web_settings.prediction_cache else None, app.extensions["data"])
    extensions = app.extensions
    extensions["enqueue"] = jobs.Enqueue(extensions["celery"], extensions["jobs"], extensions["batches"])
    app.extensions["dataplane"].enqueue = app.extensions["enqueue"]  # the batch latency class, queued as jobs
    guard.install(app)
    install_experiments(app, app.extensions["dataplane"], task_settings.redis_url)  # [routing]: A/B, shadows
    install_monitoring(app, engine, task_settings.redis_url)  # [monitoring]: the prediction log, drift
    install_logs(app)  # [observability]: log lines as LOG_FORMAT says, with their request
    install_metrics(app, app.extensions["dataplane"], _settings(MetricsSettings.from_env(), overrides))
    return app


def _stores(app: Flask, settings: TaskSettings, engine: sa.Engine, cache_local_bytes: int) -> None:
    """The app's stores: jobs and batch lanes in Redis, batch items and runs in SQL, the two caches."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=1)
    app.extensions["jobs"] = JobStore(client, settings.result_expires_s, settings.job_id_retention_s)
    app.extensions["batches"] = BatchQueue(client, settings.batch_lease_s) if settings.batching else None
    app.extensions["items"] = ItemStore(engine, settings.batch_item_lease_s, settings.batch_max_attempts)
    app.extensions["runs"] = RunStore(engine, settings.batch_max_attempts)
    cache_client = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
    app.extensions["cache"] = PredictionCache(cache_client, cache_local_bytes)
    app.extensions["data"] = DataStore(engine, cache_client, settings.data_cache_ttl_s)


def _logging(level: str) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    for name in ("models", "webapp"):
        logging.getLogger(name).setLevel(level)


def close_app(app: Flask) -> None:
    """Close the Redis connections the app opened (the job store's, the prediction cache's, which the data
    store shares, the rate limiter's). The app is done serving: the ASGI router's shutdown, a test's teardown."""
    close_experiments(app)
    close_monitoring(app)
    app.extensions["jobs"].close()
    app.extensions["cache"].close()
    app.extensions["auth"].close()
    if "tally" in app.extensions:
        app.extensions["tally"].close()


def _settings(settings: Any, overrides: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(settings)}
    return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if k in fields})
