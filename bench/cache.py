"""Cache benchmarks: the prediction cache on `digits-heavy`, the data cache on `digits-light`.

Prediction cache, `POST /v1/models/digits-heavy:predict` for requests of each `--rows` size, four kinds:
- no cache: served without the prediction cache;
- miss: the cache on, every request's rows made unique (one pixel nudged by a counter), so each one is
  computed and stored;
- hit: the cache on, the same request again and again after one warm-up (answered from the process's copy);
- hit from Redis: the same, with the process's copy emptied before each request, as in a process that never
  answered it (the entry another process stored); measured in process only.
The miss and no-cache points send the same stream of unique bodies. Measured two ways, each in rounds in
which the kinds take turns in blocks of `--block` requests, in an order drawn afresh for each turn (so the
machine's drift, and what one kind leaves behind for the next, falls on all alike), each timed block after
as many untimed requests of its kind (how the cache goes to Redis follows the hit rate a process has seen
lately: each kind is measured once that has settled):
1. in process: the time the web process's data plane takes to answer (body parse, cache, model, answer
   bytes; no HTTP), with a real Redis, the no-cache plane sharing the cached one's model sessions; then,
   untimed but recorded, what the cache does behind the answer once it is sent (keep and store it:
   `DataPlane.after`), reported as the miss's total work;
2. over HTTP: one keep-alive connection to a real web server (`deploy/gunicorn.conf.py`, one worker) that
   serves the model twice, as `digits-heavy` with its cache and as `digits-heavy-uncached`, a copy whose spec
   turns the cache off, the latency each request sees. One process serves both kinds, so they share its
   place on the cores (two servers' places differ from run to run, and at one connection that moved the
   no-cache latency by half).
Ratios are medians over the turns of each turn's ratio of block medians (the kinds of one turn run
within milliseconds of each other, so what the machine's other tenants do weighs on them alike); targets:
a hit at least 5x faster than a miss, a miss at most 1.05x the no-cache time. The miss is also given by
block means, which weigh the few requests a sample slows (a median hardly sees them): what the cache costs
in throughput.

Data cache, `digits-light` requests of `--images` PNG digits: sent as `{"b64"}` instances every time,
against `{"data_ids": [...]}` naming the same images stored once (`POST /v1/data`) and warmed.

Run it as a module from the repository root (`python -m bench.cache --help`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import functools
import http.client
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import redis
from flask import Flask
from PIL import Image
from sklearn.datasets import load_digits

from bench import report
from bench.servers import ROOT, free_port, stop, wait_until_answering
from tasks import db
from webapp import create_app
from webapp.dataplane import Call, DataPlane

PATH = "/v1/models/digits-heavy:predict"
UNCACHED = "digits-heavy-uncached"
UNCACHED_PATH = f"/v1/models/{UNCACHED}:predict"
MODELS = ROOT / "models"
DATA_PATH = "/v1/models/digits-light:predict"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,10,100", help="rows per request, one point each")
    parser.add_argument("--requests", type=int, default=300, help="requests per point and round")
    parser.add_argument("--block", type=int, default=20, help="requests of one kind in a row")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-http", dest="http", action="store_false", help="skip the measurement over HTTP")
    parser.add_argument("--images", default="1,10", help="images per request of the data-cache points")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    return parser.parse_args()


class Requests:
    """Bodies of `rows` digits rows: unique ones (a counter nudges pixel `pixel` of the first row) or always
    the same."""

    def __init__(self, rows: int, pixel: int = 0):
        self.data = load_digits().data.astype(np.float32)[:rows]
        self.count, self.pixel = 0, pixel

    def unique(self) -> bytes:
        self.count += 1
        data = self.data.copy()
        data[0, self.pixel] = self.count % 17 + (self.count // 17) * 1e-3  # still a valid 0-16 pixel scale value
        return orjson.dumps({"instances": data.tolist()})

    def same(self) -> bytes:
        return orjson.dumps({"instances": self.data.tolist()})


def timed(plane: DataPlane, bodies: list[bytes], path: str = PATH, before: Callable[[], None] = lambda: None,
          behind: list[float] | None = None) -> float:
    """The median seconds the data plane takes to answer each body (`before` runs, untimed, ahead of each;
    what the answer leaves to do after it is sent runs untimed, its seconds appended to `behind`)."""
    route = plane.route(path)
    took = []
    for body in bodies:
        before()
        started = time.perf_counter()
        status, *_ = plane.respond(route, Call("POST", body, "application/json"))
        answered = time.perf_counter()
        took.append(answered - started)
        plane.after()
        if behind is not None:
            behind.append(time.perf_counter() - answered)
        if status != 200:
            raise SystemExit(f"{path} answered {status}")
    return statistics.median(took)


KINDS = ("none", "miss", "hit", "shared")


def in_process(args: argparse.Namespace, sizes: list[int]) -> dict[str, list[float]]:
    """Per-turn medians of each kind and size, and of the work behind each miss, answered in process."""
    app = create_app({"redis_url": args.redis_url})
    cached, local = app.wsgi_app, app.extensions["cache"].local
    # the same registry, so the same model sessions: the two differ by the cache alone
    uncached = DataPlane(cached.registry, cached.fallback, cached.max_body_bytes, cache=None, stored=cached.stored)
    medians: dict[str, list[float]] = {}
    streams = {rows: Requests(rows) for rows in sizes}  # counters run on across rounds: every miss is new
    turns = random.Random(1)
    for round_number in range(args.rounds):
        for rows in sizes:
            requests = streams[rows]
            same = requests.same()
            timed(cached, [same])  # the one miss that fills the entry
            again = functools.partial(bytes, same)
            kinds = {"none": (uncached, requests.unique), "miss": (cached, requests.unique),
                     "hit": (cached, again), "shared": (cached, again)}
            for _ in range(args.requests // args.block):
                behind: list[float] = []
                for kind, (plane, body) in turns.sample(list(kinds.items()), len(kinds)):
                    clear = local.clear if kind == "shared" else (lambda: None)
                    timed(plane, [body() for _ in range(args.block)], before=clear)  # untimed: steady state
                    took = [timed(plane, [body()], before=clear, behind=behind if kind == "miss" else None)
                            for _ in range(args.block)]
                    medians.setdefault(f"{kind}-{rows}", []).append(statistics.median(took))
                    medians.setdefault(f"mean-{kind}-{rows}", []).append(statistics.fmean(took))
                medians.setdefault(f"behind-{rows}", []).append(statistics.median(behind))
        print(f"in process, round {round_number + 1}: " + _latest(medians, args), flush=True)
    return medians


def _latest(medians: dict[str, list[float]], args: argparse.Namespace) -> str:
    """The median of each point's turns in the round just measured."""
    turns = args.requests // args.block
    return ", ".join(f"{k} {statistics.median(v[-turns:]) * 1e3:.3f} ms" for k, v in medians.items()
                     if not k.startswith("mean-"))


