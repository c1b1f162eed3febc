"""Synchronous HTTP benchmark: our web process against a minimal FastAPI service and bare onnxruntime.

One run measures, in interleaved rounds so that a noisy shared machine weighs on all alike:
in-process onnxruntime on the iris model (one row, one intra-op thread); the FastAPI baseline
(bench/fastapi_baseline.py, gunicorn with 2 uvicorn workers); and our platform (gunicorn with
deploy/gunicorn.conf.py, 2 workers) on its TensorFlow Serving `:predict` and V2 `/infer` routes.
Each point is single-row requests over keep-alive connections on loopback, at each concurrency.

Run it as a module from the repository root (`python -m bench.http --help`); see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "iris" / "1" / "model.onnx"
RESULTS = Path(__file__).resolve().parent / "results"
ROW = [5.1, 3.5, 1.4, 0.2]
WORKERS = 2


@dataclass(frozen=True)
class Target:
    """One HTTP route under load: which server answers it and the single-row body it is sent."""

    name: str
    title: str
    server: str
    path: str
    body: bytes


TARGETS = (
    Target("fastapi", "FastAPI + onnxruntime", "fastapi", "/predict", json.dumps({"data": [ROW]}).encode()),
    Target("ours-v1", "ours, TF Serving :predict", "ours", "/v1/models/iris:predict",
           json.dumps({"instances": [ROW]}).encode()),
    Target("ours-v2", "ours, V2 /infer (JSON)", "ours", "/v2/models/iris/infer",
           json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ROW}]})
           .encode()),
)
BASELINE = "fastapi"


@dataclass(frozen=True)
class Sample:
    """One measured point: throughput and latency percentiles over `requests` completed calls."""

    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int = 0


Generator = Callable[[str, bytes, int, int], Sample]


# --- servers -------------------------------------------------------------------------------------------


def server_commands(ports: dict[str, int]) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The command line and environment of each server, bound to loopback on its port."""
    python = sys.executable
    quiet = {"LOG_LEVEL": "warning", "ORT_INTRA_OP_THREADS": "1"}
    fastapi = [python, "-m", "gunicorn", "bench.fastapi_baseline:app", "-k", "uvicorn.workers.UvicornWorker",
               "-w", str(WORKERS), "-b", f"127.0.0.1:{ports['fastapi']}", "--log-level", "warning"]
    ours = [python, "-m", "gunicorn", "-c", str(ROOT / "deploy" / "gunicorn.conf.py")]
    ours_env = {"BIND": f"127.0.0.1:{ports['ours']}", "WEB_CONCURRENCY": str(WORKERS)}
    return {
        "fastapi": (fastapi, {**os.environ, **quiet}),
        "ours": (ours, {**os.environ, **quiet, **ours_env}),
    }


@contextlib.contextmanager
def running_servers(log_dir: Path) -> Iterator[dict[str, str]]:
    """Start every server, wait until each answers, yield their base URLs, and stop them all."""
    ports = {name: free_port() for name in ("fastapi", "ours")}
    with contextlib.ExitStack() as stack:
        for name, (argv, env) in server_commands(ports).items():
            log = stack.enter_context(open(log_dir / f"{name}.log", "wb"))
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            stack.callback(stop, process)
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for target in TARGETS:
            log = log_dir / f"{target.server}.log"
            wait_until_answering(urls[target.server] + target.path, target.body, log)
        yield urls


def free_port() -> int:
    """A TCP port on loopback that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """Stop a server gracefully, or kill it when it does not stop in time."""
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def post(url: str, body: bytes, timeout_s: float = 5) -> dict:
    """POST a JSON body and answer the decoded JSON reply."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def wait_until_answering(url: str, body: bytes, log: Path, timeout_s: float = 60) -> None:
    """Poll `url` until it answers a prediction; fail with the server's log when it does not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            post(url, body)
            return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:]
    raise SystemExit(f"{url} did not answer within {timeout_s} s; server log:\n{tail}")


def probabilities(target: Target, answer: dict) -> list[float]:
    """The class probabilities of the single row in a target's answer."""
    if target.name == "fastapi":
        return answer["probabilities"][0]
    if target.name == "ours-v1":
        return answer["predictions"][0]["probabilities"]
    (output,) = [o for o in answer["outputs"] if o["name"] == "probabilities"]
    return output["data"][:3]


