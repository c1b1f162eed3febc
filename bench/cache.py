"""Cache benchmarks, server side: the prediction cache on `digits-heavy`, the data cache on `digits-light`.

One run measures, in interleaved rounds, the time the web process's data plane takes to answer a
`POST /v1/models/digits-heavy:predict` (body parse, the cache lookup, the model, the answer's bytes; no
HTTP transport), called in-process with a real Redis, for requests of each `--rows` size:
- no cache: the data plane built without the prediction cache;
- miss: the cache on, every request's rows made unique (one pixel nudged by a counter), so each one is
  looked up, computed and stored;
- hit: the cache on, the same request again and again after one warm-up.
The miss and no-cache points send the same stream of unique bodies. Ratios are medians of the per-round
ratios of medians; targets: a hit at least 5x faster than a miss, a miss at most 1.05x the no-cache time.
Then, for the data cache, `digits-light` requests of `--images` PNG digits: sent as `{"b64"}` instances every
time, against `{"data_ids": [...]}` naming the same images stored once (`POST /v1/data`) and warmed.

Run it as a module from the repository root (`python -m bench.cache --help`).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import io
import statistics
import tempfile
import time

import numpy as np
import orjson
import redis
from flask import Flask
from PIL import Image
from sklearn.datasets import load_digits

from bench import report
from bench.servers import ROOT
from tasks import db
from webapp import create_app
from webapp.dataplane import Call, DataPlane

PATH = "/v1/models/digits-heavy:predict"
DATA_PATH = "/v1/models/digits-light:predict"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,10,100", help="rows per request, one point each")
    parser.add_argument("--requests", type=int, default=300, help="requests per point and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", default="1,10", help="images per request of the data-cache points")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    return parser.parse_args()


class Requests:
    """Bodies of `rows` digits rows: unique ones (a counter nudges one pixel) or always the same."""

    def __init__(self, rows: int):
        self.data = load_digits().data.astype(np.float32)[:rows]
        self.count = 0

    def unique(self) -> bytes:
        self.count += 1
        data = self.data.copy()
        data[0, 0] = self.count % 17 + (self.count // 17) * 1e-3  # still a valid 0-16 pixel scale value
        return orjson.dumps({"instances": data.tolist()})

    def same(self) -> bytes:
        return orjson.dumps({"instances": self.data.tolist()})


def timed(plane: DataPlane, bodies: list[bytes], path: str = PATH) -> float:
    """The median seconds the data plane takes to answer each body."""
    route = plane.route(path)
    took = []
    for body in bodies:
        started = time.perf_counter()
        status, *_ = plane.respond(route, Call("POST", body, "application/json"))
        took.append(time.perf_counter() - started)
        if status != 200:
            raise SystemExit(f"{path} answered {status}")
    return statistics.median(took)


def main() -> None:
    args = arguments()
    redis.Redis.from_url(args.redis_url).flushdb()
    cached = create_app({"redis_url": args.redis_url}).wsgi_app
    uncached = create_app({"redis_url": args.redis_url, "prediction_cache": False}).wsgi_app
    sizes = [int(n) for n in args.rows.split(",")]
    medians: dict[str, list[float]] = {}
    streams = {rows: Requests(rows) for rows in sizes}  # counters run on across rounds: every miss is new
    for round_number in range(args.rounds):
        for rows in sizes:
            requests = streams[rows]
            fresh = [requests.unique() for _ in range(args.requests)]
            medians.setdefault(f"none-{rows}", []).append(timed(uncached, fresh))
            fresh = [requests.unique() for _ in range(args.requests)]
            medians.setdefault(f"miss-{rows}", []).append(timed(cached, fresh))
            same = [requests.same()] * args.requests
            timed(cached, same[:1])  # the one miss that fills the entry
            medians.setdefault(f"hit-{rows}", []).append(timed(cached, same))
        print(f"round {round_number + 1}: " + ", ".join(f"{k} {v[-1] * 1e3:.3f} ms" for k, v in medians.items()),
              flush=True)
    figures, lines = {}, []
    for rows in sizes:
        none, miss, hit = (medians[f"{kind}-{rows}"] for kind in ("none", "miss", "hit"))
        speedup = statistics.median(m / h for m, h in zip(miss, hit, strict=True))
        overhead = statistics.median(m / n for m, n in zip(miss, none, strict=True))
        figures[str(rows)] = {"none_ms": statistics.median(none) * 1e3, "miss_ms": statistics.median(miss) * 1e3,
                              "hit_ms": statistics.median(hit) * 1e3, "hit_speedup": speedup,
                              "miss_vs_none": overhead}
        lines.append(f"{rows} rows: no cache {statistics.median(none) * 1e3:.3f} ms, miss "
                     f"{statistics.median(miss) * 1e3:.3f} ms ({overhead:.3f}x, target <= 1.05x), hit "
                     f"{statistics.median(hit) * 1e3:.3f} ms ({speedup:.1f}x faster than a miss, target >= 5x)")
    url = f"sqlite:///{tempfile.mkdtemp(prefix='bench-cache-')}/data.db"
    db.upgrade(url)
    stored, data_lines = data_cache(create_app({"redis_url": args.redis_url, "database_url": url}), args)
    lines += data_lines
    print("\n".join(lines))
    document = {"rows": sizes, "requests": args.requests, "rounds": args.rounds, "medians_s": medians,
                "figures": figures, "data_cache": stored, "summary": lines,
                "environment": report.environment("bench/cache.py")}
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
