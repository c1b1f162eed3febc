"""The HTTP points under load, each one's single-row body and answer, and the comparisons drawn between them."""

from __future__ import annotations

import json
from dataclasses import dataclass

ROW = [5.1, 3.5, 1.4, 0.2]
OLD_BUILD = "da72eb5"
"""The build before the web tier's redesign, measured beside the current one."""
MLSERVER_VERSION = "1.7.1"
CONTRACT_CONCURRENCY = 16
"""The concurrency the targets are judged at; the others are reported alongside."""
FASTAPI_BODY = json.dumps({"data": [ROW]}).encode()
V1_PATH, V1_BODY = "/v1/models/iris:predict", json.dumps({"instances": [ROW]}).encode()
V2_PATH = "/v2/models/iris/infer"
V2_BODY = json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}).encode()


@dataclass(frozen=True)
class Target:
    """One HTTP route under load: the server that answers it, its single-row body, and the shape of its answer."""

    name: str
    title: str
    server: str
    path: str
    body: bytes
    answer: str
    """How the answer carries the probabilities: `fastapi`, `v1`, `v2`, or `floor` (a fixed body)."""


@dataclass(frozen=True)
class Comparison:
    """One route's throughput and p99 against another's, round by round, with the targets it is held to."""

    ours: str
    reference: str
    title: str
    """What the comparison measures, as the tables show it."""
    min_throughput: float | None = None
    max_p99: float | None = None

    @property
    def name(self) -> str:
        return f"{self.ours} / {self.reference}"


TARGETS = (
    Target("floor", "loopback floor (no-op ASGI)", "floor", "/", FASTAPI_BODY, "floor"),
    Target("fastapi", "FastAPI + onnxruntime", "fastapi", "/predict", FASTAPI_BODY, "fastapi"),
    Target("mlserver", f"MLServer {MLSERVER_VERSION}, V2 /infer", "mlserver", V2_PATH, V2_BODY, "v2"),
    Target("ours-v1", "ours (defaults), :predict", "ours", V1_PATH, V1_BODY, "v1"),
    Target("ours-v2", "ours (defaults), V2 /infer", "ours", V2_PATH, V2_BODY, "v2"),
    Target("bare-v1", "all off, :predict", "bare", V1_PATH, V1_BODY, "v1"),
    Target("bare-v2", "all off, V2 /infer", "bare", V2_PATH, V2_BODY, "v2"),
    Target("full-v1", "all on, :predict", "full", V1_PATH, V1_BODY, "v1"),
    Target("full-v2", "all on, V2 /infer", "full", V2_PATH, V2_BODY, "v2"),
    Target("h11-v1", "ours (defaults), :predict, h11", "h11", V1_PATH, V1_BODY, "v1"),
    Target("old-v1", f"old build {OLD_BUILD}, :predict", "old", V1_PATH, V1_BODY, "v1"),
    Target("old-v2", f"old build {OLD_BUILD}, V2 /infer", "old", V2_PATH, V2_BODY, "v2"),
)
"""`ours` is the platform as shipped (metrics on, API keys `auto`: off on loopback without keys, no prediction
log); `bare` has keys and metrics off; `full` has keys and metrics on and logs 1% of iris predictions."""
COMPARISONS = (
    Comparison("ours-v1", "fastapi", "ours :predict / FastAPI", min_throughput=1.0, max_p99=1.0),
    Comparison("ours-v2", "fastapi", "ours /infer / FastAPI", min_throughput=1.0, max_p99=1.0),
    Comparison("ours-v1", "mlserver", "ours :predict / MLServer", min_throughput=3.0),
    Comparison("ours-v2", "mlserver", "ours /infer / MLServer", min_throughput=3.0),
    Comparison("full-v1", "bare-v1", "all on / all off, :predict", min_throughput=0.9),
    Comparison("full-v2", "bare-v2", "all on / all off, /infer", min_throughput=0.9),
    Comparison("ours-v1", "bare-v1", "ours (metrics on) / all off, :predict"),
    Comparison("ours-v1", "h11-v1", "ours :predict, httptools / h11"),
    Comparison("bare-v1", "old-v1", "all off / old build, :predict"),
    Comparison("bare-v2", "old-v2", "all off / old build, /infer"),
)
SERVERS = tuple(dict.fromkeys(t.server for t in TARGETS))


def chosen(skip: set[str]) -> tuple[tuple[Target, ...], tuple[Comparison, ...]]:
    """The targets of the servers not skipped, and the comparisons both of whose sides remain."""
    targets = tuple(t for t in TARGETS if t.server not in skip)
    names = {t.name for t in targets}
    return targets, tuple(c for c in COMPARISONS if {c.ours, c.reference} <= names)


def key(target: str, concurrency: int) -> str:
    """The name of one measured point, e.g. `ours-v1@c16`."""
    return f"{target}@c{concurrency}"


def probabilities(target: Target, answer: dict) -> list[float]:
    """The class probabilities of the single row in a predicting target's answer."""
    if target.answer == "fastapi":
        return answer["probabilities"][0]
    if target.answer == "v1":
        return answer["predictions"][0]["probabilities"]
    (output,) = [o for o in answer["outputs"] if o["name"] == "probabilities"]
    return output["data"][:3]
