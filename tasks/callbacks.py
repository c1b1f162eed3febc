"""Callbacks: a finished job is POSTed to the URL its client gave, retried with backoff.

Delivery is a task of its own on the `callbacks` queue, served by a worker pool of its own, so a slow or dead
receiver never holds a prediction worker. Each attempt has one deadline for connecting, sending and reading the
answer, and a retry is scheduled, not slept on. A receiver must be at a public address unless
CALLBACK_ALLOW_NETWORKS allows its network (see `tasks.destinations`); a refused destination or a redirect ends
the delivery for good.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from celery import Task, shared_task

from tasks.config import TaskSettings
from tasks.destinations import Destinations, RefusedDestination
from tasks.jobs import JobExpired
from tasks.resources import jobs

log = logging.getLogger(__name__)
RETRIED = frozenset({408, 425, 429})
"""4xx answers worth another try; any other 4xx means the receiver refuses the job for good."""
HEADERS = {"Content-Type": "application/json", "User-Agent": "ml-serving-platform callback"}
ANSWER_LIMIT = 64 * 1024
"""Bytes of a receiver's answer read before the connection is dropped."""


@shared_task(name="deliver_callback", bind=True, acks_late=True, max_retries=8, ignore_result=True)
def deliver_callback(self: Task, job_id: str) -> str:
    """POST the finished job to its callback URL; retry on network errors, timeouts, 5xx, 408, 425 and 429."""
    store = jobs()
    try:
        job = store.get(job_id)
    except JobExpired:
        return "expired"
    body = orjson.dumps(store.public(job), option=orjson.OPT_SERIALIZE_NUMPY)
    settings = TaskSettings.from_env()
    try:
        status = asyncio.run(post(job.callback_url or "", body, Destinations(settings.callback_allow_networks),
                                  settings.callback_deadline_s))
    except RefusedDestination as exc:
        log.warning("job %s: callback not sent, and not retried: callback_url %s", job_id, exc)
        return f"refused: {exc}"
    return _outcome(self, job_id, status, settings.visibility_timeout_s / 2)


def _outcome(task: Task, job_id: str, status: int | None, max_backoff_s: float) -> str:
    """Schedule a retry for an answer worth one; log and name a final one.

    A retry waits in a worker unacknowledged: past the visibility timeout it would be delivered twice.
    """
    if status is None or status >= 500 or status in RETRIED:
        log.info("job %s: callback answered %s; retry %d", job_id, status, task.request.retries + 1)
        raise task.retry(countdown=min(2 ** task.request.retries, 300, max_backoff_s))
    if 300 <= status < 400:
        log.warning("job %s: callback answered %d, a redirect, which is not followed; not retried", job_id, status)
        return f"redirected ({status})"
    log.info("job %s: callback delivered (%d)", job_id, status)
    return f"delivered ({status})"


async def post(url: str, body: bytes, destinations: Destinations, deadline_s: float,
               resolver: AbstractResolver | None = None) -> int | None:
    """POST `body` to `url` within one deadline; the receiver's status, or None when it was not reached in time.

    Raises RefusedDestination when the URL, or an address its host resolves to, is not one callbacks go to.
    """
    host = destinations.check_url(url).hostname
    connector = aiohttp.TCPConnector(resolver=CheckedResolver(destinations, resolver), use_dns_cache=False)
    try:
        async with (
            asyncio.timeout(deadline_s),
            aiohttp.ClientSession(connector=connector, auto_decompress=False) as session,
            session.post(url, data=body, headers=HEADERS, allow_redirects=False) as response,
        ):
            await _drain(response)
            return response.status
    except aiohttp.InvalidURL as exc:
        raise RefusedDestination(f"is not a URL the HTTP client takes ({exc})") from None
    except TimeoutError:
        log.info("callback to %s: no whole answer within %g s", host, deadline_s)
    except (aiohttp.ClientError, OSError) as exc:
        log.info("callback to %s failed: %s", host, exc)
    return None


async def _drain(response: aiohttp.ClientResponse) -> None:
    """Read the receiver's answer through (up to ANSWER_LIMIT bytes), so all of it counts against the deadline."""
    read = 0
    async for chunk in response.content.iter_any():
        read += len(chunk)
        if read >= ANSWER_LIMIT:
            return


class CheckedResolver(AbstractResolver):
    """Resolves a receiver's host name and refuses it if any address it resolves to is not allowed.

    The connector connects to exactly the addresses answered here, so a name whose answer changes between a
    check and the connection (DNS rebinding) cannot lead anywhere unchecked. TLS is still verified against the
    host name.
    """

    def __init__(self, destinations: Destinations, inner: AbstractResolver | None = None) -> None:
        self.destinations = destinations
        self.inner = inner or aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """The addresses of `host`, each checked against the policy."""
        found = await self.inner.resolve(host, port, family)
        for result in found:
            try:
                self.destinations.check_address(result["host"])
            except RefusedDestination as exc:
                raise RefusedDestination(f"(host {host}) {exc}") from None
        return found

    async def close(self) -> None:
        """Release the resolver underneath."""
        await self.inner.close()