class Client:
    """One keep-alive connection to a server, connecting again (as any client would) when it is closed."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.reconnects = 0

    def ask(self, body: bytes, path: str = PATH) -> float:
        """The seconds one request takes to be answered."""
        started = time.perf_counter()
        try:
            self.connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = self.connection.getresponse()
        except (http.client.RemoteDisconnected, ConnectionError):
            self.reconnects += 1
            self.connection.close()
            return self.ask(body, path)
        response.read()
        if response.status != 200:
            raise SystemExit(f"{path} answered {response.status}")
        return time.perf_counter() - started


def uncached_copy(repository: Path) -> None:
    """A model repository of `digits-heavy` and `UNCACHED`, the same model with its cache turned off."""
    for name in ("digits-heavy", UNCACHED):
        shutil.copytree(MODELS / "digits-heavy", repository / name)
    spec = repository / UNCACHED / "model.toml"
    text = spec.read_text()
    if "cache_ttl_s = 300" not in text:
        raise SystemExit(f"{spec} does not set cache_ttl_s = 300 to turn off")
    spec.write_text(text.replace("cache_ttl_s = 300", "cache_ttl_s = 0"))


def over_http(args: argparse.Namespace, sizes: list[int]) -> dict[str, list[float]]:
    """Per-turn medians of each kind and size as a client sees them, from a real web server that serves the
    model twice, with its cache and without (`uncached_copy`): one process, so the two kinds share its place
    on the cores, which on a small machine moves a one-connection latency more than the cache does."""
    medians: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as scratch, contextlib.ExitStack() as stack:
        uncached_copy(Path(scratch))
        port, log_path = free_port(), Path(scratch) / "server.log"
        env = {**os.environ, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1", "LOG_LEVEL": "info",
               "REDIS_URL": args.redis_url, "PREDICTION_CACHE": "on", "MODELS_DIR": scratch}
        log = stack.enter_context(open(log_path, "wb"))
        argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py")]
        stack.callback(stop, subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        streams = {rows: Requests(rows, pixel=1) for rows in sizes}  # bodies the first part never sent
        turns = random.Random(2)
        for path in (PATH, UNCACHED_PATH):
            wait_until_answering(f"http://127.0.0.1:{port}{path}", streams[sizes[0]].same(), log_path)
        client = Client(port)
        for round_number in range(args.rounds):
            for rows in sizes:
                requests = streams[rows]
                same = requests.same()
                client.ask(same)
                kinds = {"none": (UNCACHED_PATH, requests.unique), "miss": (PATH, requests.unique),
                         "hit": (PATH, functools.partial(bytes, same))}
                for _ in range(args.requests // args.block):
                    for kind, (path, body) in turns.sample(list(kinds.items()), len(kinds)):
                        for _ in range(args.block):  # untimed: steady state, as in process
                            client.ask(body(), path)
                        took = [client.ask(body(), path) for _ in range(args.block)]
                        medians.setdefault(f"{kind}-{rows}", []).append(statistics.median(took))
                        medians.setdefault(f"mean-{kind}-{rows}", []).append(statistics.fmean(took))
            print(f"over HTTP, round {round_number + 1}: " + _latest(medians, args), flush=True)
        if client.reconnects:
            tail = log_path.read_text(errors="replace")[-1500:]
            print(f"the server closed {client.reconnects} connection(s); log tail: {tail}")
    return medians


def figures_of(medians: dict[str, list[float]], sizes: list[int], how: str) -> tuple[dict, list[str]]:
    """Medians and per-turn ratio medians of each size, and a line each for the summary."""
    figures, lines = {}, []

    def ratio(a: str, b: str, rows: int) -> float:
        return statistics.median(x / y for x, y in zip(medians[f"{a}-{rows}"], medians[f"{b}-{rows}"], strict=True))

    for rows in sizes:
        ms = {kind: statistics.median(v) * 1e3 for kind in (*KINDS, "behind")
              if (v := medians.get(f"{kind}-{rows}"))}
        point = {f"{kind}_ms": value for kind, value in ms.items()}
        point |= {"miss_vs_none": ratio("miss", "none", rows), "hit_speedup": ratio("miss", "hit", rows),
                  "mean_miss_vs_none": ratio("mean-miss", "mean-none", rows)}
        line = (f"{how}, {rows} rows: no cache {ms['none']:.3f} ms, miss {ms['miss']:.3f} ms "
                f"({point['miss_vs_none']:.3f}x, target <= 1.05x; by means {point['mean_miss_vs_none']:.3f}x), "
                f"hit {ms['hit']:.3f} ms "
                f"({point['hit_speedup']:.1f}x faster than a miss, target >= 5x)")
        if "shared" in ms:
            point["shared_hit_speedup"] = ratio("miss", "shared", rows)
            miss_work = [m + b for m, b in zip(medians[f"miss-{rows}"], medians[f"behind-{rows}"], strict=True)]
            point["miss_work_vs_none"] = statistics.median(
                w / n for w, n in zip(miss_work, medians[f"none-{rows}"], strict=True))
            line += (f", hit from Redis {ms['shared']:.3f} ms ({point['shared_hit_speedup']:.1f}x); work behind a"
                     f" miss's answer {ms['behind']:.3f} ms (answer + behind {point['miss_work_vs_none']:.3f}x)")
        figures[str(rows)] = point
        lines.append(line)
    return figures, lines


def main() -> None:
    args = arguments()
    redis.Redis.from_url(args.redis_url).flushdb()
    sizes = [int(n) for n in args.rows.split(",")]
    local = in_process(args, sizes)
    figures, lines = figures_of(local, sizes, "in process")
    remote = over_http(args, sizes) if args.http else {}
    http_figures, http_lines = figures_of(remote, sizes, "over HTTP") if remote else ({}, [])
    url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-cache-')}/data.db"
    db.upgrade(url)
    stored, data_lines = data_cache(create_app({"redis_url": args.redis_url, "database_url": url}), args)
    lines += http_lines + data_lines
    print("\n".join(lines))
    document = {"rows": sizes, "requests": args.requests, "block": args.block, "rounds": args.rounds,
                "medians_s": local, "figures": figures, "http_medians_s": remote, "http_figures": http_figures,
                "data_cache": stored, "summary": lines, "environment": report.environment("bench/cache.py")}
    path = report.save(document, datetime.datetime.now(datetime.UTC), "cache")
    print(f"results written to {path.relative_to(ROOT)}")


def digit_png(pixels: np.ndarray) -> bytes:
    """One of scikit-learn's 8x8 digits drawn as a 64x64 PNG, dark ink on white."""
    ink = Image.fromarray(np.rint(255 - pixels.reshape(8, 8) * 255 / 16).astype(np.uint8), "L")
    out = io.BytesIO()
    ink.resize((64, 64), Image.Resampling.NEAREST).save(out, "PNG")
    return out.getvalue()


