"""Every cost of client input is bounded before it is paid: shapes, rows, pixels and formats; failures that are
not the client's are 5xx, logged."""

from __future__ import annotations

import base64
import errno
import gzip
import io
import json
import logging
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image

import models
from models import Registry, Settings, batch
from models.config import PACKAGE_DIR
from models.image import PixelBudget, server_fault
from samples import gather_model
from webapp import close_app, create_app

INFER = "/v2/models/iris/infer"
ROW = [5.1, 3.5, 1.4, 0.2]
LENGTH = struct.Struct("<I")


def features(shape: object, data: object) -> dict:
    """An infer request with one `features` tensor."""
    return {"inputs": [{"name": "features", "shape": shape, "datatype": "FP32", "data": data}]}


def error_of(response: object, status: int) -> str:
    """The error text of a JSON error answer, after checking its status."""
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    return response.get_json()["error"]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, pixels: bytes | None = None) -> bytes:
    """A 1-bit PNG of any declared size; without `pixels`, its data is all zero rows (a 3 KB bomb at 5000x5000),
    with them, the given (maybe truncated) deflated data."""
    if pixels is None:
        pixels = zlib.compress(bytes(1 + (width + 7) // 8) * height, 9)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def headers_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data stops after a few bytes: decoding it fails,
    so an answer that names the pixel budget proves that nothing was decoded."""
    return png(width, height, zlib.compress(bytes(64))[:12])


def encoded(image: Image.Image, fmt: str) -> bytes:
    """The image saved in `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def digit(value: int = 200) -> Image.Image:
    """A small grey image with a dark square: something digits-light classifies."""
    image = Image.new("L", (40, 40), value)
    image.paste(0, (12, 8, 28, 32))
    return image


def b64(data: bytes) -> dict[str, str]:
    """A TensorFlow Serving binary value."""
    return {"b64": base64.b64encode(data).decode()}


def predict_images(client: FlaskClient, images: list[bytes], name: str = "digits-light") -> object:
    """POST encoded images to `:predict`, gzipped as a client saving bandwidth would."""
    body = gzip.compress(json.dumps({"instances": [b64(i) for i in images]}).encode())
    return client.post(f"/v1/models/{name}:predict", data=body, content_type="application/json",
                       headers={"Content-Encoding": "gzip"})


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The committed repository, read by the model layer directly."""
    return Registry(Settings(reload_interval_s=3600.0))


# --- shapes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "named"), [
    ([10**18] * 100 + [0], "expected shape [-1, 4], got a shape of 101 dimensions"),
    ([0] * 100, "expected shape [-1, 4], got a shape of 100 dimensions"),
    ([1] * 20_000, "expected shape [-1, 4], got a shape of 20000 dimensions"),
    ([10**18, 4], "shape [1000000000000000000, 4] announces more elements than the request can carry"),
    ([2**40, 2**40], "expected shape [-1, 4], got [1099511627776, 1099511627776]"),
    ([1, 4.0], "'shape' must be a list of non-negative integers"),
    ({"0": 1}, "'shape' must be a list of non-negative integers"),
    ([0, 4], "no rows"),
])
def test_hostile_shapes_are_400_before_any_product(client: FlaskClient, shape: object, named: str) -> None:
    response = client.post(INFER, json=features(shape, []))
    assert named in error_of(response, 400)


def test_a_valid_row_still_answers(client: FlaskClient) -> None:
    response = client.post(INFER, json=features([1, 4], ROW))
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["outputs"][0]["shape"] == [1]


def test_a_binary_shape_cannot_announce_more_than_the_body(client: FlaskClient) -> None:
    raw = np.asarray([ROW], "<f4").tobytes()
    head = json.dumps({"inputs": [{"name": "features", "shape": [2**31, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    response = client.post(INFER, data=head + raw, content_type="application/octet-stream",
                           headers={"Inference-Header-Content-Length": str(len(head))})
    assert "announces more elements than the request can carry" in error_of(response, 400)


@pytest.mark.parametrize(("data", "named"), [
    ([ROW, ROW, ROW], "data has 3 values at its top level, which does not fill shape [2, 4]"),
    (ROW * 3, "data has 12 values at its top level, which does not fill shape [2, 4]"),
    ([ROW, ROW[:3]], "nested lists are ragged"),
    ([[ROW, ROW], [ROW, ROW]], "which does not fill shape [2, 4]"),
])
def test_json_data_is_checked_against_the_shape(client: FlaskClient, data: list, named: str) -> None:
    assert named in error_of(client.post(INFER, json=features([2, 4], data)), 400)


def bytes_request(client: FlaskClient, shape: list[int], raw: bytes) -> object:
    """A binary V2 request of one BYTES tensor of encoded images for digits-light."""
    head = json.dumps({"inputs": [{"name": "pixels", "shape": shape, "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    return client.post("/v2/models/digits-light/infer", data=head + raw, content_type="application/octet-stream",
                       headers={"Inference-Header-Content-Length": str(len(head))})


@pytest.mark.parametrize(("shape", "raw", "named"), [
    ([1], LENGTH.pack(0) * 50_000, "199996 bytes of binary_data_size are past the 1 BYTES elements"),
    ([10**12], LENGTH.pack(0), "announces more elements than the request can carry"),
    ([3], LENGTH.pack(2**32 - 1) + b"x", "BYTES element runs past its binary_data_size"),
    ([2, 64], LENGTH.pack(0) * 2, "expected shape [-1] or [-1, 1], got [2, 64]"),
])
def test_lying_bytes_lengths_are_400(client: FlaskClient, shape: list[int], raw: bytes, named: str) -> None:
    assert named in error_of(bytes_request(client, shape, raw), 400)


# --- rows and pixels ----------------------------------------------------------------------------------------------


def test_a_decompression_bomb_request_is_refused_from_its_headers(client: FlaskClient) -> None:
    bomb = png(5000, 5000)
    assert len(bomb) < 20_000
    error = error_of(predict_images(client, [bomb] * 50), 413)
    assert error == ("the images have 1250000000 pixels, over the limit of 50000000 pixels per request; "
                     "nothing was decoded")


def test_the_budget_is_checked_before_any_image_is_decoded(client: FlaskClient) -> None:
    claim = headers_only(5000, 5000)  # within the per-image limit, but its pixels cannot be decoded
    assert "image could not be decoded" in error_of(predict_images(client, [claim]), 400)
    assert "over the limit of 50000000 pixels per request" in error_of(predict_images(client, [claim] * 3), 413)


def test_max_request_pixels_setting() -> None:
    app = create_app({"TESTING": True, "reload_interval_s": 0.0, "max_request_pixels": 3_500})
    try:
        client = app.test_client()
        image = encoded(digit(), "PNG")  # 1600 pixels
        assert predict_images(client, [image, image]).status_code == 200
        assert "over the limit of 3500 pixels per request" in error_of(predict_images(client, [image] * 3), 413)
    finally:
        close_app(app)


def test_the_instance_count_is_checked_before_any_decoding(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE_DIR / "digits-light", tmp_path / "digits-light")
    spec = tmp_path / "digits-light" / "model.toml"
    spec.write_text(spec.read_text().replace("[options]\n", "[options]\nmax_instances = 2\n"))
    app = create_app({"TESTING": True, "models_dir": tmp_path, "reload_interval_s": 0.0})
    try:
        error = error_of(predict_images(app.test_client(), [png(5000, 5000)] * 3), 400)
        assert error == "instances: 3 rows in one request; model 'digits-light' takes at most 2"
    finally:
        close_app(app)


def test_a_job_is_held_to_the_request_budget_by_its_worker(redis_url: str) -> None:
    eager = {"task_always_eager": True, "task_eager_propagates": True}
    app = create_app({"TESTING": True, "redis_url": redis_url, "celery": eager})
    try:
        client = app.test_client()
        body = {"instances": [b64(headers_only(5000, 5000))] * 3}
        submitted = client.post("/v1/models/digits-light:submit", json=body)
        assert submitted.status_code == 202, submitted.get_json()
        job = client.get(submitted.get_json()["status_url"]).get_json()
        assert job["status"] == "failed"
        assert "over the limit of 50000000 pixels per request; nothing was decoded" in job["error"]
    finally:
        close_app(app)


def image_inputs(images: list[bytes]) -> dict[str, np.ndarray]:
    """Encoded images as the array of digits-light's input."""
    array = np.empty(len(images), dtype=object)
    array[:] = images
    return {"pixels": array}


def test_a_pixel_budget_is_shared_by_the_calls_it_is_passed_to(registry: Registry) -> None:
    version = registry.get("digits-light")
    image = encoded(digit(), "PNG")
    budget = PixelBudget(4_000, "job")
    assert models.prepare(version, image_inputs([image, image]), pixels=budget)["pixels"].shape == (2, 64)
    assert budget.left == 800
    with pytest.raises(models.InputTooLarge, match=r"1600 pixels, over the limit of 4000 pixels per job \(800 left\)"):
        models.prepare(version, image_inputs([image]), pixels=budget)
    assert budget.left == 800


def test_a_batch_chunk_decodes_no_more_than_its_budget(registry: Registry) -> None:
    version = registry.get("digits-light")
    item = json.dumps(b64(encoded(digit(), "PNG")))  # 1600 pixels
    outcomes = batch.predict_json(version, [item, item, item], pixels=3_500)
    assert [ok for ok, _ in outcomes] == [True, True, False]
    assert "over the limit of 3500 pixels per batch chunk (300 left)" in outcomes[2][1]
    assert all(ok for ok, _ in batch.predict_json(version, [item, item, item], pixels=4_800))


# --- formats --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF"])
def test_a_format_the_spec_does_not_declare_is_refused(client: FlaskClient, fmt: str) -> None:
    error = error_of(predict_images(client, [encoded(digit(), fmt)]), 400)
    assert error == "input 'pixels'[0]: not a PNG or JPEG image (the formats this input takes)"
    for declared in ("PNG", "JPEG"):
        assert predict_images(client, [encoded(digit(), declared)]).status_code == 200


def with_formats(tmp_path: Path, formats: object) -> Path:
    """A repository holding digits-light whose convert step declares `formats`."""
    shutil.copytree(PACKAGE_DIR / "digits-light", tmp_path / "digits-light")
    spec = tmp_path / "digits-light" / "model.toml"
    declared = f'step = "convert"\nmode = "L"\nformats = {json.dumps(formats)}\n'
    spec.write_text(spec.read_text().replace('step = "convert"\nmode = "L"\n', declared, 1))
    return tmp_path


def test_the_declared_formats_are_the_only_ones_decoded(tmp_path: Path) -> None:
    version = Registry(Settings(models_dir=with_formats(tmp_path, ["gif"]))).get("digits-light")
    assert version.spec.inputs[0].image.formats == ("GIF",)
    assert models.prepare(version, image_inputs([encoded(digit(), "GIF")]))["pixels"].shape == (1, 64)
    with pytest.raises(models.InvalidInput, match=r"not a GIF image"):
        models.prepare(version, image_inputs([encoded(digit(), "PNG")]))


@pytest.mark.parametrize(("formats", "named"), [
    (["PNG", "NOPE"], "formats[1]: 'NOPE' is not a format Pillow reads"),
    ([], "formats: must name at least one format"),
])
def test_a_spec_naming_unknown_formats_is_refused(tmp_path: Path, formats: list[str], named: str) -> None:
    registry = Registry(Settings(models_dir=with_formats(tmp_path, formats)))
    with pytest.raises(models.ModelNotFound):
        registry.get("digits-light")
    (problem,) = registry.problems.values()
    assert named in problem


# --- failures that are not the client's -----------------------------------------------------------------------


@pytest.fixture
def gather_client(tmp_path: Path) -> Iterator[FlaskClient]:
    """A client of an app over the gather model."""
    app = create_app({"TESTING": True, "models_dir": gather_model(tmp_path), "reload_interval_s": 0.0})
    yield app.test_client()
    close_app(app)


def test_a_runtime_failure_is_a_logged_5xx(gather_client: FlaskClient, caplog: pytest.LogCaptureFixture) -> None:
    ok = gather_client.post("/v1/models/gather:predict", json={"instances": [[3]]})
    assert ok.get_json() == {"predictions": [[3.0]]}
    with caplog.at_level(logging.ERROR, logger="models"):
        response = gather_client.post("/v1/models/gather:predict", json={"instances": [[99]]})
    assert response.status_code == 500
    assert response.get_json()["error"].startswith("model 'gather' failed while running: ")
    assert any(r.name == "models.runtime" and "model gather" in r.getMessage() for r in caplog.records)


def test_a_runtime_failure_is_model_failed(tmp_path: Path) -> None:
    version = Registry(Settings(models_dir=gather_model(tmp_path))).get("gather")
    with pytest.raises(models.ModelFailed, match="model 'gather' failed while running"):
        models.predict(version, {"index": np.array([[99]], np.int64)})


def test_an_image_step_failing_is_model_failed_and_logged(
    registry: Registry, caplog: pytest.LogCaptureFixture,
) -> None:
    version = registry.get("digits-light")
    (pixels,) = version.spec.inputs

    def out_of_memory(image: Image.Image) -> Image.Image:
        raise MemoryError

    broken = replace(pixels, image=replace(pixels.image, steps=(out_of_memory,)))
    failing = replace(version, spec=replace(version.spec, inputs=(broken,)))
    with caplog.at_level(logging.ERROR, logger="models"), pytest.raises(models.ModelFailed) as raised:
        models.prepare(failing, image_inputs([encoded(digit(), "PNG")]))
    assert str(raised.value) == "model 'digits-light' failed to preprocess input 'pixels'[0] (MemoryError)"
    assert any("model digits-light" in r.getMessage() for r in caplog.records)


def test_a_truncated_image_is_the_clients_error(registry: Registry) -> None:
    image = encoded(digit(), "PNG")
    with pytest.raises(models.InvalidInput, match=r"input 'pixels'\[0\]: image could not be decoded"):
        models.prepare(registry.get("digits-light"), image_inputs([image[:60]]))


def test_only_system_errors_and_memory_are_the_servers() -> None:
    assert server_fault(MemoryError())
    assert server_fault(OSError(errno.EMFILE, "Too many open files"))
    assert not server_fault(OSError("image file is truncated (3 bytes not processed)"))
    assert not server_fault(SyntaxError("not a PNG file"))
    assert not server_fault(ValueError("broken data stream"))
