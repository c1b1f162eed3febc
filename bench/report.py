"""What a run prints and writes: the points' table, the comparisons against their targets, the JSON file."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from bench.figures import Figures
from bench.targets import CONTRACT_CONCURRENCY, Comparison, Target, key

RESULTS = Path(__file__).resolve().parent / "results"
POINT_HEADER = ["server", "c", "req/s", "p50 ms", "p99 ms", "p50 above floor ms"]
RATIO_HEADER = ["comparison", "c", "req/s ratio", "rounds' range", "per round", "p99 ratio", "target", "verdict"]


def rows(summary: Figures, gaps: dict[str, float], targets: tuple[Target, ...],
         concurrencies: list[int]) -> list[list[str]]:
    """The points' rows: server, concurrency, req/s, p50, p99, p50 above the floor."""
    bare = summary["inprocess"]
    table = [["onnxruntime in-process (1 thread)", "-", f"{bare['rps']:.0f} calls/s",
              f"{bare['p50_ms']:.4f}", f"{bare['p99_ms']:.4f}", ""]]
    for c in concurrencies:
        for target in targets:
            point, gap = summary[key(target.name, c)], gaps.get(key(target.name, c))
            table.append([target.title, str(c), f"{point['rps']:.0f}", f"{point['p50_ms']:.2f}",
                          f"{point['p99_ms']:.2f}", "" if gap is None else f"{gap:+.3f}"])
    return table


def ratio_rows(found: Figures, comparisons: tuple[Comparison, ...], concurrencies: list[int]) -> list[list[str]]:
    """The comparisons' rows: the ratios, their target and, at the contract's concurrency, the verdict."""
    table = []
    for comparison in comparisons:
        for c in concurrencies:
            ratio = found[key(comparison.name, c)]
            rounds = " ".join(f"{r:.2f}" for r in ratio["throughput_rounds"])
            table.append([comparison.title, str(c), f"{ratio['throughput']:.2f}x",
                          f"{ratio['throughput_min']:.2f}-{ratio['throughput_max']:.2f}x", rounds,
                          f"{ratio['p99']:.2f}x", target_text(comparison),
                          verdict(comparison, ratio) if c == CONTRACT_CONCURRENCY else ""])
    return table


def target_text(comparison: Comparison) -> str:
    """The targets a comparison is held to, e.g. `req/s >= 1.00x, p99 <= 1.00x`."""
    parts = []
    if comparison.min_throughput is not None:
        parts.append(f"req/s >= {comparison.min_throughput:.2f}x")
    if comparison.max_p99 is not None:
        parts.append(f"p99 <= {comparison.max_p99:.2f}x")
    return ", ".join(parts) or "(none: for the record)"


def verdict(comparison: Comparison, ratio: dict[str, float]) -> str:
    """`met`, or what fell short; empty for a comparison without targets."""
    short = []
    if comparison.min_throughput is not None and ratio["throughput"] < comparison.min_throughput:
        short.append("req/s")
    if comparison.max_p99 is not None and ratio["p99"] > comparison.max_p99:
        short.append("p99")
    if comparison.min_throughput is None and comparison.max_p99 is None:
        return ""
    return f"SHORT ({', '.join(short)})" if short else "met"


def text_table(table: list[list[str]], header: list[str]) -> str:
    """Align the rows in columns for a terminal."""
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w)
                               in enumerate(zip(row, widths, strict=True))) for row in [header, *table])


def markdown_table(table: list[list[str]], header: list[str]) -> str:
    """The same rows as a Markdown table, ready to paste into the docs."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table])


def warnings(summary: Figures) -> list[str]:
    """Points whose figures cannot be trusted because some requests failed."""
    return [f"WARNING: {name} had {int(point['errors'])} failed requests (non-2xx or socket errors)"
            for name, point in summary.items() if point.get("errors")]


def environment(generator: str) -> dict[str, object]:
    """What the figures were measured on."""
    versions = {}
    for package in ("onnxruntime", "gunicorn", "flask", "fastapi", "uvicorn", "uvicorn-worker", "uvloop", "httptools",
                    "numpy", "redis", "limits"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return {"generator": generator, "cores": os.cpu_count(), "python": platform.python_version(),
            "machine": platform.machine(), "load_average": os.getloadavg(), "versions": versions}


def save(document: dict, when: datetime.datetime, prefix: str = "http") -> Path:
    """Write the results as JSON to bench/results/<prefix>-<date>[-n].json, never overwriting; answer the path."""
    RESULTS.mkdir(exist_ok=True)
    path, n = RESULTS / f"{prefix}-{when:%Y-%m-%d}.json", 1
    while path.exists():
        n += 1
        path = RESULTS / f"{prefix}-{when:%Y-%m-%d}-{n}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
