"""The web process's metrics: what the data plane served, the other routes, and `GET /metrics`.

`RequestMetrics` observes the data plane (`DataPlane.observers`): per model, version and protocol it counts
requests by status, times their stages and counts the prediction cache's hits and misses. An observer runs
before the answer is sent, so it only increments prometheus-client's values (under gunicorn, in its
multiprocess files: a few microseconds). The Flask routes are counted and timed by endpoint. `GET /metrics`
adds up every gunicorn worker's files, and reads the shared gauges (`tasks.gauges`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tasks.gauges import SharedState
from tasks.metrics import MetricsSettings, collected
from webapp.dataplane import DataPlane
from webapp.served import Served

bp = Blueprint("metrics", __name__)
SECONDS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1, 2.5, 5, 10)
REQUESTS = Counter("platform_inference_requests_total", "Inference requests answered, by status.",
                   ["model", "version", "protocol", "status"])
STAGES = Histogram("platform_inference_stage_seconds", "Time an inference request spent in each stage.",
                   ["model", "version", "protocol", "stage"], buckets=SECONDS)
CACHE = Counter("platform_prediction_cache_lookups_total", "Prediction cache lookups, by result.",
                ["model", "version", "result"])
HTTP = Counter("platform_http_requests_total", "Requests to the other routes, by Flask endpoint and status.",
               ["endpoint", "method", "status"])
HTTP_SECONDS = Histogram("platform_http_request_duration_seconds", "Time the other routes took, by Flask endpoint.",
                         ["endpoint"], buckets=SECONDS[5:])
MODEL_STAGES = ("decode", "preprocess", "model", "encode")
"""The stages of a request whose model ran in it."""
CACHED_STAGES = ("decode", "predict", "encode")
"""The stages of a request the prediction cache answered: `predict` is its lookup (and the model, on a miss)."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
COUNTED_APART = frozenset({"inference.infer"})
"""Flask endpoints the data plane answers, and `RequestMetrics` counts."""


@dataclass
class Series:
    """The metric children of one model version and protocol, each made on its first use and kept."""

    labels: tuple[str, str, str]
    statuses: dict[int, Counter] = field(default_factory=dict)
    timed: dict[bool, tuple[tuple[str, Histogram], ...]] = field(default_factory=dict)
    cache: dict[str, Counter] = field(default_factory=dict)

    def requests(self, status: int) -> Counter:
        """The counter of requests answered with `status`."""
        found = self.statuses.get(status)
        if found is None:
            found = self.statuses[status] = REQUESTS.labels(*self.labels, str(status))
        return found

    def stages(self, cached: bool) -> tuple[tuple[str, Histogram], ...]:
        """The stages, and their histograms, of a request the prediction cache answered, or of one it did not."""
        found = self.timed.get(cached)
        if found is None:
            names = CACHED_STAGES if cached else MODEL_STAGES
            found = self.timed[cached] = tuple((name, STAGES.labels(*self.labels, name)) for name in names)
        return found

    def lookups(self, outcome: str) -> Counter:
        """The counter of cache lookups with `outcome` (`HIT` or `MISS`)."""
        found = self.cache.get(outcome)
        if found is None:
            found = self.cache[outcome] = CACHE.labels(*self.labels[:2], outcome.lower())
        return found


class RequestMetrics:
    """An observer of the data plane: counts each request by status, times its stages, counts cache lookups.

    A request for a model that was not found is counted with empty model and version, so clients cannot make
    new series by naming models that do not exist."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, int | None, str], Series] = {}

    def __call__(self, served: Served) -> None:
        """Record one request the data plane served."""
        key = (served.model if served.version is not None else "", served.version, served.protocol)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series((key[0], "" if key[1] is None else str(key[1]), key[2]))
        series.requests(served.status).inc()
        stages, cached = served.stages, served.cache is not None
        for name, child in series.stages(cached):
            seconds = stages.get(name)
            if seconds is not None:
                child.observe(seconds)
        if cached:
            series.lookups(served.cache).inc()


@bp.get("/metrics")
def scrape() -> Response:
    """The metrics of this web process's workers, added up, and the shared gauges, in Prometheus's text format."""
    state = CollectorRegistry()
    state.register(current_app.extensions["metrics"])
    return Response(generate_latest(collected()) + generate_latest(state), 200, content_type=CONTENT_TYPE_LATEST)


def install(app: Flask, dataplane: DataPlane, settings: MetricsSettings) -> None:
    """Count what the app serves and answer `GET /metrics`, unless the settings turn metrics off."""
    if not settings.metrics:
        return
    dataplane.observers.append(RequestMetrics())
    app.extensions["metrics"] = SharedState(app.extensions["celery"], app.extensions["registry"],
                                            app.extensions["batches"], app.extensions["runs"])
    app.register_blueprint(bp)
    app.before_request_funcs.setdefault(None, []).insert(0, _start)  # first, so refused requests are timed too
    app.after_request(_count)


def _start() -> None:
    g.metrics_started = time.perf_counter()


def _count(response: Response) -> Response:
    endpoint = request.endpoint or "unmatched"
    if endpoint not in COUNTED_APART:
        method = request.method if request.method in METHODS else "other"
        HTTP.labels(endpoint, method, str(response.status_code)).inc()
        started = g.get("metrics_started")
        if started is not None:
            HTTP_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
    return response
