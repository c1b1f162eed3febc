"""The Celery application: Redis as broker and result store, set up for at-least-once delivery."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery

from tasks import schedule
from tasks.config import TaskSettings

QUEUES = ("prep", "predict", "callbacks", "batch")


def create_celery(settings: TaskSettings | None = None, overrides: Mapping[str, Any] | None = None) -> Celery:
    """A configured Celery app; `overrides` sets Celery options directly (tests use eager mode)."""
    settings = settings or TaskSettings.from_env()
    app = Celery("platform", include=["tasks.inference", "tasks.callbacks", "tasks.batch"])
    app.config_from_object(celery_config(settings))
    app.conf.update(overrides or {})
    return app


def celery_config(settings: TaskSettings) -> dict[str, Any]:
    """Celery options: late acks, bounded redelivery, time limits, expiring results."""
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "health_check_interval": 25,
    }
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "task_retry_on_worker_lost": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.2},
        "task_track_started": True,
        "task_time_limit": settings.task_time_limit_s,
        "task_soft_time_limit": int(settings.task_time_limit_s * 0.9),
        "result_expires": settings.result_expires_s,
        "result_extended": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,  # Flower shows every task, whenever it started
        "task_send_sent_event": True,
        "task_default_queue": "predict",
        "worker_proc_alive_timeout": 30,
        "task_routes": {"batch_*": {"queue": "batch"}},
        "beat_schedule": {
            "reclaim-batches": {"task": "reclaim_batches", "schedule": 15.0, "options": {"queue": "predict"}},
            "batch-reconcile": {"task": "batch_reconcile", "schedule": settings.batch_reconcile_s,
                                "options": {"queue": "batch"}},
            **{f"batch-run-{e.model}": e.beat for e in schedule.parse(settings.batch_schedule)},
        },
    }
