"""Callbacks: a finished job is POSTed to the URL its client gave, retried with backoff.

Delivery is a task of its own on the `callbacks` queue, so a slow or dead receiver never holds a
prediction worker: each attempt waits at most `TIMEOUT_S`, and a retry is scheduled, not slept on.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request

import orjson
from celery import Task, shared_task

from tasks.jobs import JobExpired
from tasks.resources import jobs

log = logging.getLogger(__name__)
TIMEOUT_S = 5
RETRIED = frozenset({408, 425, 429})
"""4xx answers worth another try; any other 4xx means the receiver refuses the job for good."""


@shared_task(name="deliver_callback", bind=True, acks_late=True, max_retries=8, ignore_result=True)
def deliver_callback(self: Task, job_id: str) -> str:
    """POST the finished job to its callback URL; retry on network errors, 5xx, 408, 425 and 429."""
    store = jobs()
    try:
        job = store.get(job_id)
    except JobExpired:
        return "expired"
    body = orjson.dumps(store.public(job), option=orjson.OPT_SERIALIZE_NUMPY)
    status = _post(job.callback_url or "", body)
    if status is None or status >= 500 or status in RETRIED:
        log.info("job %s: callback answered %s; retry %d", job_id, status, self.request.retries + 1)
        raise self.retry(countdown=min(2 ** self.request.retries, 300))
    log.info("job %s: callback delivered (%d)", job_id, status)
    return f"delivered ({status})"


def _post(url: str, body: bytes) -> int | None:
    """The receiver's status code, or None when it could not be reached."""
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "ml-serving-platform callback",
    })
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.info("callback to %s failed: %s", url, exc)
        return None
