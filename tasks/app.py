"""The Celery application: Redis as broker and result store, set up for at-least-once delivery."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Celery

from tasks import logs, metrics, monitoring, schedule
from tasks.config import TaskSettings
from tasks.prediction_log import LogSettings

QUEUES = ("prep", "predict", "callbacks", "batch", "shadow")
SIGNAL_HANDLERS = (logs, metrics)
"""Modules every process of the app needs for their Celery signal handlers: log lines, metrics endpoints."""


def create_celery(settings: TaskSettings | None = None, overrides: Mapping[str, Any] | None = None) -> Celery:
    """A configured Celery app; `overrides` sets Celery options directly (tests use eager mode)."""
    settings = settings or TaskSettings.from_env()
    app = Celery("platform", include=["tasks.inference", "tasks.callbacks", "tasks.batch", "tasks.shadow",
                                       "tasks.monitoring"])
    app.config_from_object(celery_config(settings))
    app.conf.update(overrides or {})
    return app


def celery_config(settings: TaskSettings) -> dict[str, Any]:
    """Celery options: late acks, bounded redelivery, time limits under the visibility timeout, expiring results."""
    hard = time_limit_s(settings)
    connection = {"socket_timeout": 5, "socket_connect_timeout": 5, "health_check_interval": 10}
    broker = {**connection, **redelivery(settings)}
    return {
        "broker_url": settings.redis_url,
        "result_backend": settings.redis_url,
        "broker_transport_options": broker,
        "result_backend_transport_options": {**connection, "visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # a worker waits out a Redis outage of any length
        "broker_pool_acquire_timeout": 5,  # a web request never waits forever for a broker connection
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "task_retry_on_worker_lost": True,
        "task_publish_retry_policy": {"max_retries": 3, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        "task_track_started": True,
        "task_time_limit": hard,
        "task_soft_time_limit": hard * 0.9,
        "result_expires": settings.result_expires_s,
        "result_extended": True,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": True,  # Flower shows every task, whenever it started
        "task_send_sent_event": True,
        "task_default_queue": "predict",
        "worker_proc_alive_timeout": 30,
        "task_routes": {"batch_*": {"queue": "batch"}},
        "beat_schedule": {
            "reclaim-batches": {"task": "reclaim_batches", "schedule": max(1.0, min(15.0, settings.batch_lease_s / 2)),
                                "options": {"queue": "predict"}},
            "batch-reconcile": {"task": "batch_reconcile", "schedule": settings.batch_reconcile_s,
                                "options": {"queue": "batch"}},
            "purge-expired": {"task": "purge_expired", "schedule": settings.purge_interval_s,
                              "options": {"queue": "batch"}},
            **{f"batch-run-{e.model}": e.beat for e in schedule.parse(settings.batch_schedule)},
            **monitoring.beat_entries(LogSettings.from_env()),
        },
    }


def time_limit_s(settings: TaskSettings) -> float:
    """The hard time limit of every task: TASK_TIME_LIMIT_S, at most 90% of the visibility timeout, so a task
    is over (done, or killed and retried) before the message it came in would be delivered again."""
    return min(float(settings.task_time_limit_s), 0.9 * settings.visibility_timeout_s)


def redelivery(settings: TaskSettings) -> dict[str, Any]:
    """How kombu gives back the messages of a killed worker: those taken more than the visibility timeout
    ago, looked for every tenth of it; a sweep's lock left by a killed sweeper lapses in two such periods."""
    sweep = max(1, settings.visibility_timeout_s // 10)
    return {
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": sweep,
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 2 * sweep,
    }
