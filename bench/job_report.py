"""What the asynchronous benchmark prints and records: medians, ratios, the table and the verdicts.

A run's samples map each point (`on`, `on-web`, `off`, `off-web`, `brpop`) to one dict of figures per round.
Comparisons are taken round by round and their median reported, so a drifting machine weighs on both sides.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from importlib import metadata

import redis

from bench.designs import DESIGNS

Figures = dict[str, dict[str, float]]
Samples = dict[str, list[dict[str, float]]]
REFERENCE = "brpop"
HEADER = ["design", "jobs/s", "jobs/s vs reference", "submit us/job", "drain ms", "Redis cmds/job",
          "workers alone jobs/s", "light p50 ms", "light p99 ms"]
ON_VS_OFF_TARGET = 3.0
ON_VS_REFERENCE_TARGET = 1.0
P50_TARGET_MS = 20.0
WEB = " via Flask test client (:submit view)"


def medians(samples: Samples) -> Figures:
    """The median of each figure of each point across rounds."""
    return {point: {name: statistics.median(run[name] for run in runs) for name in runs[0]}
            for point, runs in samples.items()}


def ratios(samples: Samples) -> dict[str, float]:
    """Median round-by-round throughput ratios: each point to the reference, batching on to off, and the
    workers alone with batching on to the reference's."""
    def ratio(top: str, bottom: str, figure: str = "jobs_per_s") -> float:
        pairs = zip(samples[top], samples[bottom], strict=True)
        return statistics.median(a[figure] / b[figure] for a, b in pairs)

    found = {f"{point}/{REFERENCE}": ratio(point, REFERENCE) for point in samples if point != REFERENCE}
    found["on/off"] = ratio("on", "off")
    found[f"backlog on/{REFERENCE}"] = ratio("on", REFERENCE, "backlog_jobs_per_s")
    if "on-web" in samples:
        found["on-web/off-web"] = ratio("on-web", "off-web")
    return found


def rows(summary: Figures, found: dict[str, float]) -> list[list[str]]:
    """The table's rows, one per point, in the designs' order, each followed by its web variant."""
    table = []
    for design in DESIGNS:
        for point, title in ((design.name, design.title), (f"{design.name}-web", design.title + WEB)):
            if point not in summary:
                continue
            figures, vs = summary[point], found.get(f"{point}/{REFERENCE}", 1.0)
            alone = [f"{figures[name]:.{digits}f}" if name in figures else ""
                     for name, digits in (("backlog_jobs_per_s", 0), ("p50_ms", 2), ("p99_ms", 2))]
            table.append([title, f"{figures['jobs_per_s']:.0f}", f"{vs:.2f}x", f"{figures['submit_us']:.0f}",
                          f"{figures['drain_ms']:.0f}", f"{figures['redis_commands']:.1f}", *alone])
    return table


def verdicts(summary: Figures, found: dict[str, float]) -> list[str]:
    """The three targets: batching on vs off, on vs the reference, light-load p50 with batching on."""
    def verdict(met: bool) -> str:
        return "met" if met else "SHORT"

    on_off, on_ref, p50 = found["on/off"], found[f"on/{REFERENCE}"], summary["on"]["p50_ms"]
    lines = [
        f"throughput, batching on vs off: {on_off:.2f}x (target >= {ON_VS_OFF_TARGET:.1f}x: "
        f"{verdict(on_off >= ON_VS_OFF_TARGET)})",
        f"throughput, batching on vs the reference: {on_ref:.2f}x (target >= {ON_VS_REFERENCE_TARGET:.1f}x: "
        f"{verdict(on_ref >= ON_VS_REFERENCE_TARGET)})",
        f"light-load p50, batching on: {p50:.2f} ms (target <= {P50_TARGET_MS:.0f} ms: "
        f"{verdict(p50 <= P50_TARGET_MS)})",
    ]
    alone = ", ".join(f"{point} {summary[point]['backlog_jobs_per_s']:.0f}" for point in ("on", "off", REFERENCE))
    lines.append(f"workers alone, from a backlog (jobs/s): {alone}; batching on vs the reference "
                 f"{found['backlog on/' + REFERENCE]:.2f}x")
    if "on-web/off-web" in found:
        lines.append(f"through the :submit view: batching on vs off {found['on-web/off-web']:.2f}x, "
                     f"on vs the reference {found[f'on-web/{REFERENCE}']:.2f}x")
    return lines


def warnings(samples: Samples) -> list[str]:
    """Light-load jobs that never ended: their figures cannot be trusted."""
    return [f"WARNING: {point} lost {int(sum(r['light_lost'] for r in runs))} light-load jobs"
            for point, runs in samples.items() if any(r.get("light_lost") for r in runs)]


def environment(url: str) -> dict[str, object]:
    """What the figures were measured on."""
    versions = {}
    for package in ("celery", "kombu", "redis", "onnxruntime", "flask", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    client = redis.Redis.from_url(url)
    versions["redis-server"] = client.info("server")["redis_version"]
    client.close()
    return {"cores": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "load_average": os.getloadavg(), "versions": versions}
