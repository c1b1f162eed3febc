"""Log lines as text or as JSON objects, one a line, each with what it is about: request, model, version, key id.

LOG_FORMAT picks the format of every process: `text` (each tool's own line format) or `json` (time, level,
logger, message, and those of `request_id`, `model`, `version`, `key_id`, `task`, `task_id`, `job_id`, `run_id`
that are known). What a line is about comes from `current`, set where a request or a task starts: by the data
plane (its `Served` record), by the web app for its other routes, by a Celery worker for each task, from the
request id its message carries. A key's id is logged, never the key.
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from celery import Task
from celery.signals import after_setup_logger, after_setup_task_logger, task_postrun, task_prerun

FORMATS = ("text", "json")
FIELDS = ("request_id", "model", "version", "key_id", "task", "task_id", "job_id", "run_id")
"""What a line may be about, in the order a JSON line gives them."""
TASK_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "preprocess": ("job_id",), "predict": ("job_id",), "deliver_callback": ("job_id",),
    "predict_batch": ("model", "version"), "batch_run": ("run_id",), "batch_chunk": ("run_id",),
}
"""What a task's positional arguments are, by task name, for the lines it logs."""
current: contextvars.ContextVar[Any] = contextvars.ContextVar("log_context", default=None)
"""What the lines logged now are about: any object with some of the attributes FIELDS names."""


@dataclass
class Context:
    """What the lines of a request or a task are about, as far as it is known."""

    request_id: str | None = None
    model: str | None = None
    version: int | str | None = None
    key_id: int | None = None
    task: str | None = None
    task_id: str | None = None
    job_id: str | None = None
    run_id: int | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, what the line is about, and the
    traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        entry.update(about(current.get(), record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def about(context: Any, record: logging.LogRecord | None = None) -> dict[str, Any]:
    """The known fields of what a line is about: a record's own (`extra=`) before the context's."""
    found = {}
    for name in FIELDS:
        value = getattr(record, name, None)
        if value is None and context is not None:
            value = getattr(context, name, None)
        if value is not None and value != "":
            found[name] = value
    return found


def log_format(env: Mapping[str, str] = os.environ) -> str:
    """LOG_FORMAT: `text` (the default) or `json`; anything else is an error naming the variable."""
    value = env.get("LOG_FORMAT", "text").strip().lower() or "text"
    if value not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(FORMATS)}, not {value!r}")
    return value


def configure(loggers: Iterable[logging.Logger] = (), env: Mapping[str, str] = os.environ) -> None:
    """With LOG_FORMAT=json, give every handler of the root logger and of `loggers` the JSON formatter; with
    `text`, leave each handler's format as it is."""
    if log_format(env) != "json":
        return
    formatter = JsonFormatter()
    for logger in (logging.getLogger(), *loggers):
        for handler in logger.handlers:
            handler.setFormatter(formatter)


def task_context(task: Task, args: Iterable[Any]) -> Context:
    """What the lines a task logs are about: its name and id, the request id its message carries, and the
    arguments that name a job, a model version or a run."""
    request_id = getattr(task.request, "request_id", None)
    context = Context(request_id=request_id if request_id not in (None, "-") else None,
                      task=task.name, task_id=task.request.id)
    for name, value in zip(TASK_ARGUMENTS.get(task.name, ()), args, strict=False):
        setattr(context, name, value)
    return context


@after_setup_logger.connect
def _format_worker_lines(logger: logging.Logger | None = None, **_: Any) -> None:
    configure([logger] if logger is not None else [])


@after_setup_task_logger.connect
def _format_task_lines(logger: logging.Logger | None = None, **_: Any) -> None:
    configure([logger] if logger is not None else [])


@task_prerun.connect
def _enter_task(task: Task | None = None, args: tuple | None = None, **_: Any) -> None:
    if task is not None:
        current.set(task_context(task, args or ()))


@task_postrun.connect
def _leave_task(**_: Any) -> None:
    current.set(None)
