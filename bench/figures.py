"""The figures drawn from the rounds: medians, ratios to the baseline, overheads and distances to the floor.

Comparisons between two points are taken round by round and their median reported, so that a machine drifting
between rounds weighs on both sides of each comparison alike.
"""

from __future__ import annotations

import statistics

from bench.sample import Sample
from bench.targets import BASELINE, FLOOR, OURS, PREDICTING, key

Figures = dict[str, dict[str, float]]


def medians(samples: dict[str, list[Sample]]) -> Figures:
    """The median of each figure of each point across rounds, plus the errors summed."""
    return {
        name: {
            "rps": statistics.median(s.rps for s in runs),
            "p50_ms": statistics.median(s.p50_ms for s in runs),
            "p99_ms": statistics.median(s.p99_ms for s in runs),
            "errors": sum(s.errors for s in runs),
        }
        for name, runs in samples.items()
    }


def ratios(samples: dict[str, list[Sample]], concurrencies: list[int]) -> Figures:
    """Each of our routes against the baseline, as the median of the ratios taken round by round."""
    out = {}
    for target in OURS:
        for c in concurrencies:
            ours, base = samples[key(target.name, c)], samples[key(BASELINE, c)]
            out[key(target.name, c)] = {
                "throughput": statistics.median(o.rps / b.rps for o, b in zip(ours, base, strict=True)),
                "p99": statistics.median(o.p99_ms / b.p99_ms for o, b in zip(ours, base, strict=True)),
            }
    return out


def overheads(summary: Figures) -> Figures:
    """What each server adds to a bare onnxruntime call, at p50 and p99, in milliseconds."""
    bare = summary["inprocess"]
    return {
        name: {"p50_ms": point["p50_ms"] - bare["p50_ms"], "p99_ms": point["p99_ms"] - bare["p99_ms"]}
        for name, point in summary.items() if name != "inprocess"
    }


def above_floor(samples: dict[str, list[Sample]], concurrencies: list[int]) -> dict[str, float]:
    """Each predicting route's p50 minus the loopback floor's, in ms: its cost beyond the round trip."""
    out = {}
    for target in PREDICTING:
        for c in concurrencies:
            point, floor = samples[key(target.name, c)], samples[key(FLOOR, c)]
            out[key(target.name, c)] = statistics.median(
                p.p50_ms - f.p50_ms for p, f in zip(point, floor, strict=True))
    return out


def floor_shares(samples: dict[str, list[Sample]], concurrencies: list[int]) -> dict[str, float]:
    """At each concurrency, the loopback floor's p50 as a fraction of the baseline's."""
    return {
        key(FLOOR, c): statistics.median(
            f.p50_ms / b.p50_ms
            for f, b in zip(samples[key(FLOOR, c)], samples[key(BASELINE, c)], strict=True))
        for c in concurrencies
    }
