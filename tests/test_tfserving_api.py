"""TensorFlow Serving REST through the Flask client: version status, metadata, predict and its refusals."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from flask.testing import FlaskClient
from sklearn.datasets import load_digits
from werkzeug.test import TestResponse

from models import spec
from models.config import PACKAGE_DIR
from samples import digit_png, error_of, iris_reference
from webapp import create_app

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]]
"""Two iris flowers: the first of the dataset's setosas and the first of its virginicas."""
LABELS = spec.load(PACKAGE_DIR / "iris").labels
PREDICT = "/v1/models/iris:predict"

@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """What the committed iris artefact answers for ROWS when onnxruntime runs it directly."""
    return iris_reference(ROWS)



def b64(data: bytes) -> dict[str, str]:
    """A TF Serving binary value."""
    return {"b64": base64.b64encode(data).decode()}


def post_raw(client: FlaskClient, data: bytes, content_type: str = "application/json", **headers: str
             ) -> TestResponse:
    """POST a raw body to the iris predict endpoint."""
    return client.post(PREDICT, data=data, content_type=content_type, headers=headers)


# --- version status and metadata ----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/models/iris", "/v1/models/iris/versions/1"])
def test_status_reports_the_version_available(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    body = response.get_json()
    assert body["model_version_status"] == [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
    ]
    assert body["name"] == "iris"
    assert body["ready"] is True


@pytest.mark.parametrize(("path", "named"), [
    ("/v1/models/no-such-model", "'no-such-model'"),
    ("/v1/models/iris/versions/7", "no version 7"),
    ("/v1/models/no-such-model/metadata", "'no-such-model'"),
    ("/v1/models/iris/versions/7/metadata", "no version 7"),
    ("/v1/models/no-such-model:predict", "'no-such-model'"),
])
def test_unknown_model_or_version_is_404(client: FlaskClient, path: str, named: str) -> None:
    response = client.post(path, json={"instances": ROWS}) if path.endswith(":predict") else client.get(path)
    assert named in error_of(response, 404)


def dims(*sizes: int) -> dict:
    """A TensorShapeProto as TF Serving writes it in JSON: sizes as strings, empty names."""
    return {"dim": [{"size": str(s), "name": ""} for s in sizes], "unknown_rank": False}


@pytest.mark.parametrize("path", ["/v1/models/iris/metadata", "/v1/models/iris/versions/1/metadata"])
def test_metadata_is_a_tf_serving_signature_def(client: FlaskClient, path: str) -> None:
    body = client.get(path).get_json()
    assert body["model_spec"] == {"name": "iris", "signature_name": "", "version": "1"}
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert signature["method_name"] == "tensorflow/serving/predict"
    assert signature["inputs"] == {
        "features": {"dtype": "DT_FLOAT", "tensor_shape": dims(-1, 4), "name": "features"},
    }
    assert signature["outputs"] == {
        "label": {"dtype": "DT_INT64", "tensor_shape": dims(-1), "name": "label"},
        "probabilities": {"dtype": "DT_FLOAT", "tensor_shape": dims(-1, 3), "name": "probabilities"},
        "label_name": {"dtype": "DT_STRING", "tensor_shape": dims(-1), "name": "label_name"},
    }


# --- predict ------------------------------------------------------------------------------------------------

def assert_rows(predictions: list[dict], reference: dict[str, np.ndarray]) -> None:
    """Row-format predictions agree with onnxruntime and with themselves."""
    assert len(predictions) == len(ROWS)
    expected = zip(reference["label"], reference["probabilities"], strict=True)
    for row, (label, probabilities) in zip(predictions, expected, strict=True):
        assert set(row) == {"label", "probabilities", "label_name"}
        assert row["label"] == label
        np.testing.assert_allclose(row["probabilities"], probabilities, rtol=1e-6)
        assert sum(row["probabilities"]) == pytest.approx(1, abs=1e-5)
        assert int(np.argmax(row["probabilities"])) == row["label"]
        assert row["label_name"] == LABELS[row["label"]]
    assert [row["label_name"] for row in predictions] == ["setosa", "virginica"]


@pytest.mark.parametrize("body", [
    {"instances": ROWS},
    {"instances": [{"features": row} for row in ROWS]},
    {"signature_name": "serving_default", "instances": ROWS},
    {"signature_name": "", "instances": ROWS},
], ids=["bare", "named", "serving_default", "empty-signature"])
@pytest.mark.parametrize("path", [PREDICT, "/v1/models/iris/versions/1:predict"])
def test_row_format_predicts_like_onnxruntime(
    client: FlaskClient, reference: dict[str, np.ndarray], path: str, body: dict,
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert list(response.get_json()) == ["predictions"]
    assert_rows(response.get_json()["predictions"], reference)


@pytest.mark.parametrize("body", [{"inputs": ROWS}, {"inputs": {"features": ROWS}}], ids=["tensor", "named"])
def test_columnar_format_answers_outputs(
    client: FlaskClient, reference: dict[str, np.ndarray], body: dict,
) -> None:
    response = client.post(PREDICT, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    outputs = response.get_json()["outputs"]
    assert set(outputs) == {"label", "probabilities", "label_name"}
    assert outputs["label"] == reference["label"].tolist()
    np.testing.assert_allclose(outputs["probabilities"], reference["probabilities"], rtol=1e-6)
    assert outputs["label_name"] == reference["label_name"].tolist()


def test_other_signature_names_are_refused(client: FlaskClient) -> None:
    response = client.post(PREDICT, json={"signature_name": "classify", "instances": ROWS})
    assert "signature_name 'classify'" in error_of(response, 400)


def test_b64_images_predict_the_digit(client: FlaskClient) -> None:
    digits = load_digits()
    instances = [b64(digit_png(pixels)) for pixels in digits.data[:10]]
    response = client.post("/v1/models/digits-light:predict", json={"instances": instances})
    assert response.status_code == 200, response.get_data(as_text=True)
    predictions = response.get_json()["predictions"]
    assert len(predictions) == 10
    names = [p["label_name"] for p in predictions]
    assert sum(name == str(digit) for name, digit in zip(names, digits.target[:10], strict=True)) >= 9


@pytest.mark.parametrize(("encoding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_compressed_bodies_are_accepted(
    client: FlaskClient, reference: dict[str, np.ndarray], encoding: str, compress: Callable[[bytes], bytes],
) -> None:
    body = compress(json.dumps({"instances": ROWS}).encode())
    response = post_raw(client, body, **{"Content-Encoding": encoding})
    assert response.status_code == 200, response.get_data(as_text=True)
    assert_rows(response.get_json()["predictions"], reference)


# --- refusals -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "named"), [
    (b'{"instances": [[5.1, 3.5, 1.4, 0.2]', "malformed JSON"),
    (b"[[5.1, 3.5, 1.4, 0.2]]", "must be a JSON object, got list"),
    (b'"instances"', "must be a JSON object, got str"),
    (json.dumps({"instances": ROWS, "inputs": ROWS}).encode(), "exactly one of 'instances'"),
    (json.dumps({"signature_name": "serving_default"}).encode(), "exactly one of 'instances'"),
    (json.dumps({"instances": []}).encode(), "non-empty"),
    (json.dumps({"instances": [[5.1, 3.5, 1.4]]}).encode(), "expected shape [-1, 4], got [1, 3]"),
    (json.dumps({"inputs": [[5.1, 3.5, 1.4, 0.2, 1.0]]}).encode(), "expected shape [-1, 4], got [1, 5]"),
    (json.dumps({"instances": [["5.1", "3.5", "1.4", "0.2"]]}).encode(), "got text"),
    (json.dumps({"instances": [[5.1, 3.5], [6.3, 3.3, 6.0, 2.5]]}).encode(), "ragged"),
    (json.dumps({"instances": ROWS, "extra": 1}).encode(), "unknown field 'extra'"),
    (b'{"instances": [[NaN, 3.5, 1.4, 0.2]]}', "NaN or infinite"),
    (b'{"instances": [[5.1, Infinity, 1.4, 0.2]]}', "NaN or infinite"),
    (b'{"inputs": [[5.1, 3.5, -Infinity, 0.2]]}', "NaN or infinite"),
    (b'{"instances": [[5.1, 3.5, 1.4, 1e39]]}', "NaN or infinite"),
])
def test_bad_bodies_are_400_with_a_reason(client: FlaskClient, body: bytes, named: str) -> None:
    assert named in error_of(post_raw(client, body), 400)


def test_unknown_content_type_is_415(client: FlaskClient) -> None:
    response = post_raw(client, json.dumps({"instances": ROWS}).encode(), content_type="text/plain")
    assert "'text/plain'" in error_of(response, 415)


def test_unknown_content_encoding_is_415(client: FlaskClient) -> None:
    response = post_raw(client, json.dumps({"instances": ROWS}).encode(), **{"Content-Encoding": "br"})
    assert "encoding 'br'" in error_of(response, 415)


def test_corrupt_gzip_is_400(client: FlaskClient) -> None:
    body = gzip.compress(json.dumps({"instances": ROWS}).encode())
    response = post_raw(client, body[:10] + b"garbage" + body[10:], **{"Content-Encoding": "gzip"})
    assert "decompressed" in error_of(response, 400)


@pytest.fixture
def small_client() -> FlaskClient:
    """A client of an app that takes request bodies of at most 1000 bytes."""
    return create_app({"TESTING": True, "reload_interval_s": 0.0, "max_request_bytes": 1000}).test_client()


def test_body_over_the_limit_is_413(small_client: FlaskClient) -> None:
    body = json.dumps({"instances": ROWS * 40}).encode()
    assert len(body) > 1000
    assert "exceeds" in error_of(post_raw(small_client, body), 413)
    fits = json.dumps({"instances": ROWS}).encode()
    assert post_raw(small_client, fits).status_code == 200


def test_gzip_bomb_is_413(small_client: FlaskClient) -> None:
    bomb = gzip.compress(b'{"instances": [' + b" " * 500_000 + b"]}")
    assert len(bomb) < 1000, "the compressed body itself must fit the limit"
    response = post_raw(small_client, bomb, **{"Content-Encoding": "gzip"})
    assert "1000 bytes once decompressed" in error_of(response, 413)


def test_bad_base64_is_400(client: FlaskClient) -> None:
    response = client.post("/v1/models/digits-light:predict", json={"instances": [{"b64": "not base64!"}]})
    assert "not valid base64" in error_of(response, 400)


def test_undecodable_image_is_400(client: FlaskClient) -> None:
    body = {"instances": [b64(b"\x89PNG\r\n\x1a\n but no image follows")]}
    response = client.post("/v1/models/digits-light:predict", json=body)
    assert "image" in error_of(response, 400)
