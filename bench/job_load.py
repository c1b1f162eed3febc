"""Loads for the asynchronous designs: a burst of jobs for throughput, a backlog for the workers alone, and a
slow trickle for latency.

All only submit and poll, through a design's client. Throughput submits every job back to back, then polls
the oldest outstanding jobs (a small window, in one round trip): jobs end about in the order they came, so
the window follows the tail; it polls again at once when the whole window had ended, else after a
millisecond, so polling stays cheap for Redis while the workers lag. The run ends when the last job is seen
to end. The backlog is the same burst submitted while the workers are paused (SIGSTOP), timed from their
resumption: what the workers sustain when submitting costs nothing. Light load submits one job at a time at
a fixed rate, polling the outstanding ones every quarter of a millisecond; a job's latency is from just
before its submit to the poll that sees it ended.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np

from bench.sample import Sample, summarise

Submit = Callable[[np.ndarray], str]
Finished = Callable[[list[str]], list[bool]]
Pause = Callable[[], AbstractContextManager[None]]
WINDOW = 16
POLL_S = 0.001
LIGHT_POLL_S = 0.00025
TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Throughput:
    """A burst of jobs: how fast they all ended, what submitting one cost while the workers ran, and how
    long the workers went on after the last submit (short: the submitter held them back; long: they lagged)."""

    jobs: int
    jobs_per_s: float
    submit_us: float
    drain_ms: float


def throughput(submit: Submit, finished: Finished, rows: np.ndarray, count: int) -> Throughput:
    """Submit `count` jobs as fast as possible; jobs/s from the first submit to the last result."""
    clock = time.perf_counter
    start = clock()
    ids = [submit(rows[i % len(rows)]) for i in range(count)]
    submitted = clock()
    ended = wait(finished, ids)
    return Throughput(count, count / (ended - start), (submitted - start) / count * 1e6, (ended - submitted) * 1e3)


def backlog(submit: Submit, finished: Finished, rows: np.ndarray, count: int, paused: Pause) -> float:
    """Submit `count` jobs while the workers are paused; jobs/s from their resumption to the last result."""
    with paused():
        ids = [submit(rows[i % len(rows)]) for i in range(count)]
    start = time.perf_counter()
    return count / (wait(finished, ids) - start)


def wait(finished: Finished, job_ids: list[str], poll_s: float = POLL_S, timeout_s: float = TIMEOUT_S) -> float:
    """Poll until every job has ended; answer the clock when the last was seen to."""
    outstanding, deadline = deque(job_ids), time.perf_counter() + timeout_s
    while True:
        window = [outstanding.popleft() for _ in range(min(WINDOW, len(outstanding)))]
        left = [i for i, done in zip(window, finished(window), strict=True) if not done]
        outstanding.extendleft(reversed(left))
        if not outstanding:
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise SystemExit(f"{len(outstanding)} jobs had not ended after {timeout_s:.0f} s")
        if left:
            time.sleep(poll_s)


def light_load(submit: Submit, finished: Finished, rows: np.ndarray, rate: float, seconds: float) -> Sample:
    """Submit jobs one at a time, `rate` a second for `seconds`; p50/p99 submit-to-result latency."""
    clock, count = time.perf_counter_ns, max(1, int(rate * seconds))
    pending: dict[str, int] = {}
    latencies: list[int] = []
    start = clock()
    for i in range(count):
        due = start + int(i * 1e9 / rate)
        while (now := clock()) < due:
            if pending:
                _reap(finished, pending, latencies)
            time.sleep(min(LIGHT_POLL_S, (due - now) / 1e9))
        submitted_at = clock()
        pending[submit(rows[i % len(rows)])] = submitted_at
    deadline = clock() + int(TIMEOUT_S * 1e9)
    while pending and clock() < deadline:
        _reap(finished, pending, latencies)
        time.sleep(LIGHT_POLL_S)
    return summarise(latencies, (clock() - start) / 1e9, errors=len(pending))


def _reap(finished: Finished, pending: dict[str, int], latencies: list[int]) -> None:
    """Move the pending jobs that have ended to the latencies."""
    ids = list(pending)
    ended = finished(ids)
    now = time.perf_counter_ns()
    latencies.extend(now - pending.pop(i) for i, done in zip(ids, ended, strict=True) if done)
