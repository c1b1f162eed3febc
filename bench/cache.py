"""Prediction-cache benchmark: hits, misses and no cache on a costly model and a cheap one, and the break-even.

Two models, each served twice from a scratch repository, cached (`options.cache_ttl_s = 300`) and not:
`digits-heavy` (a calibrated RBF SVC, cached by its own spec; `digits-heavy-uncached` the copy that turns it
off) and `iris` (a 100-tree random forest, uncached by its spec; `iris-cached` the copy that turns it on).
For each `--rows` size, four kinds of request:
- none: no cache, the model run (`models.predict`);
- miss: the cache on, every request's rows made unique (one value nudged by a counter): looked up, computed,
  stored;
- hit: the cache on, the same request again and again (answered from the process's own copy);
- hit from Redis: the same with the process's copy emptied before each request, as in a process that never
  answered it (another stored it); in process only.
Measured two ways, in rounds in which the kinds take turns in blocks of `--block` requests, in an order drawn
afresh each turn, each timed block after as many untimed requests of its kind:
1. in process: `webapp.cache.PredictionCache.predict` against `models.predict` on the same model version
   (the same session), with a real Redis: what the cache adds or saves, without HTTP;
2. over HTTP: one keep-alive connection to a real web server (deploy/gunicorn.conf.py, one worker) serving the
   repository; what a client sees, including where the server runs each model (uncached cheap models on its
   event loop, cached ones on a thread).
Ratios are medians over the turns of each turn's ratio of block medians. The break-even hit rate is the share
of hits at which caching costs what no cache does: with none N, miss M and hit H (medians),
h = (M - N) / (M - H); above it the cache pays, and when H >= N it never does.

Run it as a module from the repository root (`python -m bench.cache --help`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import orjson
import redis
from sklearn.datasets import load_digits, load_iris

import models
from bench import report
from bench.servers import ROOT, Running, free_port, stop, wait_until_answering
from bench.targets import Target
from models import Registry, Settings
from webapp.cache import Outcome, PredictionCache

TTL_LINE = "cache_ttl_s = 300"
PAIRS = {"digits-heavy": "digits-heavy-uncached", "iris-cached": "iris"}
"""Each cached model and its uncached copy."""
KINDS = ("none", "miss", "hit", "redis")


def arguments(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,10", help="rows per request, one point each (default 1,10)")
    parser.add_argument("--requests", type=int, default=200, help="timed requests per point and round (default 200)")
    parser.add_argument("--block", type=int, default=20, help="requests of one kind in a row (default 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--no-http", dest="http", action="store_false", help="skip the measurement over HTTP")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6", help="Redis for the cache (flushed)")
    return parser.parse_args(argv)


def repository(folder: Path) -> Path:
    """A model repository of both models, each with its cache on and off (`PAIRS`)."""
    shutil.copytree(ROOT / "models" / "digits-heavy", folder / "digits-heavy")
    shutil.copytree(ROOT / "models" / "iris", folder / "iris")
    shutil.copytree(ROOT / "models" / "digits-heavy", folder / "digits-heavy-uncached")
    shutil.copytree(ROOT / "models" / "iris", folder / "iris-cached")
    _edit(folder / "digits-heavy-uncached" / "model.toml", TTL_LINE, "cache_ttl_s = 0")
    _edit(folder / "iris-cached" / "model.toml", "[options]\n", f"[options]\n{TTL_LINE}\n")
    return folder


def _edit(spec: Path, old: str, new: str) -> None:
    text = spec.read_text()
    if old not in text:
        raise SystemExit(f"{spec} has no {old.strip()!r} to change")
    spec.write_text(text.replace(old, new, 1))


class Rows:
    """Requests of `rows` rows of a model's dataset: unique ones (a counter sets the first value, below any the
    dataset holds, so never to the same rows' value) or always the same."""

    def __init__(self, model: str, rows: int):
        data = (load_digits() if model.startswith("digits") else load_iris()).data
        self.data, self.count = data.astype(np.float32)[:rows], 0

    def unique(self) -> np.ndarray:
        """New rows, never sent before in this run."""
        self.count += 1
        data = self.data.copy()
        data[0, 0] = -1 - self.count * 1e-3
        return data

    def same(self) -> np.ndarray:
        """The same rows every time."""
        return self.data


