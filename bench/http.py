"""Synchronous HTTP benchmark: our web process against FastAPI, bare onnxruntime and a no-op floor.

One run measures, in interleaved rounds so that a noisy shared machine weighs on all alike:
in-process onnxruntime on the iris model (one row, one intra-op thread); a loopback floor (bench/noop_app.py,
gunicorn with our worker class and count, an app that does no work); the FastAPI baseline
(bench/fastapi_baseline.py, gunicorn with 2 uvicorn workers, as ours); and our platform (gunicorn with
deploy/gunicorn.conf.py, 2 workers) on its TensorFlow Serving `:predict` and V2 `/infer` routes.
Each point is single-row requests over keep-alive connections on loopback, at each concurrency.

Run it as a module from the repository root (`python -m bench.http --help`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench import figures, report
from bench.inprocess import InProcess
from bench.load import Generator, pick_generator
from bench.sample import Sample
from bench.servers import ROOT, WORKERS, check_answers, running_servers
from bench.targets import TARGETS, key


def measure(args: argparse.Namespace, generate: Generator, urls: dict[str, str],
            inprocess: InProcess) -> dict[str, list[Sample]]:
    """Run every point once per round, rotating the order of the servers from round to round."""
    samples: dict[str, list[Sample]] = {}
    for target in TARGETS:
        if args.warmup:
            generate(urls[target.server] + target.path, target.body, max(args.concurrency), args.warmup)
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        sample = inprocess.measure(args.duration)
        samples.setdefault("inprocess", []).append(sample)
        print(f"  {'onnxruntime in-process':<28} {sample.rps:>10.0f} calls/s", flush=True)
        order = TARGETS[round_ % len(TARGETS):] + TARGETS[:round_ % len(TARGETS)]
        for concurrency in args.concurrency:
            for target in order:
                sample = generate(urls[target.server] + target.path, target.body, concurrency, args.duration)
                samples.setdefault(key(target.name, concurrency), []).append(sample)
                print(f"  {target.title:<28} c{concurrency:<3} {sample.rps:>8.0f} req/s  "
                      f"p50 {sample.p50_ms:.2f} ms  p99 {sample.p99_ms:.2f} ms"
                      + (f"  {sample.errors} errors" if sample.errors else ""), flush=True)
    return samples


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="whole seconds per point (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, for medians (default 3)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 16],
                        help="comma-separated connection counts (default 1,16)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per route (default 1)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk, the Python one, or (default) wrk above one connection and the "
                             "Python one at one (it times by the monotonic clock)")
    parser.add_argument("--wrk-threads", type=int, default=1,
                        help="wrk threads; the generator shares the cores with the servers (default 1)")
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.rounds < 1 or args.warmup < 0:
        parser.error("--duration must be positive, --rounds at least 1 and --warmup not negative")
    return args


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("give positive integers separated by commas, e.g. 1,16")
    return values


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables and write the JSON results."""
    args = parse_args(argv)
    when = datetime.datetime.now().astimezone()
    inprocess = InProcess()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        generate, generator = pick_generator(args, Path(scratch))
        print(f"generator: {generator}; {args.rounds} rounds x {args.duration} s per point; "
              f"concurrency {args.concurrency}; {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        with running_servers(Path(scratch)) as urls:
            check_answers(urls, inprocess.probabilities())
            samples = measure(args, generate, urls, inprocess)
    summary = figures.medians(samples)
    found = figures.ratios(samples, args.concurrency)
    overhead = figures.overheads(summary)
    gaps = figures.above_floor(samples, args.concurrency)
    shares = figures.floor_shares(samples, args.concurrency)
    table = report.rows(summary, found, gaps, args.concurrency)
    print(f"\nmedians of {args.rounds} rounds x {args.duration} s, generator {generator}\n")
    print(report.text_table(table) + "\n")
    print("\n".join(report.verdicts(found, overhead) + report.warnings(summary)) + "\n")
    print("\n".join(report.floor_lines(summary, gaps, shares, args.concurrency)) + "\n")
    print(report.markdown_table(table) + "\n")
    document = {
        "date": when.isoformat(timespec="seconds"), "settings": {**vars(args), "workers": WORKERS},
        "environment": report.environment(generator),
        "summary": summary, "ratios": found, "overhead": overhead,
        "floor": {"p50_above_ms": gaps, "share_of_baseline_p50": shares},
        "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
    }
    print(f"results written to {report.save(document, when).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
