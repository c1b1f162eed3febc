"""Load test: the whole platform under the mixed traffic of bench/locustfile.py, figures per endpoint.

The platform as `make run` lays it out, minus beat and Flower: the web process under gunicorn with
deploy/gunicorn.conf.py, a Celery worker for the online queues (`prep`, `predict`) and one for `batch`, on a
Redis and an SQL store of the run's own: a private redis-server (or `--redis-url`, whose database is flushed)
and a scratch SQLite file (or `--database-url`, migrated; the run adds its items and runs there). Once each
part answers (a prediction, a job, a batch run), Locust runs headless, `--users` users for `--duration`
seconds, then everything is stopped. Output: a table of requests, failures, throughput and p50/p95/p99 per
endpoint (a job's and a batch run's end-to-end times as endpoints of their own), the cached endpoint's hits
and misses timed apart and the server's counts of them, and bench/results/loadtest-<date>[-n].json.

Run it as a module from the repository root (`python -m bench.loadtest --help`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import redis

from bench import report
from bench.servers import QUIET, ROOT, free_port, stop
from deploy import redis_server
from tasks import db

LOCUSTFILE = ROOT / "bench" / "locustfile.py"
ONLINE_QUEUES = "prep,predict"
READY_TIMEOUT_S = 120
HEADER = ["endpoint", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"]
CACHE_HEADER = ["X-Cache", "requests", "p50 ms", "p95 ms", "p99 ms", "max ms"]


def arguments(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=20, help="simulated users (default 20)")
    parser.add_argument("--spawn-rate", type=float, default=10, help="users started a second (default 10)")
    parser.add_argument("--duration", type=int, default=60, help="seconds of load (default 60)")
    parser.add_argument("--redis-url", help="a Redis database to use, flushed first (default: a private Redis)")
    parser.add_argument("--database-url", help="the SQL store, migrated first (default: a scratch SQLite file)")
    return parser.parse_args(argv)


@contextlib.contextmanager
def own_redis(url: str | None, scratch: Path) -> Iterator[str]:
    """The given Redis database, flushed; or a redis-server of the run's own, stopped at the end."""
    if url:
        with redis.Redis.from_url(url) as client:
            client.flushdb()
        yield url
        return
    process, url = redis_server.start(scratch / "redis", stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        yield url
    finally:
        stop(process)


def commands(port: int) -> dict[str, list[str]]:
    """The platform's processes: web, the online worker, the batch worker."""
    celery = [sys.executable, "-m", "celery", "-A", "tasks.worker", "worker", "-l", "WARNING"]
    return {
        "web": [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py")],
        "worker": [*celery, "-Q", ONLINE_QUEUES, "-n", f"loadtest-online-{port}@%h"],
        "batch-worker": [*celery, "-Q", "batch", "-c", "1", "-n", f"loadtest-batch-{port}@%h"],
    }


@contextlib.contextmanager
def platform(redis_url: str, database_url: str, scratch: Path) -> Iterator[str]:
    """Start the platform on a free port, yield its base URL once it answers, and stop it."""
    port = free_port()
    env = {**os.environ, **QUIET, "BIND": f"127.0.0.1:{port}", "API_KEYS": "off", "REDIS_URL": redis_url,
           "DATABASE_URL": database_url, "PYTHONPATH": str(ROOT)}
    db.upgrade(database_url)
    with contextlib.ExitStack() as stack:
        for name, command in commands(port).items():
            log = stack.enter_context(open(scratch / f"{name}.log", "wb"))
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            stack.callback(stop, process)
        url = f"http://127.0.0.1:{port}"
        try:
            warm_up(url)
        except (OSError, TimeoutError) as exc:
            raise SystemExit(f"the platform did not come up: {exc}\n{tails(scratch)}") from None
        yield url


def warm_up(url: str) -> None:
    """Wait until the web process predicts, the online worker finishes a job and the batch worker a run."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _answers(url + "/v1/models/iris:predict", {"instances": [[5.1, 3.5, 1.4, 0.2]]}):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {READY_TIMEOUT_S} s")
        time.sleep(0.2)
    job = call(url + "/v1/models/iris:submit", {"instances": [[5.1, 3.5, 1.4, 0.2]]})
    finished(f"{url}/v1/jobs/{job['job_id']}", deadline)
    call(url + "/v1/batch/items", {"model": "iris", "instances": [[5.1, 3.5, 1.4, 0.2]]})
    run = call(url + "/v1/batch/runs", {"model": "iris"})
    finished(f"{url}/v1/batch/runs/{run['run_id']}", deadline)


def _answers(url: str, body: dict) -> bool:
    with contextlib.suppress(OSError):
        call(url, body)
        return True
    return False


def call(url: str, body: dict | None = None) -> dict:
    """GET `url`, or POST `body` to it as JSON; answer the decoded JSON reply."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def finished(url: str, deadline: float) -> None:
    """Poll a job or run until it has succeeded; raise TimeoutError when it fails or the deadline passes."""
    while time.monotonic() < deadline:
        status = call(url)["status"]
        if status == "succeeded":
            return
        if status in ("failed", "cancelled"):
            raise TimeoutError(f"{url} ended {status}")
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not finish within {READY_TIMEOUT_S} s")


def tails(scratch: Path) -> str:
    """The last lines of every process's log."""
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
                     for log in sorted(scratch.glob("*.log")))


def locust(url: str, options: argparse.Namespace, scratch: Path) -> dict:
    """Run the locustfile headless against `url`; answer the figures it wrote when the test stopped."""
    summary = scratch / "summary.json"
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
               "-u", str(options.users), "-r", str(options.spawn_rate), "-t", f"{options.duration}s",
               "--only-summary", "--summary", str(summary)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(scratch / "locust.log", "wb") as log:
        done = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1) or not summary.exists():  # 1: some request failed
        raise SystemExit(f"locust exited with status {done.returncode}\n{tails(scratch)}")
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {**json.loads(summary.read_text()), "generator_cpu_s": round(cpu_s, 1), "load_average_end": os.getloadavg()}


