"""Versions come and go while the app serves; a request keeps the version it started with."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient

import models
from models import Registry, Settings

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.3, 3.3, 6.0, 2.5]


def put_artefact(folder: Path, data: bytes) -> None:
    """Write a version's model.onnx the way a deployment should: to a temporary name, then rename."""
    folder.mkdir(exist_ok=True)
    scratch = folder / "model.onnx.partial"
    scratch.write_bytes(data)
    os.replace(scratch, folder / "model.onnx")


def add_version(repo: Path, number: int) -> None:
    """Add a version of iris holding a copy of version 1's artefact."""
    put_artefact(repo / "iris" / str(number), (repo / "iris" / "1" / "model.onnx").read_bytes())


def listed_versions(client: FlaskClient) -> list[str]:
    """The versions GET /v1/models/iris reports as AVAILABLE."""
    response = client.get("/v1/models/iris")
    assert response.status_code == 200
    return [v["version"] for v in response.json["model_version_status"] if v["state"] == "AVAILABLE"]


def default_version(client: FlaskClient) -> str:
    """The version a request that names none is served by."""
    response = client.get("/v1/models/iris/metadata")
    assert response.status_code == 200
    return response.json["model_spec"]["version"]


def predict(client: FlaskClient, path: str) -> list[str]:
    """Predicted species for a setosa and a virginica through `path`."""
    response = client.post(path, json={"instances": [SETOSA, VIRGINICA]})
    assert response.status_code == 200, response.json
    return [row["label_name"] for row in response.json["predictions"]]


def test_new_version_is_served_without_restart(repo: Path, repo_client: FlaskClient) -> None:
    assert listed_versions(repo_client) == ["1"]
    assert default_version(repo_client) == "1"
    add_version(repo, 2)
    assert listed_versions(repo_client) == ["1", "2"]
    assert default_version(repo_client) == "2"
    for path in ("/v1/models/iris:predict", "/v1/models/iris/versions/1:predict",
                 "/v1/models/iris/versions/2:predict"):
        assert predict(repo_client, path) == ["setosa", "virginica"]
    infer = repo_client.post("/v2/models/iris/infer", json={
        "inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": SETOSA}],
    })
    assert infer.status_code == 200
    assert infer.json["model_version"] == "2"


def test_pinned_default_version_stays(repo: Path, repo_client: FlaskClient) -> None:
    spec = repo / "iris" / "model.toml"
    spec.write_text("default_version = 1\n" + spec.read_text())
    add_version(repo, 2)
    assert listed_versions(repo_client) == ["1", "2"]
    assert default_version(repo_client) == "1"
    assert predict(repo_client, "/v1/models/iris/versions/2:predict") == ["setosa", "virginica"]


def test_removed_version_is_not_found(repo: Path, repo_client: FlaskClient) -> None:
    add_version(repo, 2)
    assert default_version(repo_client) == "2"
    shutil.rmtree(repo / "iris" / "2")
    response = repo_client.post("/v1/models/iris/versions/2:predict", json={"instances": [SETOSA]})
    assert response.status_code == 404
    assert "version 2" in response.json["error"]
    assert repo_client.get("/v1/models/iris/versions/2").status_code == 404
    assert listed_versions(repo_client) == ["1"]
    assert default_version(repo_client) == "1"


def test_request_in_flight_keeps_its_version(repo: Path) -> None:
    registry = Registry(Settings(models_dir=repo, reload_interval_s=0.0))
    features = {"features": np.array([SETOSA, VIRGINICA], np.float32)}
    started = registry.get("iris")
    before = models.predict(started, features)
    put_artefact(repo / "iris" / "1", b"not an ONNX model: version 1 was overwritten")
    add_version(repo, 3)
    assert registry.get("iris").number == 3
    replaced = registry.get("iris", 1)
    assert replaced is not started
    with pytest.raises(models.ModelNotReady):
        models.predict(replaced, features)
    after = models.predict(started, features)
    assert started.number == 1
    np.testing.assert_array_equal(after["label"], before["label"])
    np.testing.assert_array_equal(after["probabilities"], before["probabilities"])
    assert list(after["label_name"]) == ["setosa", "virginica"]


def test_removed_version_object_still_serves(repo: Path) -> None:
    registry = Registry(Settings(models_dir=repo, reload_interval_s=0.0))
    add_version(repo, 2)
    started = registry.get("iris")
    assert started.number == 2
    models.predict(started, {"features": np.array([SETOSA], np.float32)})
    shutil.rmtree(repo / "iris" / "2")
    assert registry.get("iris").number == 1
    outputs = models.predict(started, {"features": np.array([VIRGINICA], np.float32)})
    assert started.number == 2
    assert list(outputs["label_name"]) == ["virginica"]


def test_reload_interval_throttles_rescans(repo: Path) -> None:
    registry = Registry(Settings(models_dir=repo, reload_interval_s=3600.0))
    first = registry.get("iris")
    assert first.number == 1
    add_version(repo, 2)
    assert registry.get("iris") is first
    assert list(registry.model("iris").versions) == [1]
    registry.refresh(force=True)
    assert registry.get("iris").number == 2
    assert registry.get("iris", 1) is first
