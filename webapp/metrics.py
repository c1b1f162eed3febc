"""The web process's metrics: what the data plane served, the other routes, and `GET /metrics`.

A `Tally` (webapp/tally.py) observes the data plane (`DataPlane.observers`): per model, version and protocol it
counts requests by status, times their stages and counts the prediction cache's hits and misses, in process,
and writes its totals to a file every second. The Flask routes are counted and timed by endpoint in
prometheus-client's multiprocess files. `GET /metrics` adds up every gunicorn worker's files of both kinds, and
reads the shared gauges (`tasks.gauges`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tasks.gauges import SharedState
from tasks.metrics import MULTIPROCESS_DIR, MetricsSettings, collected
from webapp.dataplane import DataPlane
from webapp.tally import Tally

bp = Blueprint("metrics", __name__)
SECONDS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1, 2.5, 5, 10)
HTTP = Counter("platform_http_requests_total", "Requests to the other routes, by Flask endpoint and status.",
               ["endpoint", "method", "status"])
HTTP_SECONDS = Histogram("platform_http_request_duration_seconds", "Time the other routes took, by Flask endpoint.",
                         ["endpoint"], buckets=SECONDS[5:])
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
COUNTED_APART = frozenset({"inference.infer"})
"""Flask endpoints the data plane answers, and its `Tally` counts."""


@bp.get("/metrics")
def scrape() -> Response:
    """The metrics of this web process's workers, added up, and the shared gauges, in Prometheus's text format."""
    state = CollectorRegistry()
    state.register(current_app.extensions["metrics"])
    state.register(current_app.extensions["tally"])
    return Response(generate_latest(collected()) + generate_latest(state), 200, content_type=CONTENT_TYPE_LATEST)


def install(app: Flask, dataplane: DataPlane, settings: MetricsSettings) -> None:
    """Count what the app serves and answer `GET /metrics`, unless the settings turn metrics off."""
    if not settings.metrics:
        return
    directory = os.environ.get(MULTIPROCESS_DIR)
    tally = app.extensions["tally"] = Tally(Path(directory) if directory else None, SECONDS)
    dataplane.observers.append(tally)
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