def check_answers(urls: dict[str, str], expected: np.ndarray) -> None:
    """Make sure every target answers what onnxruntime computes in-process, so no error page gets timed."""
    for target in TARGETS:
        got = probabilities(target, post(urls[target.server] + target.path, target.body))
        if not np.allclose(got, expected, atol=1e-5):
            raise SystemExit(f"{target.name} answered probabilities {got}, onnxruntime computes {expected}")


# --- in-process onnxruntime ----------------------------------------------------------------------------


class InProcess:
    """The iris session called directly, one row per call, on one intra-op thread."""

    def __init__(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(MODEL), options, providers=["CPUExecutionProvider"])
        self.feeds = {"features": np.asarray([ROW], dtype=np.float32)}

    def probabilities(self) -> np.ndarray:
        """The class probabilities of the benchmark's row."""
        return self.session.run(["probabilities"], self.feeds)[0][0]

    def measure(self, duration_s: float) -> Sample:
        """Call the session back to back for `duration_s` seconds."""
        run, feeds, clock = self.session.run, self.feeds, time.perf_counter_ns
        times: list[int] = []
        start = clock()
        deadline = start + int(duration_s * 1e9)
        while (now := clock()) < deadline:
            run(None, feeds)
            times.append(clock() - now)
        return summarise(times, (clock() - start) / 1e9)


def summarise(latencies_ns: list[int], elapsed_s: float, errors: int = 0) -> Sample:
    """Throughput and nearest-rank p50/p99 of a list of latencies."""
    ordered = sorted(latencies_ns)
    if not ordered:
        return Sample(0.0, float("nan"), float("nan"), 0, errors)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e6

    return Sample(len(ordered) / elapsed_s, rank(0.50), rank(0.99), len(ordered), errors)


# --- load generators -----------------------------------------------------------------------------------

WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = {body}
"""
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def ensure_wrk(may_install: bool) -> str | None:
    """The path of `wrk`, installing Debian's package first when allowed and running as root."""
    found = shutil.which("wrk")
    if found or not may_install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("wrk is missing: installing it with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        subprocess.run(install, env=env, capture_output=True)
    return shutil.which("wrk")


def wrk_generator(wrk: str, script_dir: Path, threads: int) -> Generator:
    """A load generator running `wrk --latency` with a Lua script that POSTs the body."""

    def run(url: str, body: bytes, concurrency: int, duration_s: int) -> Sample:
        script = script_dir / f"post-{abs(hash(body))}.lua"
        script.write_text(WRK_SCRIPT.format(body=json.dumps(body.decode())))
        argv = [wrk, "--latency", "-t", str(min(threads, concurrency)), "-c", str(concurrency),
                "-d", f"{duration_s:g}s", "--timeout", "10s", "-s", str(script), url]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        return parse_wrk(done.stdout)

    return run


def parse_wrk(output: str) -> Sample:
    """Read req/s, p50, p99, the request count and the errors from wrk's `--latency` report."""
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)\s*$", output, re.M))
    if set(percentiles) != {"50", "99"}:
        raise RuntimeError(f"wrk printed no latency distribution:\n{output}")
    requests = int(re.search(r"(\d+) requests in", output).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = (int(non_2xx.group(1)) if non_2xx else 0) + (sum(map(int, sockets.groups())) if sockets else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    return Sample(rps, to_ms(percentiles["50"]), to_ms(percentiles["99"]), requests, errors)


def to_ms(text: str) -> float:
    """Convert one of wrk's durations (`431.00us`, `1.20ms`, `2.00s`) to milliseconds."""
    value, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()
    return float(value) * UNITS_MS[unit]


class _Connection:
    """One keep-alive connection of the Python generator, with one request in flight."""

    def __init__(self, address: tuple[str, int], request: bytes) -> None:
        self.sock = socket.create_connection(address)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request, self.buffer, self.sent_ns = request, b"", 0

    def send(self) -> None:
        """Send the request and note when."""
        self.sent_ns = time.perf_counter_ns()
        self.sock.sendall(self.request)

    def receive(self) -> int | None:
        """Read what has arrived; answer the status once a whole response is in, else None."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed a keep-alive connection")
        self.buffer += chunk
        head_end = self.buffer.find(b"\r\n\r\n")
        if head_end < 0:
            return None
        head = self.buffer[:head_end].decode("latin-1")
        length = re.search(r"(?im)^content-length:\s*(\d+)", head)
        if length is None:
            raise ConnectionError("a response without Content-Length; the Python generator cannot read it")
        end = head_end + 4 + int(length.group(1))
        if len(self.buffer) < end:
            return None
        self.buffer = self.buffer[end:]
        return int(head.split(" ", 2)[1])


def python_generator(url: str, body: bytes, concurrency: int, duration_s: int) -> Sample:
    """A load generator in pure Python: one thread, non-blocking sockets, `concurrency` connections."""
    parts = urlsplit(url)
    request = (f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    connections = [_Connection((parts.hostname, parts.port), request) for _ in range(concurrency)]
    latencies: list[int] = []
    errors = 0
    with selectors.DefaultSelector() as selector:
        for connection in connections:
            selector.register(connection.sock, selectors.EVENT_READ, connection)
        start = time.perf_counter_ns()
        deadline = start + int(duration_s * 1e9)
        for connection in connections:
            connection.send()
        while time.perf_counter_ns() < deadline:
            for key, _ in selector.select(timeout=0.1):
                connection = key.data
                status = connection.receive()
                if status is None:
                    continue
                now = time.perf_counter_ns()
                latencies.append(now - connection.sent_ns)
                errors += not 200 <= status < 400
                if now < deadline:
                    connection.send()
        elapsed = (time.perf_counter_ns() - start) / 1e9
    for connection in connections:
        connection.sock.close()
    return summarise(latencies, elapsed, errors)


# --- the run -------------------------------------------------------------------------------------------


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


def key(target: str, concurrency: int) -> str:
    """The name of one measured point, e.g. `ours-v1@c16`."""
    return f"{target}@c{concurrency}"


def medians(samples: dict[str, list[Sample]]) -> dict[str, dict[str, float]]:
    """The median of each figure of each point across rounds, plus the errors summed."""
    return {
        name: {
            "rps": statistics.median(s.rps for s in runs),
            "p50_ms": statistics.median(s.p50_ms for s in runs),
            "p99_ms": statistics.median(s.p99_ms for s in runs),
            "errors": sum(s.errors for s in runs),
        }
        for name, runs in samples.items()
    }


def ratios(samples: dict[str, list[Sample]], concurrencies: list[int]) -> dict[str, dict[str, float]]:
    """Each of our routes against the baseline, as the median of the ratios taken round by round."""
    out = {}
    for target in (t for t in TARGETS if t.name != BASELINE):
        for c in concurrencies:
            ours, base = samples[key(target.name, c)], samples[key(BASELINE, c)]
            out[key(target.name, c)] = {
                "throughput": statistics.median(o.rps / b.rps for o, b in zip(ours, base, strict=True)),
                "p99": statistics.median(o.p99_ms / b.p99_ms for o, b in zip(ours, base, strict=True)),
            }
    return out


def overheads(summary: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """What each server adds to a bare onnxruntime call, at p50 and p99, in milliseconds."""
    bare = summary["inprocess"]
    return {
        name: {"p50_ms": point["p50_ms"] - bare["p50_ms"], "p99_ms": point["p99_ms"] - bare["p99_ms"]}
        for name, point in summary.items() if name != "inprocess"
    }


# --- reporting -----------------------------------------------------------------------------------------


def rows(summary: dict[str, dict[str, float]], found: dict[str, dict[str, float]],
         concurrencies: list[int]) -> list[list[str]]:
    """The result table's rows: server, concurrency, req/s, p50, p99, and the ratios to the baseline."""
    bare = summary["inprocess"]
    table = [["onnxruntime in-process (1 thread)", "-", f"{bare['rps']:.0f} calls/s",
              f"{bare['p50_ms']:.4f}", f"{bare['p99_ms']:.4f}", "", ""]]
    for c in concurrencies:
        for target in TARGETS:
            point = summary[key(target.name, c)]
            ratio = found.get(key(target.name, c), {"throughput": 1.0, "p99": 1.0})
            table.append([
                target.title, str(c), f"{point['rps']:.0f}", f"{point['p50_ms']:.2f}",
                f"{point['p99_ms']:.2f}", f"{ratio['throughput']:.2f}x", f"{ratio['p99']:.2f}x",
            ])
    return table


HEADER = ["server", "c", "req/s", "p50 ms", "p99 ms", "req/s vs FastAPI", "p99 vs FastAPI"]


def text_table(table: list[list[str]]) -> str:
    """Align the rows in columns for a terminal."""
    widths = [max(len(r[i]) for r in [HEADER, *table]) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w)
                               in enumerate(zip(row, widths, strict=True))) for row in [HEADER, *table])


