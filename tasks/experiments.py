"""Online experiments in Redis: per arm (a routed model's version) its live requests, and how each shadow's
answers agreed with them; the shadows' metrics for Prometheus.

Two hashes per model: `experiment:{model}:arms`, fields `<version>|requests`, `|ok`, `|errors`, `|seconds`
(of the ok ones) and `dropped`; `experiment:{model}:shadows`, fields `<version>|<shadow>|runs`, `|rows`,
`|agreed`, `|failed`, `|seconds` (the shadow's model time) and `|live_seconds` (the live one's, on the same
requests). A mirrored request's packed inputs and outputs wait under `shadow:{uuid}` for its task.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

import redis
from prometheus_client import Counter, Gauge, Histogram

PAYLOAD_TTL_S = 300
"""How long a mirrored request waits for its shadow task; the task expires with it."""
LABELS = ["model", "version", "shadow"]
AGREEMENT = Gauge("platform_shadow_agreement_ratio", "Share of the compared rows on which the shadow agreed with the "
                  "live version, since the experiment's counts began", LABELS, multiprocess_mode="mostrecent")
COMPARED = Counter("platform_shadow_compared_rows", "Rows a shadow answered and compared with the live version", LABELS)
AGREED = Counter("platform_shadow_agreed_rows", "Rows on which a shadow agreed with the live version", LABELS)
FAILED = Counter("platform_shadow_failures", "Mirrored requests a shadow could not answer or compare", LABELS)
LATENCY = Histogram("platform_shadow_latency_seconds", "A shadow's model time on one mirrored request", LABELS,
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
DROPPED = Counter("platform_shadow_dropped", "Live requests of a routed model neither counted nor mirrored: the "
                  "web process's hand-off queue was full, or the shadow queue's backlog past its bound", ["model"])
Pipe = redis.client.Pipeline


def arms_key(model: str) -> str:
    """The hash of a model's live counts per arm."""
    return f"experiment:{model}:arms"


def shadows_key(model: str) -> str:
    """The hash of a model's shadow comparisons per arm and shadow."""
    return f"experiment:{model}:shadows"


class Experiments:
    """Reads and writes the experiments' records in one Redis."""

    def __init__(self, client: redis.Redis):
        self.client = client

    def count(self, pipe: Pipe, model: str, version: int, status: int, seconds: float) -> None:
        """Count one live request of an arm: answered `ok` in `seconds`, or an error of the server's."""
        key, arm = arms_key(model), str(version)
        pipe.hincrby(key, f"{arm}|requests", 1)
        if status == 200:
            pipe.hincrby(key, f"{arm}|ok", 1)
            pipe.hincrbyfloat(key, f"{arm}|seconds", seconds)
        elif status >= 500:
            pipe.hincrby(key, f"{arm}|errors", 1)

    def dropped(self, pipe: Pipe, model: str, count: int) -> None:
        """Count requests of a model that were neither counted nor mirrored."""
        pipe.hincrby(arms_key(model), "dropped", count)

    def stash(self, pipe: Pipe, payload: bytes) -> str:
        """Keep a mirrored request's packed arrays for its shadow task; answer their key."""
        key = f"shadow:{uuid.uuid4()}"
        pipe.set(key, payload, ex=PAYLOAD_TTL_S)
        return key

    def take(self, key: str) -> bytes | None:
        """A mirrored request's packed arrays, removed as they are read (a task delivered twice finds none)."""
        return self.client.getdel(key)

    def compared(self, model: str, version: int, shadow: str, rows: int, agreed: int, seconds: float,
                 live_seconds: float) -> float:
        """Record a shadow's answer to one request: rows compared and agreed, both model times. Answer the
        agreement of every row compared so far, also set as the `platform_shadow_agreement_ratio` gauge."""
        key, field = shadows_key(model), f"{version}|{shadow}"
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, f"{field}|runs", 1)
            pipe.hincrby(key, f"{field}|rows", rows)
            pipe.hincrby(key, f"{field}|agreed", agreed)
            pipe.hincrbyfloat(key, f"{field}|seconds", seconds)
            pipe.hincrbyfloat(key, f"{field}|live_seconds", live_seconds)
            _, total, total_agreed, _, _ = pipe.execute()
        labels = (model, str(version), shadow)
        COMPARED.labels(*labels).inc(rows)
        AGREED.labels(*labels).inc(agreed)
        LATENCY.labels(*labels).observe(seconds)
        ratio = total_agreed / total if total else 0.0
        AGREEMENT.labels(*labels).set(ratio)
        return ratio

    def failed(self, model: str, version: int, shadow: str) -> None:
        """Record a mirrored request a shadow could not answer or compare."""
        self.client.hincrby(shadows_key(model), f"{version}|{shadow}|failed", 1)
        FAILED.labels(model, str(version), shadow).inc()

    def report(self, model: str, versions: Iterable[int] = ()) -> dict[str, Any]:
        """Per arm (version, as text; `versions` listed even with no record yet) its live counts and mean
        latency, and per shadow its agreement; with `dropped`, the requests neither counted nor mirrored."""
        with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(arms_key(model))
            pipe.hgetall(shadows_key(model))
            live, shadows = (_numbers(h) for h in pipe.execute())
        arms: dict[str, dict[str, Any]] = {str(v): _arm() for v in versions}
        for field, value in live.items():
            if field != "dropped":
                arm, what = field.split("|")
                arms.setdefault(arm, _arm())[what] = value
        for field, value in shadows.items():
            arm, shadow, what = field.split("|")
            arms.setdefault(arm, _arm())["shadows"].setdefault(shadow, _shadow())[what] = value
        ordered = sorted(arms.items(), key=lambda item: int(item[0]))
        return {"arms": {arm: _shaped(record) for arm, record in ordered}, "dropped": int(live.get("dropped", 0))}


def _numbers(fields: dict[bytes, bytes]) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in fields.items()}


def _arm() -> dict[str, Any]:
    return {"requests": 0, "ok": 0, "errors": 0, "seconds": 0.0, "shadows": {}}


def _shadow() -> dict[str, Any]:
    return {"runs": 0, "rows": 0, "agreed": 0, "failed": 0, "seconds": 0.0, "live_seconds": 0.0}


def _shaped(arm: dict[str, Any]) -> dict[str, Any]:
    """An arm's record as the API shows it: counts as integers, mean latencies in milliseconds."""
    shadows = {name: _shaped_shadow(s) for name, s in sorted(arm["shadows"].items())}
    return {"requests": int(arm["requests"]), "ok": int(arm["ok"]), "errors": int(arm["errors"]),
            "mean_latency_ms": _mean_ms(arm["seconds"], arm["ok"]), "shadows": shadows}


def _shaped_shadow(s: dict[str, Any]) -> dict[str, Any]:
    return {"requests": int(s["runs"]), "failed": int(s["failed"]), "rows": int(s["rows"]),
            "agreed": int(s["agreed"]), "agreement": s["agreed"] / s["rows"] if s["rows"] else None,
            "mean_latency_ms": _mean_ms(s["seconds"], s["runs"]),
            "live_mean_latency_ms": _mean_ms(s["live_seconds"], s["runs"])}


def _mean_ms(seconds: float, count: float) -> float | None:
    return round(1000 * seconds / count, 4) if count else None
