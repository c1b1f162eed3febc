"""The HTTP points under load: the server and route of each, its single-row body, and its answer."""

from __future__ import annotations

import json
from dataclasses import dataclass

ROW = [5.1, 3.5, 1.4, 0.2]
BASELINE = "fastapi"
FLOOR = "floor"


@dataclass(frozen=True)
class Target:
    """One HTTP route under load: which server answers it and the single-row body it is sent."""

    name: str
    title: str
    server: str
    path: str
    body: bytes


TARGETS = (
    Target(FLOOR, "loopback floor (no-op)", "floor", "/", json.dumps({"data": [ROW]}).encode()),
    Target(BASELINE, "FastAPI + onnxruntime", "fastapi", "/predict", json.dumps({"data": [ROW]}).encode()),
    Target("ours-v1", "ours, TF Serving :predict", "ours", "/v1/models/iris:predict",
           json.dumps({"instances": [ROW]}).encode()),
    Target("ours-v2", "ours, V2 /infer (JSON)", "ours", "/v2/models/iris/infer",
           json.dumps({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": ROW}]})
           .encode()),
)
SERVERS = tuple(dict.fromkeys(t.server for t in TARGETS))
OURS = tuple(t for t in TARGETS if t.name not in (BASELINE, FLOOR))
PREDICTING = tuple(t for t in TARGETS if t.name != FLOOR)


def key(target: str, concurrency: int) -> str:
    """The name of one measured point, e.g. `ours-v1@c16`."""
    return f"{target}@c{concurrency}"


def probabilities(target: Target, answer: dict) -> list[float]:
    """The class probabilities of the single row in a predicting target's answer."""
    if target.name == BASELINE:
        return answer["probabilities"][0]
    if target.name == "ours-v1":
        return answer["predictions"][0]["probabilities"]
    (output,) = [o for o in answer["outputs"] if o["name"] == "probabilities"]
    return output["data"][:3]
