"""Celery tasks and their app: queued prediction over the shared `models` service layer."""

from tasks import batch, callbacks, inference
from tasks.app import QUEUES, create_celery
from tasks.config import TaskSettings

__all__ = ["QUEUES", "TaskSettings", "batch", "callbacks", "create_celery", "inference"]
