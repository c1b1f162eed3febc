"""What a worker process holds: its model registry, its job store and its SQL stores, each made once, after fork."""

from __future__ import annotations

import gc
from typing import Any

import redis
import sqlalchemy as sa
from celery.signals import worker_process_init

from models import Registry, Settings
from tasks import db
from tasks.config import TaskSettings
from tasks.items import ItemStore
from tasks.jobs import JobStore
from tasks.lanes import BatchQueue
from tasks.runs import RunStore

_registry: Registry | None = None
_jobs: JobStore | None = None
_batches: BatchQueue | None = None
_engines: dict[str, sa.Engine] = {}


def registry() -> Registry:
    """This worker process's model registry, made on first use."""
    global _registry
    if _registry is None:
        _registry = Registry(Settings.from_env())
    return _registry


def jobs() -> JobStore:
    """This worker process's job store, made on first use."""
    global _jobs
    if _jobs is None:
        settings = TaskSettings.from_env()
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        _jobs = JobStore(client, settings.result_expires_s, settings.job_id_retention_s)
    return _jobs


def batches() -> BatchQueue | None:
    """This worker process's batch queue; None when batching is off."""
    global _batches
    settings = TaskSettings.from_env()
    if _batches is None and settings.batching:
        _batches = BatchQueue(jobs().client, settings.batch_lease_s)
    return _batches


def engine() -> sa.Engine:
    """This worker process's engine on DATABASE_URL, made on first use."""
    url = TaskSettings.from_env().database_url
    if url not in _engines:
        _engines[url] = db.create_engine(url)
    return _engines[url]


def items() -> ItemStore:
    """This worker process's store of batch items."""
    settings = TaskSettings.from_env()
    return ItemStore(engine(), settings.batch_item_lease_s, settings.batch_max_attempts)


def runs() -> RunStore:
    """This worker process's store of batch runs."""
    return RunStore(engine(), TaskSettings.from_env().batch_max_attempts)


@worker_process_init.connect
def _warm(**_: Any) -> None:
    """Load every model's session in each new worker child, so faults show at start-up; then freeze what
    start-up made, so the garbage collector's full passes skip it (as the web workers do)."""
    registry().warm()
    gc.collect()
    gc.freeze()
