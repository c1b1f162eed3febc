"""The official Triton HTTP client against the real web process under gunicorn."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_digits
from tritonclient.utils import InferenceServerException

from models import spec
from models.config import PACKAGE_DIR
from samples import digit_png, iris_reference

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5], [5.9, 3.0, 4.2, 1.5]], np.float32)
"""Three iris flowers, one of each species."""
LABELS = spec.load(PACKAGE_DIR / "iris").labels
OUTPUTS = ("label", "probabilities", "label_name")

@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """What the committed iris artefact answers for ROWS when onnxruntime runs it directly."""
    return iris_reference(ROWS)



@pytest.fixture(scope="module")
def client(live_server: str) -> Iterator[triton.InferenceServerClient]:
    """A Triton HTTP client of the live server."""
    connection = triton.InferenceServerClient(live_server.removeprefix("http://"))
    yield connection
    connection.close()


def text(values: np.ndarray) -> list[str]:
    """BYTES outputs as strings: the client answers bytes for binary outputs and str for JSON ones."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values.ravel()]


def test_health_and_readiness(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1")
    assert not client.is_model_ready("no-such-model")


def test_model_metadata(client: triton.InferenceServerClient) -> None:
    metadata = client.get_model_metadata("iris")
    assert metadata["name"] == "iris"
    assert metadata["platform"] == "onnx_onnxv1"
    assert metadata["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [
        ("label", "INT64"), ("probabilities", "FP32"), ("label_name", "BYTES"),
    ]


@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
@pytest.mark.parametrize("binary_out", [True, False], ids=["binary-out", "json-out"])
@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
def test_infer_equals_onnxruntime(
    client: triton.InferenceServerClient, reference: dict[str, np.ndarray],
    binary_in: bool, binary_out: bool, compression: str | None,
) -> None:
    features = triton.InferInput("features", list(ROWS.shape), "FP32")
    features.set_data_from_numpy(ROWS, binary_data=binary_in)
    wanted = [triton.InferRequestedOutput(name, binary_data=binary_out) for name in OUTPUTS]
    result = client.infer("iris", [features], outputs=wanted, request_id="r1",
                          request_compression_algorithm=compression)
    assert result.get_response()["id"] == "r1"
    np.testing.assert_array_equal(result.as_numpy("label"), reference["label"])
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference["probabilities"], rtol=1e-6)
    assert text(result.as_numpy("label_name")) == list(reference["label_name"])
    assert text(result.as_numpy("label_name")) == ["setosa", "virginica", "versicolor"]


def test_infer_without_requested_outputs_answers_all(
    client: triton.InferenceServerClient, reference: dict[str, np.ndarray],
) -> None:
    features = triton.InferInput("features", list(ROWS.shape), "FP32")
    features.set_data_from_numpy(ROWS)
    result = client.infer("iris", [features], model_version="1")
    assert [o["name"] for o in result.get_response()["outputs"]] == list(OUTPUTS)
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference["probabilities"], rtol=1e-6)


def test_png_bytes_input_predicts_the_digit(client: triton.InferenceServerClient) -> None:
    digits = load_digits()
    images = np.empty(10, dtype=object)
    images[:] = [digit_png(pixels) for pixels in digits.data[:10]]
    pixels = triton.InferInput("pixels", [10], "BYTES")
    pixels.set_data_from_numpy(images, binary_data=True)
    result = client.infer("digits-light", [pixels], outputs=[triton.InferRequestedOutput("label_name")])
    names = text(result.as_numpy("label_name"))
    assert sum(name == str(digit) for name, digit in zip(names, digits.target[:10], strict=True)) >= 9


def test_unknown_model_raises_with_the_name(client: triton.InferenceServerClient) -> None:
    features = triton.InferInput("features", list(ROWS.shape), "FP32")
    features.set_data_from_numpy(ROWS)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("no-such-model", [features])
    assert str(raised.value.status()) == "404"
    assert "no model named 'no-such-model'" in raised.value.message()
    with pytest.raises(InferenceServerException, match="no-such-model"):
        client.get_model_metadata("no-such-model")


def test_wrong_shape_raises_with_the_expected_shape(client: triton.InferenceServerClient) -> None:
    narrow = np.ascontiguousarray(ROWS[:, :3])
    features = triton.InferInput("features", list(narrow.shape), "FP32")
    features.set_data_from_numpy(narrow)
    with pytest.raises(InferenceServerException) as raised:
        client.infer("iris", [features])
    assert str(raised.value.status()) == "400"
    assert "expected shape [-1, 4], got [3, 3]" in raised.value.message()
