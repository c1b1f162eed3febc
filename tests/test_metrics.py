"""Metrics and structured logs through real processes: gunicorn with two workers, a Celery worker, beat.

Each endpoint is scraped after known traffic and parsed with prometheus-client's own parser; the counts must
match the traffic exactly, added up over the processes that served it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from conftest import free_port, web_server
from prometheus_client.parser import text_string_to_metric_families
from workers import Platform, celery_beat, celery_worker, finished_jobs

from deploy import launch
from tasks import logs, metrics, submission
from tasks.jobs import JobStore
from tasks.status import JobStatus
from webapp.tally import Tally

METRICS_REDIS_URL = os.environ.get("TEST_METRICS_REDIS_URL", "redis://127.0.0.1:6379/5")
IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
V2 = {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
DIGITS = {"instances": [[float(i % 17) for i in range(64)]]}
Samples = dict[tuple[str, frozenset], float]


def parsed(text: str) -> Samples:
    """Every sample of a scrape, by name and labels, as prometheus-client's parser reads it."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 for a sample the scrape does not have."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str) -> Samples:
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
    return parsed(answer.text)


def scraped_once(url: str, ready: Callable[[Samples], bool], timeout_s: float = 30) -> Samples:
    """The first scrape of `url` where `ready` holds (the last one, if none does in time)."""
    deadline, samples = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        samples = scrape(url)
        if ready(samples):
            break
        time.sleep(0.2)
    return samples


def json_lines(path: Path) -> list[dict]:
    """The lines of a log that are JSON objects."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


class JsonLines(logging.Handler):
    """A handler that keeps the lines it is given, as the JSON formatter writes them, parsed back."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logs.JsonFormatter())
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


class Traffic:
    """Requests sent to a web process, counted by what the metrics should say of them."""

    def __init__(self, url: str):
        self.url, self.pool = url, ThreadPoolExecutor(8)
        self.statuses: dict[tuple[str, str, str, str], int] = {}
        self.cache: dict[str, int] = {"HIT": 0, "MISS": 0}

    def send(self, path: str, label: tuple[str, str, str], times: int, **body: object) -> list[requests.Response]:
        """Send one request `times` times at once, each on a connection of its own, so both workers take some."""
        answers = list(self.pool.map(lambda _: requests.post(self.url + path, timeout=30, **body), range(times)))
        for answer in answers:
            key = (*label, str(answer.status_code))
            self.statuses[key] = self.statuses.get(key, 0) + 1
            if "X-Cache" in answer.headers:
                self.cache[answer.headers["X-Cache"]] += 1
        return answers


@pytest.mark.integration
def test_the_web_metrics_add_up_both_workers_and_match_the_traffic_exactly(tmp_path: Path, batch_tables) -> None:
    redis.Redis.from_url(METRICS_REDIS_URL).flushdb()
    directory, log = tmp_path / "web-metrics", tmp_path / "web.log"
    with web_server(log, WEB_CONCURRENCY="2", REDIS_URL=METRICS_REDIS_URL, PROMETHEUS_MULTIPROC_DIR=str(directory),
                    LOG_FORMAT="json") as url:
        traffic = Traffic(url)
        traffic.send("/v1/models/iris:predict", ("iris", "1", "tfserving"), 12, json=IRIS)
        traffic.send("/v2/models/iris/infer", ("iris", "1", "v2"), 6, json=V2)
        traffic.send("/v1/models/digits-light:predict", ("digits-light", "1", "tfserving"), 4, json=DIGITS)
        traffic.send("/v1/models/iris:predict", ("iris", "1", "tfserving"), 1, data=b"{",
                     headers={"Content-Type": "application/json"})
        traffic.send("/v1/models/nowhere:predict", ("", "", "tfserving"), 2, json=IRIS)
        for _ in range(20):  # until the prediction cache answers from what an earlier request stored
            traffic.send("/v1/models/digits-heavy:predict", ("digits-heavy", "1", "tfserving"), 1, json=DIGITS)
            if traffic.cache["HIT"]:
                break
        for _ in range(100):  # until both workers served (almost always at once) and wrote their tallies
            if len(list(directory.glob("tally-*.json"))) >= 2:
                break
            traffic.send("/v1/models/iris:predict", ("iris", "1", "tfserving"), 8, json=IRIS)
            time.sleep(0.2)
        for _ in range(3):
            assert requests.get(f"{url}/v1/models", timeout=10).status_code == 200
        submitted = [requests.post(f"{url}/v1/models/iris:submit", json=IRIS, timeout=10,
                                   headers={"X-Request-ID": f"metrics-test-{n}"} if n else {}) for n in range(3)]
        requests.post(f"{url}/v1/batch/items", json={"model": "iris", "instances": [[1, 2, 3, 4]] * 5}, timeout=10)
        assert requests.post(f"{url}/v1/batch/runs", json={"model": "iris"}, timeout=10).status_code == 202
        sent = sum(n for (_, _, _, status), n in traffic.statuses.items())
        samples = scraped_once(f"{url}/metrics",  # the other worker's tally comes within a second
                               lambda s: _answered(s) == sent)
    assert len(list(directory.glob("tally-*.json"))) == 2
    _check_requests(samples, traffic)
    _check_other_routes_and_shared_gauges(samples)
    _check_web_log_lines(log, [answer.json()["job_id"] for answer in submitted])


