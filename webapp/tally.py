"""The data plane's metrics, added up in process and written to a file of the process's own every second.

prometheus-client's multiprocess mode writes each observation to a memory-mapped file under a lock: a one-row
request's counter and four stage histograms took about 13 us there, a tenth of the request. Here a request
costs one lock, a few dictionary updates and a bisect. A thread of each web process writes its totals to
`tally-<pid>.json` in the metrics directory every FLUSH_S (and when the app closes), and `GET /metrics` adds up
every such file through a custom collector, prometheus-client's public extension point. Another process's
figures may thus lag by up to FLUSH_S; the scraping process's own never do. The files of processes that have
ended stay, so totals never go down, as with prometheus-client's own multiprocess files.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from webapp.served import Served

log = logging.getLogger(__name__)
FLUSH_S = 1.0
MODEL_STAGES = ("decode", "preprocess", "model", "encode")
"""The stages of a request whose model ran in it."""
CACHED_STAGES = ("decode", "predict", "encode")
"""The stages of a request the prediction cache answered: `predict` is its lookup (and the model, on a miss)."""
Totals = dict[str, dict[tuple[str, ...], object]]


class Tally:
    """An observer of the data plane: counts each request by status, times its stages, counts cache lookups.

    A request for a model that was not found is counted with empty model and version, so clients cannot make
    new series by naming models that do not exist."""

    def __init__(self, directory: Path | None, buckets: tuple[float, ...]):
        self.directory, self.buckets = directory, buckets
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, ...], int] = {}
        self.stages: dict[tuple[str, ...], list[float]] = {}
        """Per model, version, protocol and stage: the count in each bucket (the last one +Inf), then the sum."""
        self.lookups: dict[tuple[str, ...], int] = {}
        self.writer: threading.Thread | None = None
        self.stopped = threading.Event()

    def __call__(self, served: Served) -> None:
        """Count one request the data plane served."""
        found = served.version is not None
        labels = (served.model if found else "", str(served.version) if found else "", served.protocol)
        cached, stages, buckets = served.cache is not None, served.stages, self.buckets
        with self.lock:
            key = (*labels, str(served.status))
            self.requests[key] = self.requests.get(key, 0) + 1
            for name in CACHED_STAGES if cached else MODEL_STAGES:
                seconds = stages.get(name)
                if seconds is not None:
                    row = self.stages.get((*labels, name))
                    if row is None:
                        row = self.stages[(*labels, name)] = [0] * (len(buckets) + 1) + [0.0]
                    row[bisect.bisect_left(buckets, seconds)] += 1
                    row[-1] += seconds
            if cached:
                key = (*labels[:2], served.cache.lower())
                self.lookups[key] = self.lookups.get(key, 0) + 1
        if self.writer is None and self.directory is not None:
            self._start()

    def _start(self) -> None:
        with self.lock:
            if self.writer is None:
                self.writer = threading.Thread(target=self._write_every, name="metrics-tally", daemon=True)
                self.writer.start()

    def _write_every(self) -> None:
        while not self.stopped.wait(FLUSH_S):
            self.flush()

    def totals(self) -> Totals:
        """This process's totals so far."""
        with self.lock:
            return {"requests": dict(self.requests), "stages": {k: list(v) for k, v in self.stages.items()},
                    "lookups": dict(self.lookups)}

    def flush(self) -> None:
        """Write this process's totals to its file (atomically: readers see the old file or the new one)."""
        if self.directory is None:
            return
        totals = {kind: [[*key, value] for key, value in rows.items()] for kind, rows in self.totals().items()}
        path = self.directory / f"tally-{os.getpid()}.json"
        try:
            path.with_suffix(".tmp").write_bytes(orjson.dumps(totals))
            path.with_suffix(".tmp").replace(path)
        except OSError as exc:
            log.warning("metrics: could not write %s: %s", path, exc)

    def close(self) -> None:
        """Stop the writer and write the totals one last time."""
        self.stopped.set()
        self.flush()

    def collect(self) -> Iterator[Metric]:
        """The totals of every web process (prometheus-client's custom collector protocol)."""
        totals = self._everyone()
        requests = CounterMetricFamily("platform_inference_requests", "Inference requests answered, by status.",
                                       labels=["model", "version", "protocol", "status"])
        for key, count in totals["requests"].items():
            requests.add_metric(list(key), count)
        stages = HistogramMetricFamily("platform_inference_stage_seconds",
                                       "Time an inference request spent in each stage.",
                                       labels=["model", "version", "protocol", "stage"])
        bounds = [floatToGoString(b) for b in (*self.buckets, math.inf)]
        for key, row in totals["stages"].items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, row[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            stages.add_metric(list(key), buckets, sum_value=row[-1])
        lookups = CounterMetricFamily("platform_prediction_cache_lookups", "Prediction cache lookups, by result.",
                                      labels=["model", "version", "result"])
        for key, count in totals["lookups"].items():
            lookups.add_metric(list(key), count)
        return iter((requests, stages, lookups))

    def _everyone(self) -> Totals:
        """This process's totals and those in every other web process's file, added up."""
        everyone = self.totals()
        own = f"tally-{os.getpid()}.json"
        files = self.directory.glob("tally-*.json") if self.directory is not None else ()
        for path in files:
            if path.name != own:
                _add(everyone, path)
        return everyone


def _add(totals: Totals, path: Path) -> None:
    """Add the totals in `path` (a file another process wrote) to `totals`."""
    try:
        found = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:  # gone or being replaced: its figures come next scrape
        log.info("metrics: skipped %s: %s", path, exc)
        return
    for kind, rows in found.items():
        into = totals[kind]
        for *key, value in rows:
            key = tuple(key)
            if kind == "stages":
                kept = into.setdefault(key, [0] * len(value))
                into[key] = [a + b for a, b in zip(kept, value, strict=True)]
            else:
                into[key] = into.get(key, 0) + value