def markdown_table(table: list[list[str]]) -> str:
    """The same rows as a Markdown table, ready to paste into the docs."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table])


def verdicts(found: dict[str, dict[str, float]], overhead: dict[str, dict[str, float]]) -> list[str]:
    """One line per point: the ratios against their targets, and the overhead over bare onnxruntime."""
    lines = []
    for name, ratio in found.items():
        fast = "met" if ratio["throughput"] >= 1.25 else "SHORT"
        tail = "met" if ratio["p99"] <= 1.0 else "SHORT"
        over = overhead[name]
        lines.append(f"{name:<12} throughput {ratio['throughput']:.2f}x FastAPI (target >= 1.25x: {fast}); "
                     f"p99 {ratio['p99']:.2f}x FastAPI's (target <= 1.00x: {tail}); over in-process "
                     f"onnxruntime +{over['p50_ms']:.3f} ms p50, +{over['p99_ms']:.3f} ms p99")
    base = {n: o for n, o in overhead.items() if n.startswith(BASELINE + "@")}
    lines += [f"{name:<12} over in-process onnxruntime +{o['p50_ms']:.3f} ms p50, +{o['p99_ms']:.3f} ms p99"
              for name, o in base.items()]
    return lines


def warnings(summary: dict[str, dict[str, float]]) -> list[str]:
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


def save(document: dict, when: datetime.datetime) -> Path:
    """Write the results as JSON to bench/results/http-<date>.json and answer the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"http-{when:%Y-%m-%d}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="whole seconds per point (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds, for medians (default 3)")
    parser.add_argument("--concurrency", type=_int_list, default=[1, 16],
                        help="comma-separated connection counts (default 1,16)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per route (default 1)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator: wrk, the Python one, or wrk when available (default)")
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


INSTALL_WRK = "run `sudo apt-get install wrk` on Debian or Ubuntu"


def pick_generator(args: argparse.Namespace, script_dir: Path) -> tuple[Generator, str]:
    """The load generator to use and how to name it in the results."""
    wrk = None if args.generator == "python" else ensure_wrk(not args.no_install)
    if wrk:
        version = subprocess.run([wrk, "--version"], capture_output=True, text=True).stdout.split(" [")[0]
        return wrk_generator(wrk, script_dir, args.wrk_threads), f"{version} ({args.wrk_threads} thread(s))"
    if args.generator == "wrk":
        raise SystemExit(f"wrk is not installed: {INSTALL_WRK}, and try again")
    if args.generator == "auto":
        print(f"wrk is not installed ({INSTALL_WRK}): falling back to the Python load generator, "
              "which competes with the servers for the cores", flush=True)
    return python_generator, "python (one thread, raw sockets; takes CPU from the servers, figures are low)"


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the tables and write the JSON results."""
    args = parse_args(argv)
    when = datetime.datetime.now().astimezone()
    inprocess = InProcess()
    with tempfile.TemporaryDirectory(prefix="bench-http-") as scratch:
        generate, generator = pick_generator(args, Path(scratch))
        print(f"generator: {generator}; {args.rounds} rounds x {args.duration} s per point; concurrency "
              f"{args.concurrency}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}", flush=True)
        with running_servers(Path(scratch)) as urls:
            check_answers(urls, inprocess.probabilities())
            samples = measure(args, generate, urls, inprocess)
    summary = medians(samples)
    found = ratios(samples, args.concurrency)
    overhead = overheads(summary)
    table = rows(summary, found, args.concurrency)
    print(f"\nmedians of {args.rounds} rounds x {args.duration} s, generator {generator}\n")
    print(text_table(table) + "\n")
    print("\n".join(verdicts(found, overhead) + warnings(summary)) + "\n")
    print(markdown_table(table) + "\n")
    document = {
        "date": when.isoformat(timespec="seconds"), "settings": {**vars(args), "workers": WORKERS},
        "environment": environment(generator), "summary": summary, "ratios": found, "overhead": overhead,
        "samples": {name: [asdict(s) for s in runs] for name, runs in samples.items()},
    }
    print(f"results written to {save(document, when).relative_to(ROOT)}")


if __name__ == "__main__":
    main()
