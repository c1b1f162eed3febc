"""Asynchronous benchmark: our job pipeline, batching on and off, against the book's SET + LPUSH / BRPOP design.

One run measures, in interleaved rounds on a fresh Redis database, single-row jobs for the digits-light model
(one 64-float row of scikit-learn's digits per job): ours with a real Celery worker process (`-c 2`) and
batching on, the same with batching off (one Celery task per job), and the reference
(bench/brpop_reference.py, two worker processes). For each: throughput (a burst of jobs submitted as fast as
possible, jobs/s from the first submit to the last result), what the workers alone sustain (the same burst
queued while they are paused, timed from their resumption), and latency under light load (one job at a time
at a low rate, p50/p99 from submit to result). Ours is also driven through the Flask `:submit` view with the
test client, to show what the view adds per job. Every design's answers are checked against onnxruntime's
before anything is timed.

Run it as a module from the repository root (`python -m bench.jobs --help`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import redis
from sklearn.datasets import load_digits

from bench import designs, job_report, report, workers
from bench.designs import DESIGNS, Design, OursClient
from bench.job_load import Submit, backlog, light_load, throughput, wait
from bench.redis_usage import CountedPolls, breakdown, per_job, usage
from bench.servers import ROOT

CHECKED_ROWS = 10
Measured = tuple[dict[str, dict[str, Any]], dict[str, Any]]


def check(client: designs.Client, submit: Submit, rows: np.ndarray, title: str) -> None:
    """Make sure a design answers onnxruntime's labels and probabilities, so no broken pipeline is timed."""
    labels, probabilities = designs.expected(rows)
    ids = [submit(row) for row in rows]
    wait(client.finished, ids, timeout_s=60)
    for i, job_id in enumerate(ids):
        label, got = client.answer(job_id)
        if label != labels[i] or not np.allclose(got, probabilities[i], atol=1e-5):
            raise SystemExit(f"{title}: row {i} answered label {label} {got}, onnxruntime {labels[i]} "
                             f"{probabilities[i]}")


def segment(design: Design, args: argparse.Namespace, rows: np.ndarray, log_dir: Path) -> Measured:
    """Start one design's workers, check its answers, then measure its points; answer their figures and
    the Redis commands per job of each burst."""
    found: dict[str, dict[str, float]] = {}
    commands: dict[str, dict[str, float]] = {}
    with designs.running(design, args.redis_url, log_dir) as client:
        ways = {design.name: client.submit}
        if isinstance(client, OursClient) and args.web:
            ways[f"{design.name}-web"] = client.submit_web
        for submit in ways.values():
            check(client, submit, rows[:CHECKED_ROWS], design.title)
        throughput(client.submit, client.finished, rows, args.warmup)
        for point, submit in ways.items():
            found[point], commands[point] = burst(point, client, submit, rows, args)
        rate = backlog(client.submit, client.finished, rows, args.jobs, lambda: workers.paused(client.workers))
        print(f"  {design.name:<8} {rate:>7.0f} jobs/s from a backlog of {args.jobs} (workers alone)", flush=True)
        found[design.name] |= light(design.name, client, rows, args) | {"backlog_jobs_per_s": rate}
    return found, commands


def burst(point: str, client: designs.Client, submit: Submit, rows: np.ndarray,
          args: argparse.Namespace) -> tuple[dict[str, float], dict[str, float]]:
    """One throughput burst: its figures with Redis's cost per job, and the commands per job."""
    stats = redis.Redis.from_url(args.redis_url)
    polls, before = CountedPolls(client.finished), usage(stats)
    done = throughput(submit, polls, rows, args.jobs)
    after = usage(stats)
    stats.close()
    figures = asdict(done) | per_job(before, after, args.jobs, polls.polled)
    print(f"  {point:<8} {done.jobs_per_s:>7.0f} jobs/s  submit {done.submit_us:>5.0f} us/job  "
          f"drain {done.drain_ms:>5.0f} ms  Redis {figures['redis_commands']:.1f} commands/job, "
          f"{figures['redis_cpu_us']:.0f} us CPU/job", flush=True)
    return figures, breakdown(before, after, args.jobs)


def light(point: str, client: designs.Client, rows: np.ndarray, args: argparse.Namespace) -> dict[str, float]:
    """The light-load latency figures."""
    found = light_load(client.submit, client.finished, rows, args.rate, args.light_seconds)
    print(f"  {point:<8} light load {args.rate:g}/s: p50 {found.p50_ms:.2f} ms  p99 {found.p99_ms:.2f} ms",
          flush=True)
    return {"p50_ms": found.p50_ms, "p99_ms": found.p99_ms, "light_jobs": found.requests,
            "light_lost": found.errors}


def measure(args: argparse.Namespace, rows: np.ndarray, log_dir: Path) -> Measured:
    """Measure every design once per round, rotating their order from round to round."""
    samples: job_report.Samples = {}
    commands: dict[str, list] = {}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        shift = round_ % len(DESIGNS)
        for design in DESIGNS[shift:] + DESIGNS[:shift]:
            found, used = segment(design, args, rows, log_dir)
            for point, figures in found.items():
                samples.setdefault(point, []).append(figures)
                commands.setdefault(point, []).append(used[point])
    return samples, commands


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per throughput burst (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, for medians (default 3)")
    parser.add_argument("--rate", type=float, default=50.0, help="light-load jobs per second (default 50)")
    parser.add_argument("--light-seconds", type=float, default=4.0, help="light-load duration (default 4 s)")
    parser.add_argument("--warmup", type=int, default=200, help="jobs run before timing, per design (default 200)")
    parser.add_argument("--no-web", dest="web", action="store_false",
                        help="skip the bursts through the Flask :submit view")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/10",
                        help="a Redis database the run may flush (default redis://127.0.0.1:6379/10)")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1 or args.rate <= 0 or args.light_seconds <= 0 or args.warmup < 0:
        parser.error("--jobs, --rounds, --rate and --light-seconds must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table, ratios and verdicts, and write the JSON results."""
    args = parse_args(argv)
    when = datetime.datetime.now().astimezone()
    rows = load_digits().data.astype(np.float32)
    print(f"{args.rounds} rounds; {args.jobs} jobs per burst; light load {args.rate:g}/s for "
          f"{args.light_seconds:g} s; Redis {args.redis_url} (flushed); {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as scratch:
        samples, commands = measure(args, rows, Path(scratch))
    summary, found = job_report.medians(samples), job_report.ratios(samples)
    table = job_report.rows(summary, found)
    print(f"\nmedians of {args.rounds} rounds, {args.jobs} jobs per burst\n")
    print(report.text_table(table, job_report.HEADER) + "\n")
    print("\n".join(job_report.verdicts(summary, found) + job_report.warnings(samples)) + "\n")
    print(report.markdown_table(table, job_report.HEADER) + "\n")
    document = {
        "date": when.isoformat(timespec="seconds"), "settings": vars(args) | {"model": designs.MODEL},
        "environment": job_report.environment(args.redis_url), "summary": summary, "ratios": found,
        "samples": samples, "redis_commands_per_job": commands,
    }
    print(f"results written to {report.save(document, when, 'jobs').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
