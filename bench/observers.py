"""What the metrics observer adds to a synchronous prediction, in process: `DataPlane.respond` on a one-row `iris`
`:predict` with no observer (the baseline) and with the metrics' `webapp.tally.Tally`, in interleaved rounds; and
one observer call alone, on a record `respond` made.

The tally writes its totals to a file as under gunicorn: the run sets PROMETHEUS_MULTIPROC_DIR to a scratch
directory, deleted after. Keys are off, the cache is not involved (iris has
none). Prints the medians over the rounds, in microseconds, and the ratio. Run it as a module from the
repository root (`python -m bench.observers --help`); it needs Redis and the SQL store only as the app does
(`REDIS_URL`, `DATABASE_URL`), and sends them nothing on this path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import timeit
from pathlib import Path

from bench.targets import ROW


def main() -> None:
    """Measure, print the medians and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=10_000, help="respond() calls a round, per variant")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="bench-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory  # before prometheus-client's import, which reads it
    try:
        report(*measure(args.rounds, args.calls))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def measure(rounds: int, calls: int) -> tuple[list[float], list[float], float]:
    """Seconds a call of respond() took, per round, without and with the observer; and one observer call's."""
    from webapp import close_app, create_app
    from webapp.dataplane import Call
    from webapp.metrics import SECONDS
    from webapp.tally import Tally

    app = create_app({"api_keys": "off"})
    plane, observer = app.extensions["dataplane"], Tally(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]), SECONDS)
    route = plane.route("/v1/models/iris:predict")
    call = Call("POST", b'{"instances": [%s]}' % str(ROW).encode(), "application/json")
    served = []
    plane.observers[:] = [served.append]
    plane.respond(route, call, plane.inline(route, call))
    respond = lambda: plane.respond(route, call, plane.inline(route, call))  # noqa: E731
    without, with_ = [], []
    for _ in range(rounds):
        plane.observers[:] = []
        without.append(timeit.timeit(respond, number=calls) / calls)
        plane.observers[:] = [observer]
        with_.append(timeit.timeit(respond, number=calls) / calls)
    alone = min(timeit.repeat(lambda: observer(served[0]), number=calls, repeat=rounds)) / calls
    observer.close()
    close_app(app)
    return without, with_, alone


def report(without: list[float], with_: list[float], alone: float) -> None:
    """Print the medians in microseconds and the median of the rounds' ratios."""
    ratios = [w / b for b, w in zip(without, with_, strict=True)]
    print(f"respond(), no observer: {statistics.median(without) * 1e6:.1f} us")
    print(f"respond(), metrics observer: {statistics.median(with_) * 1e6:.1f} us "
          f"({statistics.median(ratios):.3f}x, rounds {min(ratios):.3f}-{max(ratios):.3f}x)")
    print(f"one observer call alone (best round): {alone * 1e6:.1f} us")


if __name__ == "__main__":
    main()
