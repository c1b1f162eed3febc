"""Synchronous HTTP benchmark: our web process against FastAPI, MLServer, the build before it and a no-op floor.

One run measures, in interleaved rounds so that a noisy shared machine weighs on all alike, single-row iris
predictions over keep-alive connections on loopback, at each concurrency: in-process onnxruntime (one intra-op
thread); a loopback floor (bench/noop_app.py on our worker class); the FastAPI baseline
(bench/fastapi_baseline.py); MLServer with an onnxruntime runtime, in its own environment; our platform
(deploy/gunicorn.conf.py) on `:predict` and V2 `/infer` as shipped, with everything off (API keys, metrics),
with everything on (API keys, metrics, a prediction log of 1% of iris predictions), and as shipped on h11; and
the build before the web tier's redesign, checked out under var/. Every server has 2 workers.

Run it as a module from the repository root (`python -m bench.http --help`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench import builds, evidence, figures, mlserver, report
from bench.inprocess import InProcess
from bench.load import Generator, pick_generator
from bench.sample import Sample
from bench.servers import ROOT, WORKERS, Running, check_answers, running_servers
from bench.targets import OLD_BUILD, SERVERS, Comparison, Target, chosen, key


def measure(args: argparse.Namespace, generate: Generator, servers: dict[str, Running],
            targets: tuple[Target, ...], inprocess: InProcess) -> dict[str, list[Sample]]:
    """Run every point once per round, rotating the order of the targets from round to round."""
    samples: dict[str, list[Sample]] = {}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        sample = inprocess.measure(args.duration)
        samples.setdefault("inprocess", []).append(sample)
        print(f"  {'onnxruntime in-process':<34} {sample.rps:>10.0f} calls/s", flush=True)
        shift = round_ % len(targets)
        for concurrency in args.concurrency:
            for target in targets[shift:] + targets[:shift]:
                running = servers[target.server]
                sample = generate(running.url + target.path, target.body, running.headers, concurrency, args.duration)
                samples.setdefault(key(target.name, concurrency), []).append(sample)
                print(f"  {target.title:<34} c{concurrency:<3} {sample.rps:>8.0f} req/s  "
                      f"p50 {sample.p50_ms:.2f} ms  p99 {sample.p99_ms:.2f} ms"
                      + (f"  {sample.errors} errors" if sample.errors else ""), flush=True)
    return samples


def warm_up(args: argparse.Namespace, generate: Generator, servers: dict[str, Running],
            targets: tuple[Target, ...]) -> None:
    """Load every route for `--warmup` seconds at the highest concurrency, untimed."""
    for target in targets if args.warmup else ():
        running = servers[target.server]
        generate(running.url + target.path, target.body, running.headers, max(args.concurrency), args.warmup)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="whole seconds per point (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, for medians (default 3)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 16],
                        help="comma-separated connection counts (default 1,16)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per route (default 1)")
    parser.add_argument("--skip", type=_servers, default=set(),
                        help=f"comma-separated servers to leave out, of {', '.join(SERVERS)}")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6",
                        help="Redis for our servers (the `full` one counts its keys' rate and logs predictions there; "
                             "nothing is flushed)")
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


def _servers(text: str) -> set[str]:
    names = {v.strip() for v in text.split(",") if v.strip()}
    if names - set(SERVERS):
        raise argparse.ArgumentTypeError(f"unknown servers {sorted(names - set(SERVERS))}; known: {', '.join(SERVERS)}")
    return names


def print_figures(args: argparse.Namespace, generator: str, document: dict, targets: tuple[Target, ...],
                  comparisons: tuple[Comparison, ...]) -> None:
    """The points' table, the comparisons' table with their verdicts, and both again in Markdown."""
    points = report.rows(document["summary"], document["floor_p50_above_ms"], targets, args.concurrency)
    ratios = report.ratio_rows(document["ratios"], comparisons, args.concurrency)
    print(f"\nmedians of {args.rounds} rounds x {args.duration} s, generator {generator}\n")
    print(report.text_table(points, report.POINT_HEADER) + "\n")
    print(report.text_table(ratios, report.RATIO_HEADER) + "\n")
    print("\n".join(report.warnings(document["summary"]) + evidence.lines(document["observed"])) + "\n")
    print(report.markdown_table(points, report.POINT_HEADER) + "\n")
    print(report.markdown_table(ratios, report.RATIO_HEADER) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables and write the JSON results."""
    args = parse_args(argv)
    targets, comparisons = chosen(args.skip)
    when, build = datetime.datetime.now().astimezone(), builds.current()
    inprocess = InProcess()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        generate, generator = pick_generator(args, Path(scratch))
        print(f"generator: {generator}; {args.rounds} rounds x {args.duration} s per point; "
              f"concurrency {args.concurrency}; {os.cpu_count()} cores, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        names = list(dict.fromkeys(t.server for t in targets))
        with running_servers(names, targets, Path(scratch), args.redis_url) as servers:
            check_answers(servers, targets, inprocess.probabilities())
            evidence.check_metrics(servers)
            warm_up(args, generate, servers, targets)
            before = evidence.counts(servers, args.redis_url)
            samples = measure(args, generate, servers, targets, inprocess)
            observed = evidence.observed(servers, samples, targets, before, args.redis_url)
    summary = figures.medians(samples)
    document = {
        "date": when.isoformat(timespec="seconds"),
        "settings": {**vars(args), "skip": sorted(args.skip), "workers": WORKERS, "old_build": OLD_BUILD,
                     "mlserver": list(mlserver.PINS)},
        "environment": {**report.environment(generator), "build": build}, "summary": summary,
        "ratios": figures.ratios(samples, comparisons, args.concurrency),
        "overhead": figures.overheads(summary),
        "floor_p50_above_ms": figures.above_floor(samples, targets, args.concurrency), "observed": observed,
        "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
    }
    print_figures(args, generator, document, targets, comparisons)
    print(f"results written to {report.save(document, when).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