def _answered(samples: Samples) -> float:
    """Every inference request the scrape counts."""
    return sum(v for (name, _), v in samples.items() if name == "platform_inference_requests_total")


def _check_requests(samples: Samples, traffic: Traffic) -> None:
    assert traffic.statuses[("iris", "1", "tfserving", "400")] == 1 and traffic.cache["HIT"] == 1
    for (model, version, protocol, status), count in traffic.statuses.items():
        labels = {"model": model, "version": version, "protocol": protocol}
        assert value(samples, "platform_inference_requests_total", **labels, status=status) == count, labels
    for model, protocol, stages in (("iris", "tfserving", ("decode", "preprocess", "model", "encode")),
                                    ("iris", "v2", ("decode", "preprocess", "model", "encode")),
                                    ("digits-light", "tfserving", ("decode", "preprocess", "model", "encode")),
                                    ("digits-heavy", "tfserving", ("decode", "predict", "encode"))):
        labels = {"model": model, "version": "1", "protocol": protocol}
        answered = traffic.statuses[(model, "1", protocol, "200")]
        for stage in stages:
            timed = {**labels, "stage": stage}
            assert value(samples, "platform_inference_stage_seconds_count", **timed) == answered
            assert value(samples, "platform_inference_stage_seconds_bucket", **timed, le="+Inf") == answered
            assert value(samples, "platform_inference_stage_seconds_sum", **timed) > 0
    heavy = {"model": "digits-heavy", "version": "1"}
    assert value(samples, "platform_inference_stage_seconds_count", **heavy, protocol="tfserving", stage="model") == 0
    assert value(samples, "platform_prediction_cache_lookups_total", **heavy, result="hit") == 1
    assert value(samples, "platform_prediction_cache_lookups_total", **heavy, result="miss") == traffic.cache["MISS"]
    assert value(samples, "platform_prediction_cache_lookups_total", model="iris", version="1", result="miss") == 0


def _check_other_routes_and_shared_gauges(samples: Samples) -> None:
    assert value(samples, "platform_http_requests_total", endpoint="catalog.index", method="GET", status="200") == 3
    assert value(samples, "platform_http_requests_total", endpoint="jobs.submit", method="POST", status="202") == 3
    assert value(samples, "platform_http_request_duration_seconds_count", endpoint="jobs.submit") == 3
    assert value(samples, "platform_http_requests_total", endpoint="inference.infer", method="POST", status="200") == 0
    # nothing consumes this Redis: the three jobs wait in iris's lane, behind the one batcher sent for it
    assert value(samples, "platform_batch_lane_jobs", model="iris", version="1") == 3
    assert value(samples, "platform_queue_messages", queue="predict") == 1
    assert value(samples, "platform_queue_messages", queue="batch") == 1
    assert value(samples, "platform_queue_messages", queue="prep") == 0
    assert value(samples, "platform_tasks_sent_total", task="predict_batch", queue="predict") == 1
    assert value(samples, "platform_tasks_sent_total", task="batch_run", queue="batch") == 1
    assert ("platform_batch_run_items", frozenset({"model": "iris", "state": "total"}.items())) in samples


