"""What a run prints and writes: the result table, the verdicts, the floor lines and the JSON file."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path

from bench.figures import Figures
from bench.targets import BASELINE, FLOOR, PREDICTING, TARGETS, Target, key

RESULTS = Path(__file__).resolve().parent / "results"
HEADER = ["server", "c", "req/s", "p50 ms", "p99 ms", "req/s vs FastAPI", "p99 vs FastAPI",
          "p50 above floor ms"]
THROUGHPUT_TARGET = 1.25
P99_TARGET = 1.0


def rows(summary: Figures, found: Figures, gaps: dict[str, float],
         concurrencies: list[int]) -> list[list[str]]:
    """The table's rows: server, concurrency, req/s, p50, p99, ratios to the baseline, p50 above the floor."""
    bare = summary["inprocess"]
    table = [["onnxruntime in-process (1 thread)", "-", f"{bare['rps']:.0f} calls/s",
              f"{bare['p50_ms']:.4f}", f"{bare['p99_ms']:.4f}", "", "", ""]]
    for c in concurrencies:
        for target in TARGETS:
            point = summary[key(target.name, c)]
            gap = gaps.get(key(target.name, c))
            table.append([
                target.title, str(c), f"{point['rps']:.0f}", f"{point['p50_ms']:.2f}",
                f"{point['p99_ms']:.2f}",
                *ratio_cells(target, c, found), "" if gap is None else f"{gap:+.3f}",
            ])
    return table


def ratio_cells(target: Target, concurrency: int, found: Figures) -> list[str]:
    """A row's two ratios to the baseline: 1.00x for the baseline itself, none for the floor."""
    if target.name == FLOOR:
        return ["", ""]
    ratio = found.get(key(target.name, concurrency), {"throughput": 1.0, "p99": 1.0})
    return [f"{ratio['throughput']:.2f}x", f"{ratio['p99']:.2f}x"]


def text_table(table: list[list[str]], header: list[str] = HEADER) -> str:
    """Align the rows in columns for a terminal."""
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w)
                               in enumerate(zip(row, widths, strict=True))) for row in [header, *table])


def markdown_table(table: list[list[str]], header: list[str] = HEADER) -> str:
    """The same rows as a Markdown table, ready to paste into the docs."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table])


def verdicts(found: Figures, overhead: Figures) -> list[str]:
    """One line per point: the ratios against their targets, and the overhead over bare onnxruntime."""
    lines = []
    for name, ratio in found.items():
        fast = "met" if ratio["throughput"] >= THROUGHPUT_TARGET else "SHORT"
        tail = "met" if ratio["p99"] <= P99_TARGET else "SHORT"
        over = overhead[name]
        lines.append(f"{name:<12} throughput {ratio['throughput']:.2f}x FastAPI "
                     f"(target >= {THROUGHPUT_TARGET:.2f}x: {fast}); p99 {ratio['p99']:.2f}x FastAPI's "
                     f"(target <= {P99_TARGET:.2f}x: {tail}); over in-process "
                     f"onnxruntime +{over['p50_ms']:.3f} ms p50, +{over['p99_ms']:.3f} ms p99")
    base = {n: o for n, o in overhead.items() if n.startswith(BASELINE + "@")}
    lines += [f"{name:<12} over in-process onnxruntime +{o['p50_ms']:.3f} ms p50, +{o['p99_ms']:.3f} ms p99"
              for name, o in base.items()]
    return lines


def floor_lines(summary: Figures, gaps: dict[str, float], shares: dict[str, float],
                concurrencies: list[int]) -> list[str]:
    """The floor's p50 and each route's p50 above it per concurrency; the floor's share of FastAPI's p50."""
    lines = []
    for c in concurrencies:
        above = ", ".join(f"{t.name} {gaps[key(t.name, c)]:+.3f} ms" for t in PREDICTING)
        lines.append(f"{key(FLOOR, c):<12} p50 {summary[key(FLOOR, c)]['p50_ms']:.3f} ms; "
                     f"p50 above the floor: {above}")
    c = min(concurrencies)
    floor, base = summary[key(FLOOR, c)]["p50_ms"], summary[key(BASELINE, c)]["p50_ms"]
    connections = "one connection" if c == 1 else f"{c} connections"
    lines.append(f"at {connections} the loopback floor is already {shares[key(FLOOR, c)]:.0%} of "
                 f"FastAPI's p50 ({floor:.3f} of {base:.3f} ms): the HTTP round trip through our web "
                 "worker (uvicorn's protocol under gunicorn), with no work")
    return lines


def warnings(summary: Figures) -> list[str]:
    """Points whose figures cannot be trusted because some requests failed."""
    return [f"WARNING: {name} had {int(point['errors'])} failed requests (non-2xx or socket errors)"
            for name, point in summary.items() if point.get("errors")]


def environment(generator: str) -> dict[str, object]:
    """What the figures were measured on."""
    versions = {}
    for package in ("onnxruntime", "gunicorn", "flask", "fastapi", "uvicorn", "uvloop", "httptools", "numpy"):
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
