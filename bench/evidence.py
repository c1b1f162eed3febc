"""The evidence that our servers ran with the settings they are compared on: metrics answered (or not) by each,
and what the prediction log and the metrics counted over the run."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.sample import Sample
from bench.servers import Running
from bench.targets import Target
from tasks.prediction_log import STREAM

METRICS_ON = {"ours": True, "bare": False, "full": True, "h11": True}
"""Whether each of our servers counts what it serves and answers `GET /metrics`."""
LOGGING = "full"
"""The server whose model repository logs predictions."""
SETTLE_S = 2.5
"""Wait before reading the counts: the web workers write their tallies, and send the log's records, each second."""


def check_metrics(servers: dict[str, Running]) -> None:
    """Make sure each of our servers answers `GET /metrics` when its metrics are on, and 404 when off."""
    for name, running in servers.items():
        if name in METRICS_ON:
            status = _status(running.url + "/metrics", running.admin)
            if status != (200 if METRICS_ON[name] else 404):
                state = "on" if METRICS_ON[name] else "off"
                raise SystemExit(f"{name} has metrics {state}, but GET /metrics answered {status}")


def log_records(redis_url: str) -> int:
    """How many records the prediction log's stream on `redis_url` was ever given (0 before the first)."""
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.xinfo_stream(STREAM)["entries-added"])
    except redis.ResponseError:  # no such stream yet
        return 0
    finally:
        client.close()


def counted(running: Running) -> int:
    """The inference requests a server's metrics counted, every status and route."""
    with urllib.request.urlopen(urllib.request.Request(running.url + "/metrics", headers=running.admin)) as answer:
        text = answer.read().decode()
    return int(sum(sample.value for family in text_string_to_metric_families(text)
                   if family.name == "platform_inference_requests"
                   for sample in family.samples if sample.name.endswith("_total")))


def counts(servers: dict[str, Running], redis_url: str) -> dict[str, dict[str, int]]:
    """What each of our servers' metrics and the prediction log have counted so far."""
    time.sleep(SETTLE_S)
    found = {name: {"counted": counted(servers[name])} for name in servers.keys() & METRICS_ON.keys()
             if METRICS_ON[name]}
    if LOGGING in servers:
        found.setdefault(LOGGING, {})["logged"] = log_records(redis_url)
    return found


def observed(servers: dict[str, Running], samples: dict[str, list[Sample]], targets: tuple[Target, ...],
             before: dict[str, dict[str, int]], redis_url: str) -> dict[str, dict[str, float]]:
    """For each of our servers over the timed points: the requests timed, those its metrics counted and, for the
    logging server, the records its prediction log was given and their share of the requests timed."""
    after = counts(servers, redis_url)
    found: dict[str, dict[str, float]] = {}
    for name in sorted(servers.keys() & METRICS_ON.keys()):
        routes = {t.name for t in targets if t.server == name}
        timed = sum(s.requests for point, runs in samples.items() if point.split("@")[0] in routes for s in runs)
        found[name] = {"timed": timed, **{k: n - before[name][k] for k, n in after.get(name, {}).items()}}
        if "logged" in found[name]:
            found[name]["logged_share"] = found[name]["logged"] / timed
    return found


def lines(found: dict[str, dict[str, float]]) -> list[str]:
    """What each server's metrics and prediction log counted over the timed points, one line each."""
    out = []
    for name, seen in sorted(found.items()):
        parts = [f"{name}: {seen['timed']:,.0f} requests timed"]
        if "counted" in seen:
            parts.append(f"its metrics counted {seen['counted']:,.0f}")
        if "logged" in seen:
            parts.append(f"its prediction log {seen['logged']:,.0f} records ({seen['logged_share']:.2%})")
        out.append("; ".join(parts))
    return out


def _status(url: str, headers: dict[str, str]) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as answer:
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code