def _check_web_log_lines(log: Path, job_ids: list[str]) -> None:
    lines = json_lines(log)
    assert {"time", "level", "logger", "message"} <= set(lines[-1])
    queued = {line["request_id"]: line for line in lines if line["message"].startswith("request ")
              and "queued" in line["message"]}
    assert {"metrics-test-1", "metrics-test-2"} <= set(queued)
    store = JobStore(redis.Redis.from_url(METRICS_REDIS_URL), 60, 60)
    made = store.get(job_ids[0]).request_id  # none was given: the one made for it is the job's and its lines'
    assert made and made in queued and job_ids[0] in queued[made]["message"]
    assert queued["metrics-test-1"]["model"] == "iris" and "key" not in queued["metrics-test-1"]


@pytest.mark.integration
def test_a_worker_serves_its_job_counts_batch_sizes_and_queue_waits_added_up_over_its_children(tmp_path: Path) -> None:
    platform, port = Platform.on(METRICS_REDIS_URL), free_port()
    env = {"WORKER_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "worker-metrics"),
           "LOG_FORMAT": "json"}
    iris = platform.registry.get("iris")
    with celery_worker(METRICS_REDIS_URL, "predict", tmp_path / "worker.log", concurrency=2, env=env) as worker:
        rows = np.array([[5.1, 3.5, 1.4, 0.2]], np.float32)
        batched = [platform.submit("iris", rows) for _ in range(6)]
        alone = [submission.submit(platform.app, platform.store, None, iris, {"features": rows}, "rows", None,
                                   f"worker-test-{n}").id for n in range(3)]
        bad = platform.submit("iris", np.ones((1, 3), np.float32), batched=False)
        jobs = finished_jobs(platform.store, [*batched, *alone, bad], 60)
        assert [job.status for job in jobs.values()].count(JobStatus.SUCCEEDED) == 9
        url, labels = f"http://127.0.0.1:{port}/metrics", {"model": "iris", "version": "1"}
        samples = scraped_once(url, lambda s: value(s, "platform_job_queue_wait_seconds_count", **labels) >= 10)
    assert value(samples, "platform_jobs_finished_total", **labels, state="succeeded") == 9
    assert value(samples, "platform_jobs_finished_total", **labels, state="failed") == 1
    assert value(samples, "platform_job_queue_wait_seconds_count", **labels) == 10
    assert value(samples, "platform_job_queue_wait_seconds_sum", **labels) > 0
    assert value(samples, "platform_job_batch_size_sum", **labels) == 6  # each batched job ran in one batch
    assert 1 <= value(samples, "platform_job_batch_size_count", **labels) <= 6
    assert value(samples, "platform_tasks_total", task="predict", state="SUCCESS") == 4
    assert value(samples, "platform_task_duration_seconds_count", task="predict") == 4
    lines = [line for line in json_lines(worker.log) if line.get("request_id") == "worker-test-1"]
    assert lines and {(line["job_id"], line["task"]) for line in lines} == {(alone[1], "predict")}


@pytest.mark.integration
def test_beat_serves_the_messages_it_sent(tmp_path: Path) -> None:
    redis.Redis.from_url(METRICS_REDIS_URL).flushdb()
    port = free_port()
    env = {"BEAT_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "beat-metrics"),
           "BATCH_LEASE_S": "2"}  # reclaim_batches every second
    with celery_beat(METRICS_REDIS_URL, tmp_path / "beat.log", env=env):
        url = f"http://127.0.0.1:{port}/metrics"
        _wait_for_port(port, 30)
        sent = lambda s: value(s, "platform_tasks_sent_total", task="reclaim_batches", queue="predict")  # noqa: E731
        samples = scraped_once(url, lambda s: sent(s) >= 2)
    assert sent(samples) >= 2
    assert redis.Redis.from_url(METRICS_REDIS_URL).llen("predict") >= sent(samples)  # each one sent is queued


def _wait_for_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listened on port {port} within {timeout_s} s")


