"""The horizontal-microservice pattern in eager mode over the real Redis: fan-out, aggregates, failures."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flask import Flask
from flask.testing import FlaskClient
from sklearn.datasets import load_iris

from models import Registry, Settings, ensemble
from models.config import PACKAGE_DIR
from samples import error_of
from tasks import resources

MEMBERS = ("iris-setosa", "iris-versicolor", "iris-virginica")


def test_best_of_one_vs_rest_members_names_the_species(eager_client: FlaskClient):
    iris = load_iris()
    rows = iris.data[::5].tolist()
    response = eager_client.post("/v1/ensembles/iris-ovr:predict", json={"instances": rows})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["failed"], body["timed_out"]) == ([], [])
    names = [p["label"] for p in body["predictions"]]
    truth = [iris.target_names[t] for t in iris.target[::5]]
    assert np.mean(np.array(names) == np.array(truth)) >= 0.9
    for member in MEMBERS:
        expected = eager_client.post(f"/v1/models/{member}:predict", json={"instances": rows}).get_json()
        assert body["members"][member] == {"status": "succeeded", "result": expected}
    best = body["predictions"][0]
    member_scores = {m: body["members"][m]["result"]["predictions"][0]["probabilities"][1] for m in MEMBERS}
    assert best["member"] == max(member_scores, key=member_scores.get)
    assert best["score"] == pytest.approx(max(member_scores.values()), rel=1e-6)


@pytest.fixture
def repo_with_a_broken_member(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in (*MEMBERS, "iris-ovr"):
        shutil.copytree(PACKAGE_DIR / name, tmp_path / name)
    (tmp_path / "iris-virginica" / "1" / "model.onnx").write_bytes(b"broken")
    monkeypatch.setattr(resources, "_registry", Registry(Settings(models_dir=tmp_path)))  # the eager worker's
    return tmp_path


def test_a_failing_member_gives_a_partial_answer_not_an_error(repo_with_a_broken_member: Path,
                                                              make_eager_app: Callable[..., Flask]):
    client = make_eager_app(models_dir=repo_with_a_broken_member).test_client()
    response = client.post("/v1/ensembles/iris-ovr:predict", json={"instances": [[6.3, 3.3, 6.0, 2.5]]})
    assert response.status_code == 200
    body = response.get_json()
    assert body["failed"] == ["iris-virginica"] and "cannot serve" in body["members"]["iris-virginica"]["error"]
    assert body["predictions"][0]["member"] in ("iris-setosa", "iris-versicolor")


def test_bad_input_and_unknown_ensemble_are_refused(eager_client: FlaskClient):
    assert "shape" in error_of(eager_client.post("/v1/ensembles/iris-ovr:predict", json={"instances": [[1]]}), 400)
    assert "no ensemble" in error_of(eager_client.post("/v1/ensembles/nope:predict", json={"instances": [[1]]}), 404)


def spec(aggregate: str, members: tuple[str, ...] = ("a", "b", "c")) -> ensemble.EnsembleSpec:
    return ensemble.EnsembleSpec("e", Path("e"), "", members, aggregate, 1.0, 2.0)


def test_aggregates():
    labels = {m: ("other", m) for m in "abc"}
    scores = {"a": np.float32([[0.9, 0.1], [0.2, 0.8]]), "b": np.float32([[0.3, 0.7], [0.6, 0.4]]),
              "c": np.float32([[0.5, 0.5], [0.1, 0.9]])}
    assert [(r["label"], r["member"]) for r in ensemble.combine(spec("best"), labels, scores)] == [("b", "b"),
                                                                                                   ("c", "c")]
    shared = {m: ("x", "y") for m in "abc"}
    mean = ensemble.combine(spec("mean"), shared, scores)
    assert [r["label"] for r in mean] == ["x", "y"] and mean[0]["score"] == pytest.approx(1.7 / 3, rel=1e-6)
    vote = ensemble.combine(spec("vote"), shared, scores)
    assert [(r["label"], r["score"]) for r in vote] == [("x", pytest.approx(2 / 3)), ("y", pytest.approx(2 / 3))]
    assert ensemble.combine(spec("best"), labels, {}) == []


@pytest.mark.parametrize(("text", "field"), [
    ('members = ["iris-setosa", "nope"]\naggregate = "best"\n', "members"),
    ('members = ["iris-setosa"]\naggregate = "best"\n', "members"),
    ('members = ["iris-setosa", "digits-light"]\naggregate = "vote"\n', "members"),
    ('members = ["iris-setosa", "iris"]\naggregate = "best"\n', "aggregate"),
    ('members = ["iris-setosa", "iris-virginica"]\naggregate = "mean"\n', "aggregate"),
    ('members = ["iris-setosa", "iris-virginica"]\naggregate = "median"\n', "aggregate"),
])
def test_a_broken_ensemble_spec_is_reported_naming_its_field(tmp_path: Path, text: str, field: str):
    for name in ("iris", "iris-setosa", "iris-virginica", "digits-light"):
        shutil.copytree(PACKAGE_DIR / name, tmp_path / name)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ensemble.toml").write_text(text)
    registry = Registry(Settings(models_dir=tmp_path))
    assert registry.ensembles() == []
    message = registry.problems[str(tmp_path / "bad" / "ensemble.toml")]
    assert "ensemble.toml" in message and field in message


def test_the_catalogue_lists_the_ensemble_and_its_members_pattern(eager_client: FlaskClient):
    catalogue = eager_client.get("/v1/models").get_json()
    assert catalogue["ensembles"][0]["members"] == list(MEMBERS)
    patterns = {m["name"]: m["patterns"] for m in catalogue["models"]}
    assert "horizontal-microservice" in patterns["iris-setosa"] and "horizontal-microservice" not in patterns["iris"]
