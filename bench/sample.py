"""One measured point's figures, and how a list of latencies is summarised into them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """One measured point: throughput and latency percentiles over `requests` completed calls."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int = 0


def summarise(latencies_ns: list[int], elapsed_s: float, errors: int = 0) -> Sample:
    """Throughput and nearest-rank p50/p99 of a list of latencies."""
    ordered = sorted(latencies_ns)
    if not ordered:
        return Sample(0.0, float("nan"), float("nan"), 0, errors)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return Sample(len(ordered) / elapsed_s, rank(0.50), rank(0.99), len(ordered), errors)