def task_ratio(users: int) -> dict:
    """The share of users and of tasks each user class gets at `users` users, as Locust computes it."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--show-task-ratio-json", "-u", str(users)]
    return json.loads(subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True).stdout)


def server_cache_counts(url: str) -> dict:
    """The server's own hit and miss counts per cached model (`GET /v1/cache`), once in-process hits are in."""
    time.sleep(1.5)
    return call(url + "/v1/cache")["models"]


def http_total(found: list[dict]) -> dict:
    """Requests, failures and throughput of every HTTP request together (jobs and runs are made of those)."""
    http = [e for e in found if e["type"] in ("GET", "POST")]
    return {"requests": sum(e["requests"] for e in http), "failures": sum(e["failures"] for e in http),
            "rps": round(sum(e["rps"] for e in http), 1)}


def times(figures: dict) -> list[str]:
    """p50, p95, p99 and the longest time, in milliseconds."""
    return [f"{figures[k]:.0f}" for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")]


def rows(found: list[dict], total: dict) -> list[list[str]]:
    """The endpoints' table rows, then the HTTP total."""
    table = [[f"{e['type']} {e['name']}", str(e["requests"]), str(e["failures"]), f"{e['rps']:.1f}", *times(e)]
             for e in found]
    return [*table, ["all HTTP requests", str(total["requests"]), str(total["failures"]), f"{total['rps']:.1f}",
                     "", "", "", ""]]


def cache_rows(client: dict) -> list[list[str]]:
    """The cached endpoint's rows: its hits and its misses, timed apart."""
    return [[outcome, str(f["requests"]), *times(f)] for outcome, f in sorted(client.items())]


def show(document: dict) -> None:
    """Print the tables, as text and as Markdown, and a warning for every failure."""
    table = rows(document["endpoints"], document["http_total"])
    cached = cache_rows(document["cache"]["client"])
    print(report.text_table(table, HEADER), "", report.text_table(cached, CACHE_HEADER), sep="\n")
    print("server's counts (GET /v1/cache):", json.dumps(document["cache"]["server"]))
    machine = document["environment"]
    print(f"load generator: {machine['generator_cpu_s']} CPU seconds over {document['settings']['duration_s']} s; "
          f"load average {machine['load_average'][0]:.2f} before, {machine['load_average_end'][0]:.2f} after")
    print("", report.markdown_table(table, HEADER), "", report.markdown_table(cached, CACHE_HEADER), sep="\n")
    for failure in document["failures"]:
        print(f"WARNING: {failure['method']} {failure['name']} failed {failure['occurrences']} times: "
              f"{failure['error']}")


def build() -> str:
    """The commit under test, marked when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" (modified)" if git("status", "--porcelain") else "")


def measure(options: argparse.Namespace, scratch: Path) -> dict:
    """Start the platform, put it under load, and answer the run's document."""
    database_url = options.database_url or f"sqlite:///{scratch / 'platform.db'}"
    with own_redis(options.redis_url, scratch) as redis_url, platform(redis_url, database_url, scratch) as url:
        environment = report.environment("locust " + metadata.version("locust"))
        found = locust(url, options, scratch)
        server = server_cache_counts(url)
    settings = {"users": options.users, "spawn_rate": options.spawn_rate, "duration_s": options.duration,
                "redis": "given" if options.redis_url else "private", "database": database_url.split(":")[0]}
    environment.update(generator_cpu_s=found["generator_cpu_s"], load_average_end=found["load_average_end"])
    return {"build": build(), "settings": settings, "environment": environment, "mix": task_ratio(options.users),
            "endpoints": found["endpoints"], "http_total": http_total(found["endpoints"]),
            "failures": found["failures"], "cache": {"client": found["cache"], "server": server}}


def main(argv: list[str] | None = None) -> int:
    """Run the load test once, print its figures and save them."""
    options = arguments(argv)
    when = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="loadtest-") as folder:
        document = {"date": when.isoformat(timespec="seconds"), **measure(options, Path(folder))}
    show(document)
    print(f"\nsaved {report.save(document, when, prefix='loadtest').relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
