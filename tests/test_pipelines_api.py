"""The sync-async pattern: the light model's answer now, the heavy model's job to poll."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sklearn.datasets import load_digits

from models import Registry, Settings
from models.config import PACKAGE_DIR
from samples import error_of
from webapp import create_app

ROWS = {"instances": load_digits().data[:3].tolist()}


def test_light_answer_now_and_heavy_job_later(eager_client: FlaskClient):
    response = eager_client.post("/v1/pipelines/digits:predict", json=ROWS)
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["light"]["result"] == eager_client.post("/v1/models/digits-light:predict", json=ROWS).get_json()
    heavy = body["heavy"]
    assert response.headers["Location"] == heavy["status_url"]
    job = eager_client.get(heavy["status_url"]).get_json()
    assert (job["model"], job["status"]) == ("digits-heavy", "succeeded")
    assert job["result"] == eager_client.post("/v1/models/digits-heavy:predict", json=ROWS).get_json()


@pytest.fixture
def broken_light_repo(tmp_path: Path) -> Path:
    """digits-heavy as committed, digits-light with a corrupt artefact, and the digits pipeline."""
    for name in ("digits-heavy", "digits-light", "digits"):
        shutil.copytree(PACKAGE_DIR / name, tmp_path / name)
    (tmp_path / "digits-light" / "1" / "model.onnx").write_bytes(b"not onnx")
    return tmp_path


def test_a_failing_light_model_still_queues_the_heavy_job(broken_light_repo: Path,
                                                         make_eager_app: Callable[..., Flask]):
    client = make_eager_app(models_dir=broken_light_repo).test_client()
    response = client.post("/v1/pipelines/digits:predict", json=ROWS)
    assert response.status_code == 202
    body = response.get_json()
    assert "cannot serve" in body["light"]["error"] and "result" not in body["light"]
    assert client.get(body["heavy"]["status_url"]).get_json()["status"] == "succeeded"


def test_queue_down_still_answers_the_light_model():
    client = create_app({"TESTING": True, "redis_url": "redis://127.0.0.1:1/0"}).test_client()
    response = client.post("/v1/pipelines/digits:predict", json=ROWS)
    assert response.status_code == 200
    body = response.get_json()
    assert "unavailable" in body["heavy"]["error"] and "job_id" not in body["heavy"]
    assert len(body["light"]["result"]["predictions"]) == 3


def test_neither_part_answering_is_503(broken_light_repo: Path):
    client = create_app({"TESTING": True, "redis_url": "redis://127.0.0.1:1/0",
                         "models_dir": broken_light_repo}).test_client()
    response = client.post("/v1/pipelines/digits:predict", json=ROWS)
    assert response.status_code == 503
    assert set(response.get_json()["heavy"]) >= {"error"} and "error" in response.get_json()["light"]


def test_bad_input_and_unknown_pipeline_are_refused(eager_client: FlaskClient):
    assert "shape" in error_of(eager_client.post("/v1/pipelines/digits:predict", json={"instances": [[1, 2]]}), 400)
    assert "no pipeline" in error_of(eager_client.post("/v1/pipelines/nope:predict", json=ROWS), 404)


@pytest.mark.parametrize(("text", "field"), [
    ('light = "digits-light"\nheavy = "nope"\n', "heavy"),
    ('light = "iris"\nheavy = "digits-heavy"\n', "heavy"),
    ('light = "digits-light"\n', "heavy"),
    ('light = "digits-light"\nheavy = "digits-heavy"\nextra = 1\n', "extra"),
])
def test_a_broken_pipeline_spec_is_reported_naming_its_field(tmp_path: Path, text: str, field: str):
    for name in ("digits-heavy", "digits-light", "iris"):
        shutil.copytree(PACKAGE_DIR / name, tmp_path / name)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pipeline.toml").write_text(text)
    registry = Registry(Settings(models_dir=tmp_path))
    assert registry.pipelines() == []
    message = registry.problems[str(tmp_path / "bad" / "pipeline.toml")]
    assert "pipeline.toml" in message and field in message


def test_the_catalogue_lists_the_pipeline_and_its_members_pattern(eager_client: FlaskClient):
    catalogue = eager_client.get("/v1/models").get_json()
    expected = {"name": "digits", "light": "digits-light", "heavy": "digits-heavy"}
    assert expected.items() <= catalogue["pipelines"][0].items()
    patterns = {m["name"]: m["patterns"] for m in catalogue["models"]}
    assert "sync-async" in patterns["digits-heavy"] and "sync-async" not in patterns["iris"]