def turns(kinds: dict[str, Callable[[], float]], args: argparse.Namespace, seed: random.Random,
          into: dict[str, list[float]], point: str) -> None:
    """Time each kind in blocks, in an order drawn afresh each turn; append each block's median and mean."""
    for _ in range(max(1, args.requests // args.block)):
        for kind, call in seed.sample(list(kinds.items()), len(kinds)):
            for _ in range(args.block):  # untimed: steady state
                call()
            took = [call() for _ in range(args.block)]
            into.setdefault(f"{point}:{kind}", []).append(statistics.median(took))
            into.setdefault(f"{point}:{kind}:mean", []).append(statistics.fmean(took))


def in_process(args: argparse.Namespace, folder: Path, sizes: list[int]) -> dict[str, list[float]]:
    """Per-turn medians (seconds) of each kind, model and size, answered by the cache or the model in process."""
    registry = Registry(Settings(models_dir=folder))
    cache = PredictionCache(redis.Redis.from_url(args.redis_url))
    medians: dict[str, list[float]] = {}
    seed = random.Random(1)
    streams = {(m, n): Rows(m, n) for m in PAIRS for n in sizes}  # counters run on across rounds
    try:
        for round_number in range(args.rounds):
            for (model, rows), stream in streams.items():
                version = registry.get(model)
                turns(cache_kinds(cache, version, stream), args, seed, medians, f"{model}/{rows}")
            print(f"in process, round {round_number + 1}: {latest(medians, args)}", flush=True)
    finally:
        cache.close()
    return medians


def cache_kinds(cache: PredictionCache, version: models.ModelVersion, stream: Rows) -> dict[str, Callable[[], float]]:
    """The four kinds of one model and size as calls that answer their seconds, each checking its outcome."""
    name = version.spec.inputs[0].name

    def timed(inputs: np.ndarray, expect: Outcome | None, before: Callable[[], None] = lambda: None) -> float:
        before()
        started = time.perf_counter()
        if expect is None:
            models.predict(version, {name: inputs})
        elif (outcome := cache.predict(version, {name: inputs}).outcome) is not expect:
            raise SystemExit(f"{version.name}: a {expect} expected, the cache answered a {outcome}")
        return time.perf_counter() - started

    cache.predict(version, {name: stream.same()})  # the entry every hit reads
    return {"none": lambda: timed(stream.unique(), None), "miss": lambda: timed(stream.unique(), Outcome.MISS),
            "hit": lambda: timed(stream.same(), Outcome.HIT),
            "redis": lambda: timed(stream.same(), Outcome.HIT, cache.local.clear)}


def latest(medians: dict[str, list[float]], args: argparse.Namespace) -> str:
    """The median of each point's turns in the round just measured, in microseconds."""
    count = max(1, args.requests // args.block)
    return ", ".join(f"{k} {statistics.median(v[-count:]) * 1e6:.0f} us" for k, v in medians.items()
                     if not k.endswith(":mean"))


class Client:
    """One keep-alive connection to a server, connecting again (as any client would) when it is closed."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.reconnects = 0

    def ask(self, path: str, body: bytes, expect: str | tuple[str, ...] | None) -> float:
        """The seconds one request takes to be answered; its X-Cache header must say `expect` (or one of them)."""
        started = time.perf_counter()
        try:
            self.connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = self.connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            self.reconnects += 1
            self.connection.close()
            return self.ask(path, body, expect)
        response.read()
        took = time.perf_counter() - started
        said = response.getheader("X-Cache")
        if response.status != 200 or (said not in expect if isinstance(expect, tuple) else said != expect):
            raise SystemExit(f"{path} answered {response.status}, X-Cache {said}, not 200 and {expect}")
        return took


@contextlib.contextmanager
def web_server(args: argparse.Namespace, folder: Path) -> Iterator[int]:
    """One web worker serving the repository with the prediction cache on; yield its port."""
    port, log_path = free_port(), folder.parent / "server.log"
    env = {**os.environ, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1", "LOG_LEVEL": "warning",
           "REDIS_URL": args.redis_url, "PREDICTION_CACHE": "on", "MODELS_DIR": str(folder), "API_KEYS": "off",
           "ORT_INTRA_OP_THREADS": "1", "DATABASE_URL": f"sqlite:///{folder.parent / 'platform.db'}"}
    argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py")]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            body = orjson.dumps({"instances": Rows("iris", 1).same().tolist()})
            for path in (_path("iris"), _path("iris-cached")):
                target = Target(path, path, "web", path, body, "v1")
                wait_until_answering(Running(f"http://127.0.0.1:{port}", {}), target, log_path)
            yield port
        finally:
            stop(process)


def _path(model: str) -> str:
    return f"/v1/models/{model}:predict"


def over_http(args: argparse.Namespace, folder: Path, sizes: list[int]) -> dict[str, list[float]]:
    """Per-turn medians (seconds) of each kind but `redis`, model and size, as a client sees them."""
    medians: dict[str, list[float]] = {}
    seed = random.Random(2)
    streams = {(m, n): Rows(m, n) for m in PAIRS for n in sizes}
    for stream in streams.values():
        stream.count = 1 << 20  # rows the in-process part never sent
    with web_server(args, folder) as port:
        client = Client(port)
        for round_number in range(args.rounds):
            for (model, rows), stream in streams.items():
                turns(http_kinds(client, model, stream), args, seed, medians, f"{model}/{rows}")
            print(f"over HTTP, round {round_number + 1}: {latest(medians, args)}", flush=True)
    if client.reconnects:
        print(f"the server closed {client.reconnects} keep-alive connection(s)")
    return medians


def http_kinds(client: Client, model: str, stream: Rows) -> dict[str, Callable[[], float]]:
    """The kinds of one model and size as requests that answer their seconds."""

    def body(rows: np.ndarray) -> bytes:
        return orjson.dumps({"instances": rows.tolist()})

    same = body(stream.same())
    client.ask(_path(model), same, ("MISS", "HIT"))  # the entry every hit reads (there since an earlier round)
    return {"none": lambda: client.ask(_path(PAIRS[model]), body(stream.unique()), None),
            "miss": lambda: client.ask(_path(model), body(stream.unique()), "MISS"),
            "hit": lambda: client.ask(_path(model), same, "HIT")}


def break_even(none: float, miss: float, hit: float) -> float | None:
    """The hit rate above which the cache costs less than no cache; None when it never does."""
    if hit >= none:
        return None
    return max(0.0, (miss - none) / (miss - hit))


def figures_of(medians: dict[str, list[float]], sizes: list[int], how: str) -> tuple[dict, list[str]]:
    """Each point's medians, ratios and break-even hit rates, and a line each for the summary."""
    figures, lines = {}, []
    for model in PAIRS:
        for rows in sizes:
            point = f"{model}/{rows}"
            figures[point] = found = point_figures(medians, point)
            lines.append(summary_line(how, point, found))
    return figures, lines


def point_figures(medians: dict[str, list[float]], point: str) -> dict[str, float | None]:
    """One point's median per kind (us), miss/none and none/hit ratios, and break-even hit rates."""

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(medians[f"{point}:{a}"], medians[f"{point}:{b}"], strict=True))

    us = {kind: statistics.median(medians[f"{point}:{kind}"]) * 1e6 for kind in KINDS if f"{point}:{kind}" in medians}
    found: dict[str, float | None] = {f"{kind}_us": value for kind, value in us.items()}
    found |= {"miss_vs_none": ratio("miss", "none"), "none_vs_hit": ratio("none", "hit"),
              "break_even_hit_rate": break_even(us["none"], us["miss"], us["hit"])}
    if "redis" in us:
        found |= {"none_vs_redis_hit": ratio("none", "redis"),
                  "break_even_redis_hit_rate": break_even(us["none"], us["miss"], us["redis"])}
    return found


def summary_line(how: str, point: str, found: dict[str, float | None]) -> str:
    """One point's figures in a sentence."""
    line = (f"{how}, {point} rows: no cache {found['none_us']:.0f} us, miss {found['miss_us']:.0f} us "
            f"({found['miss_vs_none']:.2f}x no cache), hit {found['hit_us']:.0f} us "
            f"(no cache {found['none_vs_hit']:.2f}x a hit); pays above {_rate(found['break_even_hit_rate'])} hits")
    if "redis_us" in found:
        line += (f"; hit from Redis {found['redis_us']:.0f} us (no cache {found['none_vs_redis_hit']:.2f}x it), "
                 f"pays above {_rate(found['break_even_redis_hit_rate'])} such hits")
    return line


def _rate(rate: float | None) -> str:
    return "no rate of" if rate is None else f"{rate:.0%}"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print a line per point and write the JSON results."""
    args = arguments(argv)
    redis.Redis.from_url(args.redis_url).flushdb()
    sizes = [int(n) for n in args.rows.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as scratch:
        folder = repository(Path(scratch) / "models")
        local = in_process(args, folder, sizes)
        remote = over_http(args, folder, sizes) if args.http else {}
    figures, lines = figures_of(local, sizes, "in process")
    http_figures, http_lines = figures_of(remote, sizes, "over HTTP") if remote else ({}, [])
    print("\n" + "\n".join(lines + http_lines))
    document = {"settings": vars(args), "rows": sizes, "medians_s": local, "figures": figures,
                "http_medians_s": remote, "http_figures": http_figures, "summary": lines + http_lines,
                "environment": report.environment("bench/cache.py")}
    path = report.save(document, datetime.datetime.now(datetime.UTC), "cache")
    print(f"results written to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
