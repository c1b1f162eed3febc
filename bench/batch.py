"""Batch benchmark: a run over many `iris` rows on MariaDB, against the floor of reading and writing them.

One run, in interleaved rounds, on a scratch database (`platform_bench` beside the test one):
- the floor, on one connection and on as many connections as our worker processes: read every row's input
  in chunks (by primary-key range) and write each a prediction-sized JSON, its status and finish time, with the
  same driver (PyMySQL through SQLAlchemy) and the same UPDATEs our chunks write with (`WRITE_ROWS` rows a
  statement); no claim, no model, no Celery;
- ours: a real `celery worker -Q batch -c N` for each N asked, the run triggered as `POST /v1/batch/runs`
  triggers it, timed from the trigger until the run's row says it has finished.
Registering the rows and putting them back to `queued` between points are not timed. Before anything is
timed, our answers are checked against onnxruntime's for a sample of rows.

Run it as a module from the repository root (`python -m bench.batch --help`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
import sqlalchemy as sa
from sklearn.datasets import load_iris

from bench import report
from bench.servers import ROOT, stop
from tasks import TaskSettings, create_celery, db
from tasks.items import WRITE_ROWS, ItemStore
from tasks.runs import RunStore

SCRATCH = "platform_bench"
MODEL = "iris"


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", default="1,2", help="worker processes of each point of ours")
    parser.add_argument("--chunk", type=int, default=TaskSettings.batch_chunk_rows,
                        help="BATCH_CHUNK_ROWS, also the floor's chunk")
    parser.add_argument("--database-url", default=os.environ.get("TEST_DATABASE_URL",
                                                                   "mysql+pymysql://root@127.0.0.1:3306/test"))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/7")
    return parser.parse_args()


def scratch(server_url: str) -> str:
    """A fresh scratch database on the server of `server_url`, migrated; answer its URL."""
    engine = db.create_engine(server_url)
    with engine.begin() as connection:
        connection.execute(sa.text(f"DROP DATABASE IF EXISTS {SCRATCH}"))
        connection.execute(sa.text(f"CREATE DATABASE {SCRATCH}"))
    engine.dispose()
    url = sa.make_url(server_url).set(database=SCRATCH).render_as_string(hide_password=False)
    db.upgrade(url)
    return url


def register(engine: sa.Engine, count: int) -> list[list[float]]:
    """Register `count` iris-like rows (not timed); answer them."""
    base = load_iris().data
    rows = (base[np.arange(count) % len(base)] + np.random.default_rng(0).normal(0, 0.05, (count, 4))).round(3)
    store = ItemStore(engine, 300, 3)
    for start in range(0, count, 10_000):
        store.register(MODEL, 1, [orjson.dumps(r).decode() for r in rows[start:start + 10_000].tolist()])
    return rows.tolist()


def requeue(engine: sa.Engine) -> None:
    """Put every row back to `queued` and forget the runs (not timed)."""
    with engine.begin() as connection:
        connection.execute(db.items.update().values(status="queued", prediction=None, error=None, attempts=0,
                                                    run_id=None, claim=None, leased_until=None, started_at=None,
                                                    finished_at=None))
        connection.execute(db.runs.delete())
    time.sleep(2)  # let InnoDB purge what the reset left behind


def floor_part(url: str, first: int, last: int, chunk: int, prediction: str, ready: Any, go: Any) -> None:
    """The floor's work over ids `first`..`last`: read the inputs a chunk at a time, write a prediction each.
    It connects first, says it is ready, and starts when told, so process start-up is not timed."""
    engine, items = db.create_engine(url), db.items
    with engine.connect() as connection:
        connection.execute(sa.text("SELECT 1"))
    ready.release()
    go.wait()
    mark, finished = "%s", db.now()
    for start in range(first, last + 1, chunk):
        with engine.begin() as connection:
            got = connection.execute(sa.select(items.c.id, items.c.input)
                                     .where(items.c.id.between(start, min(start + chunk - 1, last)))).all()
            ids = [row.id for row in got]
            for offset in range(0, len(ids), WRITE_ROWS):  # as many rows a statement as our write-back takes
                part = ids[offset:offset + WRITE_ROWS]
                cases = " ".join(f"WHEN {mark} THEN {mark}" for _ in part)
                sql = (f"UPDATE batch_items SET status = 'succeeded', prediction = CASE id {cases} END, "
                       f"finished_at = {mark} WHERE id BETWEEN {mark} AND {mark}")
                params = (*(v for i in part for v in (i, prediction)), finished, part[0], part[-1])
                connection.exec_driver_sql(sql, params)
    engine.dispose()


def floor(url: str, bounds: tuple[int, int], connections: int, chunk: int, prediction: str) -> float:
    """Seconds the floor takes over every row on `connections` connections in parallel processes."""
    first, last = bounds
    share = (last - first + connections) // connections
    context = multiprocessing.get_context("spawn")
    ready, go = context.Semaphore(0), context.Event()
    parts = [(url, first + n * share, min(first + (n + 1) * share - 1, last), chunk, prediction, ready, go)
             for n in range(connections)]
    processes = [context.Process(target=floor_part, args=part) for part in parts]
    for process in processes:
        process.start()
    for _ in processes:
        ready.acquire()
    started = time.perf_counter()
    go.set()
    for process in processes:
        process.join()
    return time.perf_counter() - started


@contextlib.contextmanager
def worker(url: str, redis_url: str, processes: int, chunk: int, log: Path) -> Iterator[None]:
    """`celery -A tasks.worker worker -Q batch -c N`, its sessions loaded, ready when this yields."""
    name = f"bench-batch-{os.getpid()}-{processes}"
    command = [sys.executable, "-m", "celery", "-A", "tasks.worker", "worker", "-Q", "batch", "-c", str(processes),
               "-n", f"{name}@%h", "-l", "WARNING", "--without-mingle", "--without-gossip"]
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "BATCH_CHUNK_ROWS": str(chunk)}
    celery = create_celery(TaskSettings(redis_url=redis_url))
    with log.open("ab") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not any(name in replied for reply in celery.control.ping(timeout=0.5) for replied in reply):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the batch worker did not start:\n{log.read_text()[-3000:]}")
        yield
    finally:
        celery.close()
        stop(process)


def ours(engine: sa.Engine, redis_url: str, rows: int) -> float:
    """Seconds from triggering a run to its finish, as `POST /v1/batch/runs` triggers it."""
    store = RunStore(engine, 3)
    celery = create_celery(TaskSettings(redis_url=redis_url))
    started = time.perf_counter()
    run = store.create(MODEL, "bench")
    celery.tasks["batch_run"].apply_async(args=[run.id], queue="batch")
    while (found := store.get(run.id)).status in ("queued", "running"):
        time.sleep(0.02)
    elapsed = time.perf_counter() - started
    celery.close()
    if (found.status, found.succeeded) != ("succeeded", rows):
        raise SystemExit(f"the run ended {found.status} with {found.succeeded} of {rows} rows: {found}")
    return elapsed


def check(engine: sa.Engine, rows: list[list[float]]) -> None:
    """Compare a sample of stored predictions with onnxruntime's, so no broken run is timed."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(ROOT / "models" / MODEL / "1" / "model.onnx"))
    sample = list(range(0, len(rows), max(len(rows) // 500, 1)))
    with engine.connect() as connection:
        stored = dict(connection.execute(sa.select(db.items.c.id, db.items.c.prediction)).all())
    ids = sorted(stored)
    labels, probabilities = session.run(None, {"features": np.asarray([rows[i] for i in sample], np.float32)})
    for n, i in enumerate(sample):
        got = orjson.loads(stored[ids[i]])
        if got["label"] != labels[n] or not np.allclose(got["probabilities"], probabilities[n], atol=1e-5):
            raise SystemExit(f"row {i}: stored {got}, onnxruntime {labels[n]} {probabilities[n]}")


def main() -> None:
    args = arguments()
    counts = [int(n) for n in args.workers.split(",")]
    url = scratch(args.database_url)
    engine = db.create_engine(url)
    rows = register(engine, args.rows)
    with engine.connect() as connection:
        bounds = connection.execute(sa.select(sa.func.min(db.items.c.id), sa.func.max(db.items.c.id))).one()
    prediction = orjson.dumps({"label": 0, "probabilities": [0.99, 0.005, 0.005], "label_name": "setosa"}).decode()
    log = Path(tempfile.mkdtemp(prefix="bench-batch-")) / "workers.log"
    seconds: dict[str, list[float]] = {}
    for round_number in range(args.rounds):
        for n in counts:
            requeue(engine)
            seconds.setdefault(f"floor-{n}", []).append(floor(url, tuple(bounds), n, args.chunk, prediction))
            requeue(engine)
            redis.Redis.from_url(args.redis_url).flushdb()
            with worker(url, args.redis_url, n, args.chunk, log):
                seconds.setdefault(f"ours-{n}", []).append(ours(engine, args.redis_url, args.rows))
            if round_number == 0:
                check(engine, rows)
        print(f"round {round_number + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()),
              flush=True)
    document = summarize(seconds, args, counts)
    path = report.save({**document, "environment": report.environment("bench/batch.py")},
                       datetime.datetime.now(datetime.UTC), "batch")
    print(f"results written to {path.relative_to(ROOT)}")


def summarize(seconds: dict[str, list[float]], args: argparse.Namespace, counts: list[int]) -> dict:
    """Rows/s medians per point; ours against the floor round by round, at the same process count and
    against the single-connection floor; rows/s per worker process."""
    rate = {name: statistics.median(args.rows / s for s in runs) for name, runs in seconds.items()}
    lines, figures = [], {}
    for n in counts:
        same = statistics.median(f / o for f, o in zip(seconds[f"floor-{n}"], seconds[f"ours-{n}"], strict=True))
        single = statistics.median(f / o for f, o in zip(seconds["floor-1"], seconds[f"ours-{n}"], strict=True)) \
            if "floor-1" in seconds else None
        figures[f"ours-{n}"] = {"rows_per_s": rate[f"ours-{n}"], "rows_per_s_per_process": rate[f"ours-{n}"] / n,
                                "vs_floor_same_connections": same, "vs_floor_one_connection": single}
        figures[f"floor-{n}"] = {"rows_per_s": rate[f"floor-{n}"]}
        lines.append(f"{n} worker process(es): {rate[f'ours-{n}']:.0f} rows/s ({rate[f'ours-{n}'] / n:.0f} per "
                     f"process); floor on {n} connection(s) {rate[f'floor-{n}']:.0f} rows/s; ours / floor "
                     f"{same:.2f}x" + (f", / one-connection floor {single:.2f}x" if single else "")
                     + (" (target >= 0.50x)" if same else ""))
    print("\n".join(lines))
    return {"rows": args.rows, "rounds": args.rounds, "chunk": args.chunk, "seconds": seconds, "figures": figures,
            "summary": lines}


if __name__ == "__main__":
    main()