def test_a_metrics_port_already_taken_costs_only_the_metrics(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with caplog.at_level(logging.ERROR, "tasks.metrics"):
            assert not metrics.serve(taken.getsockname()[1], "127.0.0.1")
    assert "WORKER_METRICS_PORT" in caplog.text


def test_make_run_gives_every_worker_and_beat_a_port_and_a_directory_of_its_own(tmp_path: Path) -> None:
    processes = launch.commands(dict(os.environ), tmp_path)
    given = launch.metrics_env(processes, {"LAUNCH_METRICS_PORT": "9300"}, tmp_path)
    ports = [v for env in given.values() for k, v in env.items() if k.endswith("_METRICS_PORT")]
    assert sorted(ports) == [str(9300 + n) for n in range(len(ports))]
    assert len(ports) == sum(1 for name in processes if "worker" in name) + 1  # and beat
    assert given["beat"]["BEAT_METRICS_PORT"] in ports and "flower" not in given
    directories = [env["PROMETHEUS_MULTIPROC_DIR"] for env in given.values()]
    assert len(set(directories)) == len(directories) and "web" in given
    off = launch.metrics_env(processes, {"LAUNCH_METRICS_PORT": "0"}, tmp_path)
    assert not [k for env in off.values() for k in env if k.endswith("_PORT")]


def test_metrics_off_adds_no_observer_and_no_endpoint(make_eager_app: Callable) -> None:
    off, on = make_eager_app(metrics=False), make_eager_app(metrics=True)
    assert not any(isinstance(o, Tally) for o in off.extensions["dataplane"].observers)
    assert off.test_client().get("/metrics").status_code == 404
    assert any(isinstance(o, Tally) for o in on.extensions["dataplane"].observers)
    assert on.test_client().get("/metrics").status_code == 200


def test_a_json_line_says_what_it_is_about_and_never_the_key() -> None:
    formatter = logs.JsonFormatter()
    record = logging.LogRecord("webapp.jobs", logging.WARNING, __file__, 1, "job %s queued", ("j1",), None)
    token = logs.current.set(logs.Context(request_id="r-1", model="iris", version=2, key_id=7))
    try:
        line = json.loads(formatter.format(record))
        record.request_id = "r-2"  # a line's own (`extra=`) comes first
        own = json.loads(formatter.format(record))
    finally:
        logs.current.reset(token)
    assert line["message"] == "job j1 queued" and line["level"] == "WARNING" and line["logger"] == "webapp.jobs"
    assert (line["request_id"], line["model"], line["version"], line["key_id"]) == ("r-1", "iris", 2, 7)
    assert line["time"].endswith("+00:00") and "task" not in line and own["request_id"] == "r-2"
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(formatter.format(failed))["exception"]


def test_log_format_is_text_or_json_and_nothing_else() -> None:
    assert logs.log_format({}) == "text" and logs.log_format({"LOG_FORMAT": "JSON"}) == "json"
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        logs.log_format({"LOG_FORMAT": "xml"})


def test_the_lines_logged_while_the_data_plane_serves_say_which_request_model_and_version(app) -> None:
    plane, handler = app.extensions["dataplane"], JsonLines()
    observer = logging.getLogger("tests.observer")
    observer.addHandler(handler)
    plane.observers.append(lambda served: observer.warning("served %d", served.status))
    try:
        answer = app.test_client().post("/v1/models/iris:predict", json=IRIS, headers={"X-Request-ID": "dp-1"})
    finally:
        observer.removeHandler(handler)
    line = handler.lines[-1]
    assert answer.status_code == 200 and line["message"] == "served 200"
    assert (line["request_id"], line["model"], line["version"]) == ("dp-1", "iris", 1)


def test_a_tally_puts_each_time_in_the_first_bucket_that_holds_it_and_counts_cumulatively() -> None:
    from webapp.served import Served

    tally = Tally(None, (0.1, 1.0))
    for seconds in (0.1, 0.5, 2.0):
        served = Served("iris", 1, "v2", status=200)
        served.stages.update(decode=seconds, preprocess=0.0, model=0.0, encode=0.0)
        tally(served)
    tally(Served("nowhere", None, "v2", status=404))
    text = generate_latest_of(tally)
    decode = {"model": "iris", "version": "1", "protocol": "v2", "stage": "decode"}
    assert [value(text, "platform_inference_stage_seconds_bucket", **decode, le=le) for le in ("0.1", "1.0", "+Inf")] \
        == [1, 2, 3]
    assert value(text, "platform_inference_stage_seconds_sum", **decode) == pytest.approx(2.6)
    assert value(text, "platform_inference_requests_total", model="", version="", protocol="v2", status="404") == 1


def generate_latest_of(collector: object) -> Samples:
    """What a scrape of `collector` alone shows."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return parsed(generate_latest(registry).decode())
