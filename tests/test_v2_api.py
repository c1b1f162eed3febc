"""Open Inference Protocol V2 through the Flask client: health, metadata, JSON and binary inference."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient
from sklearn.datasets import load_digits
from werkzeug.test import TestResponse

from models import spec
from models.config import PACKAGE_DIR
from samples import digit_png, error_of, iris_reference
from webapp import create_app

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]], np.float32)
"""Two iris flowers: the first of the dataset's setosas and the first of its virginicas."""
LABELS = spec.load(PACKAGE_DIR / "iris").labels
INFER = "/v2/models/iris/infer"
HEADER = "Inference-Header-Content-Length"
LENGTH = struct.Struct("<I")
NUMPY = {"FP32": np.dtype("<f4"), "INT64": np.dtype("<i8")}

@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """What the committed iris artefact answers for ROWS when onnxruntime runs it directly."""
    return iris_reference(ROWS)



def features(data: object, shape: list[int] | None = None, datatype: str = "FP32") -> dict:
    """A JSON input tensor for iris."""
    return {"name": "features", "shape": shape or [2, 4], "datatype": datatype, "data": data}


def outputs_of(body: dict) -> dict[str, np.ndarray]:
    """The JSON outputs of an infer response as arrays of their declared shapes."""
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}


def assert_iris(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """The outputs equal what onnxruntime answers, and the labels are the flowers'."""
    np.testing.assert_array_equal(outputs["label"], reference["label"])
    np.testing.assert_allclose(outputs["probabilities"], reference["probabilities"], rtol=1e-6)
    assert [str(v) for v in outputs["label_name"]] == ["setosa", "virginica"]


def binary_body(head: dict, raw: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-extension request: JSON header, raw tensor bytes, and the header saying where they split."""
    header = json.dumps(head).encode()
    return header + raw, {HEADER: str(len(header))}


def post_binary(client: FlaskClient, head: dict, raw: bytes, path: str = INFER) -> TestResponse:
    """POST a binary-extension request."""
    body, headers = binary_body(head, raw)
    return client.post(path, data=body, headers=headers, content_type="application/octet-stream")


def binary_entry(name: str, shape: list[int], datatype: str, raw: bytes) -> dict:
    """The JSON entry of an input whose `raw` bytes follow the header."""
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(raw)}}


def binary_features(rows: np.ndarray = ROWS) -> tuple[dict, bytes]:
    """The iris input as a binary tensor: its JSON entry and its little-endian bytes."""
    raw = rows.astype("<f4").tobytes()
    return binary_entry("features", list(rows.shape), "FP32", raw), raw


def decode_response(response: TestResponse) -> dict[str, np.ndarray]:
    """Split a binary-extension response into its outputs, reading every length it states."""
    body = response.get_data()
    offset = int(response.headers[HEADER])
    head = json.loads(body[:offset])
    outputs = {}
    for entry in head["outputs"]:
        if "data" in entry:
            outputs[entry["name"]] = np.array(entry["data"]).reshape(entry["shape"])
            continue
        size = entry["parameters"]["binary_data_size"]
        outputs[entry["name"]] = decode_tensor(body[offset:offset + size], entry["datatype"], entry["shape"])
        offset += size
    assert offset == len(body), "the response holds bytes no output accounts for"
    return outputs


def decode_tensor(chunk: bytes, datatype: str, shape: list[int]) -> np.ndarray:
    """One binary output: BYTES elements are length-prefixed, numbers are little-endian."""
    if datatype != "BYTES":
        return np.frombuffer(chunk, NUMPY[datatype]).reshape(shape)
    items, offset = [], 0
    while offset < len(chunk):
        (length,) = LENGTH.unpack_from(chunk, offset)
        items.append(chunk[offset + 4:offset + 4 + length].decode())
        offset += 4 + length
    return np.array(items).reshape(shape)


# --- server and model metadata ------------------------------------------------------------------------------

def test_server_metadata_advertises_binary_tensor_data(client: FlaskClient) -> None:
    body = client.get("/v2").get_json()
    assert isinstance(body["name"], str) and body["name"]
    assert isinstance(body["version"], str) and body["version"]
    assert "binary_tensor_data" in body["extensions"]


def test_health(client: FlaskClient) -> None:
    live, ready = client.get("/v2/health/live"), client.get("/v2/health/ready")
    assert (live.status_code, live.get_json()) == (200, {"live": True})
    assert (ready.status_code, ready.get_json()) == (200, {"ready": True})


def test_an_empty_repository_is_not_ready(tmp_path: Path) -> None:
    client = create_app({"TESTING": True, "models_dir": tmp_path, "reload_interval_s": 0.0}).test_client()
    response = client.get("/v2/health/ready")
    assert response.status_code == 503
    assert response.get_json()["ready"] is False
    assert client.get("/v2/health/live").status_code == 200


@pytest.mark.parametrize("path", ["/v2/models/iris", "/v2/models/iris/versions/1"])
def test_model_metadata(client: FlaskClient, path: str) -> None:
    body = client.get(path).get_json()
    assert body == {
        "name": "iris",
        "versions": ["1"],
        "platform": "onnx_onnxv1",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
            {"name": "label_name", "datatype": "BYTES", "shape": [-1]},
        ],
    }


@pytest.mark.parametrize("path", ["/v2/models/iris/ready", "/v2/models/iris/versions/1/ready"])
def test_model_ready(client: FlaskClient, path: str) -> None:
    assert client.get(path).status_code == 200


@pytest.mark.parametrize(("path", "named"), [
    ("/v2/models/no-such-model", "'no-such-model'"),
    ("/v2/models/no-such-model/ready", "'no-such-model'"),
    ("/v2/models/iris/versions/7", "no version 7"),
    ("/v2/models/iris/versions/7/ready", "no version 7"),
])
def test_unknown_model_or_version_is_404(client: FlaskClient, path: str, named: str) -> None:
    assert named in error_of(client.get(path), 404)


def test_infer_on_an_unknown_model_is_404(client: FlaskClient) -> None:
    body = {"inputs": [features(ROWS.ravel().tolist())]}
    response = client.post("/v2/models/no-such-model/infer", json=body)
    assert "'no-such-model'" in error_of(response, 404)


# --- JSON inference -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [ROWS.ravel().tolist(), ROWS.tolist()], ids=["flat", "nested"])
@pytest.mark.parametrize("path", [INFER, "/v2/models/iris/versions/1/infer"])
def test_infer_json(client: FlaskClient, reference: dict[str, np.ndarray], path: str, data: list) -> None:
    response = client.post(path, json={"id": "request-7", "inputs": [features(data)]})
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("iris", "1", "request-7")
    assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
        ("label", "INT64", [2]), ("probabilities", "FP32", [2, 3]), ("label_name", "BYTES", [2]),
    ]
    assert_iris(outputs_of(body), reference)


def test_without_an_id_the_response_has_none(client: FlaskClient) -> None:
    body = client.post(INFER, json={"inputs": [features(ROWS.ravel().tolist())]}).get_json()
    assert "id" not in body


def test_outputs_filter(client: FlaskClient) -> None:
    body = {"inputs": [features(ROWS.tolist())], "outputs": [{"name": "label_name"}]}
    response = client.post(INFER, json=body)
    assert response.get_json()["outputs"] == [
        {"name": "label_name", "datatype": "BYTES", "shape": [2], "data": ["setosa", "virginica"]},
    ]


@pytest.mark.parametrize(("body", "named"), [
    ({"inputs": [features(ROWS.ravel().tolist(), datatype="FP64")]}, "datatype FP64 does not match"),
    ({"inputs": [features(ROWS.ravel().tolist(), datatype="FLOAT")]}, "unknown datatype 'FLOAT'"),
    ({"inputs": [features(ROWS[:, :3].ravel().tolist(), [2, 3])]}, "expected shape [-1, 4], got [2, 3]"),
    ({"inputs": [features(ROWS.ravel().tolist()[:7])]}, "does not fill shape [2, 4]"),
    ({"inputs": [features(ROWS.tolist(), [1, 4])]}, "does not fill shape [1, 4]"),
    ({"inputs": [features(ROWS.ravel().tolist(), [2, -4])]}, "non-negative integers"),
    ({"inputs": [features([["5.1"] * 4] * 2)]}, "got text"),
    ({"inputs": [{**features(ROWS.tolist()), "name": "petals"}]}, "unknown input 'petals'"),
    ({"inputs": [features(ROWS.tolist()), features(ROWS.tolist())]}, "given twice"),
    ({"inputs": []}, "'inputs' must be a non-empty list"),
    ({"id": "x"}, "'inputs' must be a non-empty list"),
    ({"inputs": [{k: v for k, v in features(ROWS.tolist()).items() if k != "data"}]}, "'data' is missing"),
    ({"inputs": [features(ROWS.tolist())], "outputs": [{"name": "logits"}]}, "unknown output"),
    ({"inputs": [features(ROWS.tolist())], "id": 7}, "'id' must be a string"),
])
def test_bad_requests_are_400_with_a_reason(client: FlaskClient, body: dict, named: str) -> None:
    assert named in error_of(client.post(INFER, json=body), 400)


def test_nan_is_refused(client: FlaskClient) -> None:
    body = '{"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [NaN, 3, 1, 0]}]}'
    response = client.post(INFER, data=body, content_type="application/json")
    assert "NaN or infinite" in error_of(response, 400)


@pytest.fixture
def pair_client(tmp_path: Path) -> FlaskClient:
    """A client over a repository holding one model with two inputs: `sum = a + b`, all float32 [-1, 2]."""
    from onnx import TensorProto, helper, save

    tensors = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 2]) for n in ("a", "b", "sum")]
    add = helper.make_node("Add", ["a", "b"], ["sum"])
    graph = helper.make_graph([add], "pair", tensors[:2], tensors[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    (tmp_path / "pair" / "1").mkdir(parents=True)
    save(model, str(tmp_path / "pair" / "1" / "model.onnx"))
    declared = "".join(f'[[{kind}]]\nname = "{n}"\ndtype = "float32"\nshape = [-1, 2]\n\n'
                       for kind, n in (("inputs", "a"), ("inputs", "b"), ("outputs", "sum")))
    (tmp_path / "pair" / "model.toml").write_text(declared)
    return create_app({"TESTING": True, "models_dir": tmp_path, "reload_interval_s": 0.0}).test_client()


def pair_input(name: str, data: list) -> dict:
    """One input tensor of the pair model."""
    return {"name": name, "shape": [1, 2], "datatype": "FP32", "data": data}


def test_a_missing_input_is_400(pair_client: FlaskClient) -> None:
    both = pair_client.post("/v2/models/pair/infer", json={"inputs": [pair_input("a", [1, 2]),
                                                                      pair_input("b", [10, 20])]})
    assert both.get_json()["outputs"][0]["data"] == [11, 22]
    response = pair_client.post("/v2/models/pair/infer", json={"inputs": [pair_input("a", [1, 2])]})
    assert "missing input 'b'" in error_of(response, 400)


# --- binary tensor data extension ---------------------------------------------------------------------------

def test_binary_input_json_output(client: FlaskClient, reference: dict[str, np.ndarray]) -> None:
    entry, raw = binary_features()
    response = post_binary(client, {"id": "b1", "inputs": [entry]}, raw)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert HEADER not in response.headers
    assert response.get_json()["id"] == "b1"
    assert_iris(outputs_of(response.get_json()), reference)


def test_binary_data_output_makes_every_output_binary(
    client: FlaskClient, reference: dict[str, np.ndarray],
) -> None:
    entry, raw = binary_features()
    response = post_binary(client, {"inputs": [entry], "parameters": {"binary_data_output": True}}, raw)
    assert response.status_code == 200, response.get_data(as_text=True)
    head = json.loads(response.get_data()[:int(response.headers[HEADER])])
    assert all("data" not in o and o["parameters"]["binary_data_size"] > 0 for o in head["outputs"])
    assert_iris(decode_response(response), reference)


def test_binary_data_per_output(client: FlaskClient, reference: dict[str, np.ndarray]) -> None:
    entry, raw = binary_features()
    wanted = [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label_name"},
              {"name": "label", "parameters": {"binary_data": True}}]
    response = post_binary(client, {"inputs": [entry], "outputs": wanted}, raw)
    assert response.status_code == 200, response.get_data(as_text=True)
    head = json.loads(response.get_data()[:int(response.headers[HEADER])])
    assert [o["name"] for o in head["outputs"]] == ["probabilities", "label_name", "label"]
    assert ["data" in o for o in head["outputs"]] == [False, True, False]
    assert_iris(decode_response(response), reference)


def test_json_input_binary_output(client: FlaskClient, reference: dict[str, np.ndarray]) -> None:
    body = {"inputs": [features(ROWS.tolist())], "parameters": {"binary_data_output": True}}
    response = client.post(INFER, json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert_iris(decode_response(response), reference)


def lying(kind: str) -> tuple[bytes, dict[str, str]]:
    """A binary request whose stated lengths do not match its body, in one way."""
    entry, raw = binary_features()
    if kind == "header-past-body":
        body, _ = binary_body({"inputs": [entry]}, raw)
        return body, {HEADER: str(len(body) + 1)}
    if kind == "header-not-a-number":
        body, _ = binary_body({"inputs": [entry]}, raw)
        return body, {HEADER: "forty"}
    sizes = {"size-too-big": len(raw) + 4, "size-too-small": len(raw) - 4, "size-negative": -1}
    if kind in sizes:
        return binary_body({"inputs": [{**entry, "parameters": {"binary_data_size": sizes[kind]}}]}, raw)
    return binary_body({"inputs": [entry]}, raw + b"\0\0\0\0")


@pytest.mark.parametrize(("kind", "named"), [
    ("header-past-body", "no larger than the body"),
    ("header-not-a-number", "must be a whole number"),
    ("size-too-big", "runs past the end of the body"),
    ("size-too-small", "does not fit shape [2, 4]"),
    ("size-negative", "non-negative integer"),
    ("trailing-bytes", "4 bytes after the JSON header belong to no input"),
])
def test_lying_lengths_are_400(client: FlaskClient, kind: str, named: str) -> None:
    body, headers = lying(kind)
    response = client.post(INFER, data=body, headers=headers, content_type="application/octet-stream")
    assert named in error_of(response, 400)


def test_binary_input_with_data_too_is_400(client: FlaskClient) -> None:
    entry, raw = binary_features()
    response = post_binary(client, {"inputs": [{**entry, "data": ROWS.ravel().tolist()}]}, raw)
    assert "both 'data' and binary_data_size" in error_of(response, 400)


def bytes_tensor(items: list[bytes]) -> bytes:
    """BYTES elements as the binary extension lays them out: a 4-byte little-endian length, then the bytes."""
    return b"".join(LENGTH.pack(len(item)) + item for item in items)


def test_binary_png_bytes_predict_the_digit(client: FlaskClient) -> None:
    digits = load_digits()
    raw = bytes_tensor([digit_png(pixels) for pixels in digits.data[:10]])
    entry = binary_entry("pixels", [10], "BYTES", raw)
    response = post_binary(client, {"inputs": [entry], "outputs": [{"name": "label_name"}]}, raw,
                           "/v2/models/digits-light/infer")
    assert response.status_code == 200, response.get_data(as_text=True)
    names = response.get_json()["outputs"][0]["data"]
    assert sum(name == str(digit) for name, digit in zip(names, digits.target[:10], strict=True)) >= 9


@pytest.mark.parametrize(("raw", "named"), [
    (LENGTH.pack(100) + b"short", "runs past its binary_data_size"),
    (b"\x05\x00", "length is truncated"),
    (bytes_tensor([b"\x89PNG\r\n\x1a\n not an image"]), "image"),
    (bytes_tensor([b"a", b"b"]), "5 bytes of binary_data_size are past the 1 BYTES elements of its shape"),
])
def test_bad_binary_bytes_are_400(client: FlaskClient, raw: bytes, named: str) -> None:
    entry = binary_entry("pixels", [1], "BYTES", raw)
    response = post_binary(client, {"inputs": [entry]}, raw, "/v2/models/digits-light/infer")
    assert named in error_of(response, 400)


def test_bytes_are_refused_for_an_input_that_takes_no_images(client: FlaskClient) -> None:
    raw = bytes_tensor([b"abcd", b"efgh"])
    response = post_binary(client, {"inputs": [binary_entry("features", [2], "BYTES", raw)]}, raw)
    assert "datatype BYTES does not match the model's FP32" in error_of(response, 400)
