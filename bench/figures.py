"""The figures drawn from the rounds: medians, the comparisons' ratios, overheads and distances to the floor.

Comparisons between two points are taken round by round and their median reported, so that a machine drifting
between rounds weighs on both sides of each comparison alike.
"""

from __future__ import annotations

import statistics

from bench.sample import Sample
from bench.targets import Comparison, Target, key

Figures = dict[str, dict[str, float]]
Samples = dict[str, list[Sample]]


def medians(samples: Samples) -> Figures:
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


def ratios(samples: Samples, comparisons: tuple[Comparison, ...], concurrencies: list[int]) -> Figures:
    """Each comparison at each concurrency: the medians of the round-by-round throughput and p99 ratios, the
    lowest and highest throughput ratio, and every round's, in the order they were measured."""
    out = {}
    for comparison in comparisons:
        for c in concurrencies:
            pairs = list(zip(samples[key(comparison.ours, c)], samples[key(comparison.reference, c)], strict=True))
            throughput = [o.rps / r.rps for o, r in pairs]
            out[key(comparison.name, c)] = {
                "throughput": statistics.median(throughput),
                "p99": statistics.median(o.p99_ms / r.p99_ms for o, r in pairs),
                "throughput_min": min(throughput),
                "throughput_max": max(throughput),
                "throughput_rounds": throughput,
            }
    return out


def overheads(summary: Figures) -> Figures:
    """What each server adds to a bare onnxruntime call, at p50 and p99, in milliseconds."""
    bare = summary["inprocess"]
    return {
        name: {"p50_ms": point["p50_ms"] - bare["p50_ms"], "p99_ms": point["p99_ms"] - bare["p99_ms"]}
        for name, point in summary.items() if name != "inprocess"
    }


def above_floor(samples: Samples, targets: tuple[Target, ...], concurrencies: list[int]) -> dict[str, float]:
    """Each predicting route's p50 minus the loopback floor's, in ms: its cost beyond the round trip (none when
    the floor was not measured)."""
    if not any(t.answer == "floor" for t in targets):
        return {}
    out = {}
    for target in targets:
        for c in concurrencies:
            if target.answer != "floor":
                point, floor = samples[key(target.name, c)], samples[key("floor", c)]
                out[key(target.name, c)] = statistics.median(
                    p.p50_ms - f.p50_ms for p, f in zip(point, floor, strict=True))
    return out
