"""The load test's traffic: synchronous, cached, asynchronous and batch requests mixed, as Locust users.

Three kinds of user, in the proportions their `weight` and `fixed_count` give (`--users` is split by them):
- `OnlineUser` (weight 3): synchronous predictions, one row each, with 50-150 ms between requests; tasks
  weighted 4 `iris :predict`, 3 `iris` V2 `/infer`, 3 `digits-heavy :predict`, whose answers are cached: three
  in four of its rows come from a small hot set (hits, once seen), the rest are new (misses); each answer must
  say which in `X-Cache`, and the two are timed apart.
- `JobUser` (weight 1): an `iris` job submitted, then polled until it ends (after 5 ms, then each wait 1.5
  times the last, up to 100 ms); its end-to-end time (submit to finished, as the client sees it) is reported
  as a request of type `JOB`; 100-300 ms between jobs.
- `BatchUser` (exactly one): 500 `iris` items registered, a run started and polled until it ends (after
  50 ms, then up to 500 ms apart), reported as type `RUN`; 5-10 s between runs.

It needs only Locust, so it runs against any deployment: `locust -f bench/locustfile.py --host URL`.
With `--summary FILE` it writes each endpoint's figures there when the test stops (`python -m bench.loadtest`
starts the platform, runs this headless with it, and reports them).
"""

from __future__ import annotations

import json
import random
import time
from argparse import ArgumentParser
from typing import Any

from locust import FastHttpUser, between, events, task
from locust.env import Environment
from locust.stats import RequestStats, StatsEntry, sort_stats

IRIS_ROWS = ([5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3], [5.8, 2.7, 5.1, 1.9])
HOT_ROWS = [[float(v) for v in random.Random(n).choices(range(17), k=64)] for n in range(32)]
"""The digits-heavy rows that repeat: each misses once, then hits until the cache entry expires."""
REPEAT_SHARE = 0.75
CACHED = "/v1/models/digits-heavy:predict (cached)"
FINISHED = {"succeeded", "failed", "cancelled"}
JOB_POLL_S, JOB_DEADLINE_S = (0.005, 0.1), 30.0
RUN_POLL_S, RUN_DEADLINE_S, RUN_ITEMS = (0.05, 0.5), 60.0, 500
"""Polls: the first wait and the longest; each wait is 1.5 times the one before. The deadline ends the polling."""
CACHE_OUTCOMES = RequestStats()
"""The cached endpoint's answers, timed apart by their `X-Cache` (HIT or MISS)."""


class Unfinished(Exception):
    """A job or run that failed, or did not finish within its deadline."""


def iris_row() -> list[float]:
    """One iris-like row: a reference flower, jittered."""
    return [round(v + random.uniform(-0.2, 0.2), 2) for v in random.choice(IRIS_ROWS)]


def digits_row() -> list[float]:
    """A digits-heavy row: from the hot set (REPEAT_SHARE of the time), else one never sent before."""
    if random.random() < REPEAT_SHARE:
        return random.choice(HOT_ROWS)
    return [float(random.randint(0, 16)) for _ in range(64)]


def decoded(response: Any) -> dict:
    """The response's JSON object; empty when the body is not one."""
    try:
        found = response.json()
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


def one_prediction(response: Any, key: str) -> None:
    """Mark a 200 that does not hold exactly one prediction under `key` as failed."""
    if response.status_code == 200 and len(decoded(response).get(key) or []) != 1:
        response.failure(f"expected one prediction under {key!r}, got {response.text[:200]}")


def ended(client: Any, path: str, name: str, waits_s: tuple[float, float], deadline_s: float) -> dict:
    """GET `path` until its record's status is final, waiting from the first of `waits_s` to the second,
    1.5 times longer each time, and answer that record; raise Unfinished on an answer other than 200 or past
    the deadline."""
    deadline, wait_s = time.perf_counter() + deadline_s, waits_s[0]
    while time.perf_counter() < deadline:
        time.sleep(wait_s)
        wait_s = min(wait_s * 1.5, waits_s[1])
        response = client.get(path, name=name)
        if response.status_code != 200:
            raise Unfinished(f"{name} answered {response.status_code}")
        record = decoded(response)
        if record.get("status") in FINISHED:
            return record
    raise Unfinished(f"not finished within {deadline_s:.0f} s")


def report(environment: Environment, request_type: str, name: str, started: float,
           error: Exception | None) -> None:
    """Fire a request event for a whole job or run, timed from `started` (time.perf_counter) to now."""
    elapsed_ms = (time.perf_counter() - started) * 1000
    environment.events.request.fire(request_type=request_type, name=name, response_time=elapsed_ms,
                                    response_length=0, response=None, context={}, exception=error)


class OnlineUser(FastHttpUser):
    """Synchronous predictions, cached and not."""

    weight = 3
    wait_time = between(0.05, 0.15)

    @task(4)
    def iris_predict(self) -> None:
        """One iris row over TensorFlow Serving REST."""
        body = {"instances": [iris_row()]}
        with self.client.post("/v1/models/iris:predict", json=body, catch_response=True) as response:
            one_prediction(response, "predictions")

    @task(3)
    def iris_infer(self) -> None:
        """One iris row over Open Inference Protocol V2."""
        body = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": iris_row()}]}
        with self.client.post("/v2/models/iris/infer", json=body, catch_response=True) as response:
            if response.status_code == 200 and not decoded(response).get("outputs"):
                response.failure(f"no outputs: {response.text[:200]}")

    @task(3)
    def digits_heavy_cached(self) -> None:
        """One digits-heavy row through the prediction cache, which must say HIT or MISS."""
        body = {"instances": [digits_row()]}
        with self.client.post("/v1/models/digits-heavy:predict", json=body, name=CACHED,
                              catch_response=True) as response:
            one_prediction(response, "predictions")
            if response.status_code == 200 and response.headers.get("X-Cache") not in ("HIT", "MISS"):
                response.failure(f"X-Cache is {response.headers.get('X-Cache')!r}, not HIT or MISS")