def data_cache(app: Flask, args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Requests of stored, warmed images by id against the same images sent every time."""
    digits, store = load_digits().data, app.extensions["data"]
    version = app.extensions["registry"].get("digits-light")
    pngs = [digit_png(digits[i]) for i in range(max(int(n) for n in args.images.split(",")))]
    ids = [store.put("image", png, "image/png")["data_id"] for png in pngs]
    store.prepared(version, ids)  # warm
    medians: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for n in (int(n) for n in args.images.split(",")):
            sent = orjson.dumps({"instances": [{"b64": base64.b64encode(p).decode()} for p in pngs[:n]]})
            by_id = orjson.dumps({"data_ids": ids[:n]})
            for name, body in ((f"images-{n}", sent), (f"ids-{n}", by_id)):
                medians.setdefault(name, []).append(timed(app.wsgi_app, [body] * args.requests, DATA_PATH))
    figures, lines = {}, []
    for n in (int(n) for n in args.images.split(",")):
        sent, by_id = medians[f"images-{n}"], medians[f"ids-{n}"]
        speedup = statistics.median(s / i for s, i in zip(sent, by_id, strict=True))
        figures[str(n)] = {"images_ms": statistics.median(sent) * 1e3, "data_ids_ms": statistics.median(by_id) * 1e3,
                           "speedup": speedup}
        lines.append(f"{n} image(s): sent every time {statistics.median(sent) * 1e3:.3f} ms, by data_id on a warm "
                     f"cache {statistics.median(by_id) * 1e3:.3f} ms ({speedup:.1f}x faster)")
    return {"medians_s": medians, "figures": figures}, lines


if __name__ == "__main__":
    main()
