"""Broken specs and artefacts are reported naming the file and the field; the other models keep serving."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from models import Registry, Settings, SpecError
from models import spec as specs
from models.config import PACKAGE_DIR

IRIS = PACKAGE_DIR / "iris"
SETOSA = [5.1, 3.5, 1.4, 0.2]


def iris_spec() -> str:
    """The committed iris model.toml."""
    return (IRIS / "model.toml").read_text()


def edited(old: str, new: str, count: int = 1) -> Callable[[str], str]:
    """An edit of the iris spec that must change it (so a stale edit cannot pass unnoticed)."""
    def edit(text: str) -> str:
        changed = text.replace(old, new, count)
        assert changed != text, f"{old!r} is not in the iris spec any more"
        return changed
    return edit


def without_inputs(text: str) -> str:
    """The iris spec with its [[inputs]] table removed."""
    changed = re.sub(r"\[\[inputs\]\].*?(?=\[\[outputs\]\])", "", text, count=1, flags=re.S)
    assert "[[inputs]]" not in changed
    return changed


def add_model(repo: Path, name: str, spec_text: str, artefact: bytes | None = None) -> Path:
    """Write a model folder with one version; the artefact defaults to a copy of iris's."""
    folder = repo / name
    (folder / "1").mkdir(parents=True)
    (folder / "model.toml").write_text(spec_text)
    (folder / "1" / "model.onnx").write_bytes(artefact or (IRIS / "1" / "model.onnx").read_bytes())
    return folder


def assert_iris_serves(client: FlaskClient) -> None:
    """The healthy iris model in the same repository still predicts over HTTP."""
    response = client.post("/v1/models/iris:predict", json={"instances": [SETOSA]})
    assert response.status_code == 200, response.json
    assert response.json["predictions"][0]["label_name"] == "setosa"


# name -> (edit of the iris spec, what the message must name after the file)
BROKEN = {
    "toml-syntax": (edited("[options]", "[options"), "cannot be read as TOML"),
    "unknown-dtype": (edited('dtype = "float32"', 'dtype = "float33"'), "inputs[0].dtype"),
    "missing-inputs": (without_inputs, "inputs: is required"),
    "unknown-field": (edited("description =", "descripton ="), "descripton: unknown field"),
    "bad-shape": (edited("shape = [-1, 4]", "shape = [-1, 0]"), "inputs[0].shape[1]"),
    "bad-step": (edited("[[outputs]]", '[[inputs.preprocess]]\nstep = "sharpen"\n\n[[outputs]]'),
                 "inputs[0].preprocess[0].step"),
    "wrong-source": (edited('source = "probabilities"', 'source = "scores"'), "outputs[2].source"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_spec_is_reported_and_iris_keeps_serving(
    name: str, repo: Path, repo_client: FlaskClient
) -> None:
    edit, field = BROKEN[name]
    folder = add_model(repo, name, edit(iris_spec()))
    registry = Registry(Settings(models_dir=repo, reload_interval_s=0.0))
    assert [m.spec.name for m in registry.models()] == ["iris"]
    spec_path = str(folder / "model.toml")
    assert registry.problems[spec_path].startswith(f"{spec_path}: {field}")
    assert_iris_serves(repo_client)
    response = repo_client.get(f"/v1/models/{name}")
    assert response.status_code == 404
    assert name in response.json["error"]


def test_toml_syntax_error_names_the_line(repo: Path) -> None:
    text = BROKEN["toml-syntax"][0](iris_spec())
    folder = add_model(repo, "broken", text)
    with pytest.raises(SpecError) as caught:
        specs.load(folder)
    line = text.splitlines().index("[options") + 1
    assert str(caught.value).startswith(f"{folder / 'model.toml'}: cannot be read as TOML")
    assert f"line {line}," in str(caught.value)


@pytest.mark.parametrize(("name", "field"), [
    ("unknown-dtype", "inputs[0].dtype"),
    ("bad-shape", "inputs[0].shape[1]"),
    ("bad-step", "inputs[0].preprocess[0].step"),
    ("wrong-source", "outputs[2].source"),
    ("unknown-field", "descripton"),
])
def test_load_raises_spec_error_naming_file_and_field(name: str, field: str, repo: Path) -> None:
    folder = add_model(repo, name, BROKEN[name][0](iris_spec()))
    with pytest.raises(SpecError) as caught:
        specs.load(folder)
    assert caught.value.field == field
    assert caught.value.path == str(folder / "model.toml")
    assert f"model.toml: {field}: " in str(caught.value)


def test_pinned_absent_default_version_is_named(repo: Path, repo_client: FlaskClient) -> None:
    folder = add_model(repo, "pinned", "default_version = 3\n" + iris_spec())
    registry = Registry(Settings(models_dir=repo, reload_interval_s=0.0))
    registry.refresh()
    spec_path = str(folder / "model.toml")
    assert registry.problems[spec_path] == f"{spec_path}: default_version: version 3 is not present"
    response = repo_client.post("/v1/models/pinned:predict", json={"instances": [SETOSA]})
    assert response.status_code == 503
    assert "default_version" in response.json["error"]
    pinned = repo_client.post("/v1/models/pinned/versions/1:predict", json={"instances": [SETOSA]})
    assert pinned.status_code == 200
    assert_iris_serves(repo_client)


def not_ready(client: FlaskClient, name: str) -> tuple[str, dict]:
    """Predict on a model whose artefact is broken: answer the 503's error and the version status."""
    response = client.post(f"/v1/models/{name}:predict", json={"instances": [SETOSA]})
    assert response.status_code == 503
    status = client.get(f"/v1/models/{name}")
    assert status.status_code == 200
    assert status.json["ready"] is False
    (version,) = status.json["model_version_status"]
    assert version["state"] != "AVAILABLE"
    return response.json["error"], version


def test_artefact_not_matching_the_spec_is_not_ready(repo: Path, repo_client: FlaskClient) -> None:
    digits = (PACKAGE_DIR / "digits-light" / "1" / "model.onnx").read_bytes()
    folder = add_model(repo, "mismatch", iris_spec(), digits)
    artefact = str(folder / "1" / "model.onnx")
    error, version = not_ready(repo_client, "mismatch")
    assert artefact in error
    assert "pixels" in error and "features" in error
    assert artefact in version["status"]["error_message"]
    assert repo_client.get("/v2/models/mismatch/ready").status_code == 503
    assert_iris_serves(repo_client)
    registry = Registry(Settings(models_dir=repo, reload_interval_s=0.0))
    registry.warm()
    assert registry.problems[artefact].startswith(f"{artefact}: inputs: ")


def test_corrupt_artefact_is_not_ready(repo: Path, repo_client: FlaskClient) -> None:
    folder = add_model(repo, "corrupt", iris_spec(), b"\x08\x07 these bytes are no ONNX model \xff\xfe")
    artefact = str(folder / "1" / "model.onnx")
    error, version = not_ready(repo_client, "corrupt")
    assert artefact in error
    assert artefact in version["status"]["error_message"]
    assert_iris_serves(repo_client)
    registry = Registry(Settings(models_dir=repo, reload_interval_s=0.0))
    registry.warm()
    assert registry.problems[artefact].startswith(f"{artefact}: cannot be loaded")