class JobUser(FastHttpUser):
    """Asynchronous jobs, submitted and polled until they end."""

    weight = 1
    wait_time = between(0.1, 0.3)

    @task
    def iris_job(self) -> None:
        """Submit one iris row as a job, poll it until it ends, and report its end-to-end time."""
        started = time.perf_counter()
        with self.client.post("/v1/models/iris:submit", json={"instances": [iris_row()]},
                              catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"answered {response.status_code}, not 202")
                return
            job_id = decoded(response).get("job_id")
        report(self.environment, "JOB", "iris job: submit to finished", started, self.outcome(job_id))

    def outcome(self, job_id: str) -> Exception | None:
        """Poll the job until it ends: None once it succeeded, else what went wrong."""
        try:
            job = ended(self.client, f"/v1/jobs/{job_id}", "/v1/jobs/[id]", JOB_POLL_S, JOB_DEADLINE_S)
        except Unfinished as exc:
            return exc
        return None if job["status"] == "succeeded" else Unfinished(f"job {job['status']}: {job.get('error')}")


class BatchUser(FastHttpUser):
    """Batch runs at a low rate: items registered, a run started and polled until it ends."""

    fixed_count = 1
    wait_time = between(5, 10)

    @task
    def iris_run(self) -> None:
        """Register RUN_ITEMS iris items, run the model over them, and report the run's end-to-end time."""
        items = {"model": "iris", "instances": [iris_row() for _ in range(RUN_ITEMS)]}
        self.client.post("/v1/batch/items", json=items)
        started = time.perf_counter()
        with self.client.post("/v1/batch/runs", json={"model": "iris"}, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"answered {response.status_code}, not 202: {response.text[:200]}")
                return
            run_id = decoded(response).get("run_id")
        report(self.environment, "RUN", "iris batch run: start to finished", started, self.outcome(run_id))

    def outcome(self, run_id: int) -> Exception | None:
        """Poll the run until it ends: None once it succeeded with every item, else what went wrong."""
        try:
            run = ended(self.client, f"/v1/batch/runs/{run_id}", "/v1/batch/runs/[id]", RUN_POLL_S, RUN_DEADLINE_S)
        except Unfinished as exc:
            return exc
        if run["status"] != "succeeded" or run["failed"]:
            return Unfinished(f"run {run['status']}, {run['failed']} items failed: {run.get('error')}")
        return None


@events.init_command_line_parser.add_listener
def add_arguments(parser: ArgumentParser) -> None:
    """Add `--summary`: a JSON file for the figures, written when the test stops."""
    parser.add_argument("--summary", default="", help="JSON file for each endpoint's figures and the cached "
                                                      "endpoint's hits and misses, written when the test stops")


@events.request.add_listener
def count_cache_outcome(request_type: str, name: str, response_time: float, response_length: int,
                        response: Any = None, exception: Exception | None = None, **_: Any) -> None:
    """Time the cached endpoint's answers by their `X-Cache` header."""
    if name == CACHED and exception is None and response is not None:
        outcome = response.headers.get("X-Cache") or "none"
        CACHE_OUTCOMES.log_request(outcome, name, response_time, response_length)


@events.test_start.add_listener
def forget_cache_outcomes(**_: Any) -> None:
    """Start each test's count of hits and misses afresh, as Locust does its own figures."""
    CACHE_OUTCOMES.reset_all()


@events.test_stop.add_listener
def write_summary(environment: Environment, **_: Any) -> None:
    """Write the figures to `--summary`, if given: every user has stopped, so they are final."""
    path = environment.parsed_options.summary if environment.parsed_options else ""
    if path:
        with open(path, "w") as out:
            json.dump(summary(environment.stats), out, indent=2)


def summary(stats: RequestStats) -> dict[str, Any]:
    """Each endpoint's figures, what failed, and the cached endpoint's hits and misses timed apart."""
    return {"endpoints": [figures(entry) for entry in sort_stats(stats.entries)],
            "failures": [error.to_dict() for error in sort_stats(stats.errors)],
            "cache": {entry.method: figures(entry) for entry in sort_stats(CACHE_OUTCOMES.entries)}}


def figures(entry: StatsEntry) -> dict[str, Any]:
    """One entry's counts, throughput over the whole test, and response-time percentiles in milliseconds (as
    Locust rounds them: to 1 ms under 100 ms, to 10 ms under 1 s)."""
    return {"type": entry.method, "name": entry.name, "requests": entry.num_requests, "failures": entry.num_failures,
            "rps": round(entry.total_rps, 2), "p50_ms": entry.get_response_time_percentile(0.5),
            "p95_ms": entry.get_response_time_percentile(0.95), "p99_ms": entry.get_response_time_percentile(0.99),
            "max_ms": round(entry.max_response_time, 1)}
