"""The model catalogue (/v1/models) and the API's own description (/openapi.json)."""

from __future__ import annotations

import json
import re

import pytest
from flask import Flask
from flask.testing import FlaskClient

from models import spec
from models.config import PACKAGE_DIR

COMMITTED = ["digits-heavy", "digits-light", "iris", "iris-setosa", "iris-versicolor", "iris-virginica"]
BLUEPRINTS = ("catalog", "tfserving", "v2", "monitoring", "experiments", "metrics")
"""The blueprints whose routes the OpenAPI document must describe."""


@pytest.fixture
def catalog(client: FlaskClient) -> dict[str, dict]:
    """The catalogue's entries by model name."""
    response = client.get("/v1/models")
    assert response.status_code == 200
    body = response.get_json()
    assert body["problems"] == []
    return {entry["name"]: entry for entry in body["models"]}


def test_lists_every_committed_model_in_order(client: FlaskClient) -> None:
    names = [entry["name"] for entry in client.get("/v1/models").get_json()["models"]]
    assert names == COMMITTED


@pytest.mark.parametrize("name", COMMITTED)
def test_an_entry_matches_the_model_folder(catalog: dict[str, dict], name: str) -> None:
    entry, declared = catalog[name], spec.load(PACKAGE_DIR / name)
    on_disk = sorted(int(p.parent.name) for p in (PACKAGE_DIR / name).glob("*/model.onnx"))
    assert entry["versions"] == on_disk
    assert entry["default_version"] == max(on_disk)
    assert entry["description"] == declared.description
    assert entry["labels"] == list(declared.labels) and entry["labels"]
    for kind in ("inputs", "outputs"):
        assert [(t["name"], t["dtype"], t["shape"]) for t in entry[kind]] == [
            (t.name, t.dtype.name, list(t.shape)) for t in getattr(declared, kind)
        ]
    assert entry["patterns"] and all(isinstance(p, str) for p in entry["patterns"])
    assert "synchronous" in entry["patterns"]


def test_image_inputs_are_marked(catalog: dict[str, dict]) -> None:
    takes_images = {name for name, entry in catalog.items()
                    if any(t.get("accepts_images") for t in entry["inputs"])}
    assert takes_images == {"digits-heavy", "digits-light"}


def test_iris_entry(catalog: dict[str, dict]) -> None:
    iris = catalog["iris"]
    assert iris["labels"] == ["setosa", "versicolor", "virginica"]
    assert [(t["name"], t["dtype"], t["shape"]) for t in iris["inputs"]] == [("features", "float32", [-1, 4])]
    assert iris["inputs"][0]["description"]
    assert [o["name"] for o in iris["outputs"]] == ["label", "probabilities", "label_name"]


@pytest.fixture
def document(client: FlaskClient) -> dict:
    """The served OpenAPI document."""
    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.is_json
    return response.get_json()


def test_openapi_is_version_3_with_the_predict_and_infer_paths(document: dict) -> None:
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] and document["info"]["version"]
    paths = document["paths"]
    for path in ("/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict",
                 "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        assert "requestBody" in paths[path]["post"], path
        assert "200" in paths[path]["post"]["responses"], path
    assert "get" in paths["/v1/models"]


def flask_paths(app: Flask) -> set[tuple[str, str]]:
    """(OpenAPI path template, verb) of every route the API's blueprints serve."""
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint.split(".")[0] not in BLUEPRINTS:
            continue
        template = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        routes |= {(template, verb.lower()) for verb in rule.methods - {"HEAD", "OPTIONS"}}
    return routes


def test_openapi_describes_every_route(app: Flask, document: dict) -> None:
    described = {(path, verb) for path, operations in document["paths"].items() for verb in operations}
    assert flask_paths(app) - {("/openapi.json", "get")} <= described


def test_openapi_path_parameters_match_the_templates(document: dict) -> None:
    for path, operations in document["paths"].items():
        for verb, operation in operations.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == set(re.findall(r"\{(\w+)\}", path)), f"{verb} {path}"


def test_openapi_references_resolve(document: dict) -> None:
    schemas = document["components"]["schemas"]
    refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(document))
    assert refs and set(refs) <= set(schemas)
    assert schemas["Error"]["required"] == ["error"]
