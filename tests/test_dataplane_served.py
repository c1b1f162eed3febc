"""The data plane's seams: what its observers are told, and how traffic and guards steer it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import pytest
from flask import Flask

import models
from webapp.errors import RequestError
from webapp.served import Served

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]}


@pytest.fixture
def seen(app: Flask) -> list[Served]:
    """What the app's data plane serves, as an observer is told it."""
    told: list[Served] = []
    app.extensions["dataplane"].observers.append(told.append)
    return told


def test_an_observer_is_told_each_request_with_its_stages(app: Flask, seen: list[Served]):
    client = app.test_client()
    answered = client.post("/v1/models/iris:predict", json=IRIS, headers={"X-Request-ID": "req-1"})
    assert answered.status_code == 200
    (served,) = seen
    assert (served.model, served.version, served.protocol, served.status) == ("iris", 1, "tfserving", 200)
    assert served.request_id == "req-1" and served.rows == 2 and served.cache is None
    assert {"decode", "predict", "encode"} <= set(served.stages) and all(t >= 0 for t in served.stages.values())
    assert list(served.outputs["label"]) == [0, 2]
    client.post("/v2/models/iris/infer", json={"inputs": [{"name": "features"}]})
    refused = seen[-1]
    assert (refused.protocol, refused.status, refused.outputs) == ("v2", 400, None)


def test_a_failing_observer_never_fails_the_request(app: Flask, seen: list[Served]):
    def broken(served: Served) -> None:
        raise RuntimeError("observer bug")

    app.extensions["dataplane"].observers.insert(0, broken)
    assert app.test_client().post("/v1/models/iris:predict", json=IRIS).status_code == 200
    assert seen[0].status == 200  # the observers after it are still told


def test_traffic_chooses_the_version_and_a_guard_may_refuse(app: Flask, seen: list[Served]):
    plane = app.extensions["dataplane"]

    class ToSetosa:
        def choose(self, name: str, version: int | None, headers: Mapping[str, str]) -> tuple[str, int | None]:
            return ("iris-setosa", None) if headers.get("x-arm") == "b" else (name, version)

    class Full:
        @contextlib.contextmanager
        def admit(self, found: models.ModelVersion) -> Iterator[models.ModelVersion]:
            error = RequestError(f"model {found.name!r} is at its limit")
            error.status, error.headers = 429, {"Retry-After": "1"}
            raise error
            yield found

    plane.traffic = ToSetosa()
    client = app.test_client()
    assert client.post("/v1/models/iris:predict", json=IRIS, headers={"X-Arm": "b"}).status_code == 200
    assert seen[-1].model == "iris-setosa"
    plane.guard = Full()
    refused = client.post("/v1/models/iris:predict", json=IRIS)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert "at its limit" in refused.get_json()["error"] and seen[-1].status == 429
