"""Image preprocessing: photos of digits, an ImageNet-style network, and image bombs and bad images."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from flask.testing import FlaskClient
from onnx import TensorProto, helper
from PIL import Image

from models import spec as specs
from models.config import PACKAGE_DIR
from models.image import ImagePipeline
from models.training import held_out
from webapp import close_app, create_app

SAMPLES = 50
INK_THRESHOLD = 64  # the digits specs' crop_to_content threshold, on the 0-255 scale
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
WEIGHTS = np.array([[2.0, -1.0, 0.5], [0.0, 1.5, -0.5], [-1.0, 0.5, 1.0]], np.float32)
ORIENTATION = 0x0112


def b64(data: bytes) -> dict[str, str]:
    """A TensorFlow Serving binary value."""
    return {"b64": base64.b64encode(data).decode()}


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    """The image saved in `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# --- photos of scikit-learn's digits -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The first held-out digits of the digits models' evaluation split, and their classes."""
    evaluation = specs.load(PACKAGE_DIR / "digits-light").evaluation
    assert evaluation is not None
    _, x_test, _, y_test = held_out(evaluation)
    return x_test[:SAMPLES], y_test[:SAMPLES]


def digit_photo(digit: np.ndarray, i: int) -> bytes:
    """A photo of a digit: dark ink on light paper, off-centre on a bigger canvas, in one of five forms."""
    ink = digit.reshape(8, 8) / 16
    cell = 10 + i % 4
    offset = (15 + 7 * (i % 9), 10 + 5 * (i % 7))
    variant = i % 5
    if variant == 2:  # ink on a transparent sheet
        alpha = Image.fromarray(np.rint(ink * 255).astype(np.uint8), "L")
        alpha = alpha.resize((8 * cell,) * 2, Image.Resampling.NEAREST)
        sheet = Image.new("RGBA", (220, 180), (0, 0, 0, 0))
        sheet.paste(Image.merge("RGBA", (*[Image.new("L", alpha.size, 20)] * 3, alpha)), offset)
        return encoded(sheet, "PNG")
    paper, pen = 235 - 3 * (i % 6), 25 + 4 * (i % 5)
    gray = np.rint(paper - ink * (paper - pen)).astype(np.uint8)
    canvas = Image.new("L", (220, 180), paper)
    canvas.paste(Image.fromarray(gray, "L").resize((8 * cell,) * 2, Image.Resampling.NEAREST), offset)
    if variant == 0:
        return encoded(canvas, "JPEG", quality=95)
    if variant == 1:
        return encoded(canvas, "PNG")
    # stored turned; the EXIF Orientation tag says how to turn it back (6: 90 degrees clockwise)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    turned = canvas.convert("RGB").transpose(Image.Transpose.ROTATE_90)
    return encoded(turned, "JPEG" if variant == 3 else "PNG", exif=exif, quality=95)


def recentred(digit: np.ndarray, threshold: float = INK_THRESHOLD) -> np.ndarray:
    """The digit as crop_to_content frames it: full contrast, centred on the bounding box of its ink.

    scikit-learn's digits are not always centred on that box, so the box can move by half a cell (then two
    neighbouring columns average) or more.
    """
    level = digit.reshape(8, 8) * 16 / digit.max()  # autocontrast: the darkest ink becomes full black
    rows, cols = np.nonzero(level * 255 / 16 > threshold)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(bottom - top, right - left)
    halves = np.zeros((48, 48))
    halves[16:32, 16:32] = np.kron(level, np.ones((2, 2)))
    y0, x0 = 16 + top + bottom - side, 16 + left + right - side
    window = halves[y0:y0 + 2 * side, x0:x0 + 2 * side]
    return window.reshape(8, 2 * side // 8, 8, 2 * side // 8).mean(axis=(1, 3)).reshape(-1)


def test_digit_photos_preprocess_to_the_digit(digits: tuple[np.ndarray, np.ndarray]) -> None:
    pipeline = specs.load(PACKAGE_DIR / "digits-light").inputs[0].image
    assert pipeline is not None
    x, _ = digits
    for i, digit in enumerate(x):
        tensor = pipeline.tensor(pipeline.open(digit_photo(digit, i), max_pixels=10**6))
        assert tensor.shape == (8, 8, 1)
        # a photo rounds ink to whole levels (and JPEG moves them a little), so ink within a few levels of
        # the threshold (value 4 of 16 is 63.75 of 255) may fall on either side of it
        error = min(np.abs(tensor.reshape(-1) - recentred(digit, INK_THRESHOLD + d)).mean() for d in (-3, 3))
        assert error < 2, f"photo {i} (variant {i % 5}): mean absolute error {error:.2f} on the 0-16 scale"


def test_recentring_keeps_a_centred_digit() -> None:
    digit = np.zeros((8, 8))
    digit[:, 2:6] = 16
    np.testing.assert_array_equal(recentred(digit), digit.reshape(-1))
    shifted = np.roll(digit, 1, axis=1)
    np.testing.assert_array_equal(recentred(shifted), digit.reshape(-1))


def photo_predictions(client: FlaskClient, name: str, x: np.ndarray) -> np.ndarray:
    """The classes a model predicts for photos of the digits, sent as images over HTTP."""
    instances = [b64(digit_photo(digit, i)) for i, digit in enumerate(x)]
    response = client.post(f"/v1/models/{name}:predict", json={"instances": instances})
    assert response.status_code == 200, response.json
    return np.array([row["label"] for row in response.json["predictions"]])


def test_photos_of_digits_are_recognised(client: FlaskClient, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    from_photos = photo_predictions(client, "digits-heavy", x)
    assert np.mean(from_photos == y) >= 0.9
    tensors = [recentred(digit).tolist() for digit in x]
    response = client.post("/v1/models/digits-heavy:predict", json={"instances": tensors})
    assert response.status_code == 200
    from_tensors = np.array([row["label"] for row in response.json["predictions"]])
    assert np.mean(from_photos == from_tensors) >= 0.9


# --- an ImageNet-style network -----------------------------------------------------------------------------


def network(layout: str) -> bytes:
    """A tiny image classifier: global average pool, a 3x3 linear layer, softmax; it also outputs the pool."""
    nchw = layout == "NCHW"
    shape = ["N", 3, 224, 224] if nchw else ["N", 224, 224, 3]
    nodes = [] if nchw else [helper.make_node("Transpose", ["image"], ["chw"], perm=[0, 3, 1, 2])]
    nodes += [
        helper.make_node("GlobalAveragePool", ["image" if nchw else "chw"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["pooled"], axis=1),
        helper.make_node("MatMul", ["pooled", "weights"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_imagenet",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("pooled", "probabilities")],
        [helper.make_tensor("weights", TensorProto.FLOAT, [3, 3], WEIGHTS.reshape(-1).tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model.SerializeToString()


def step(name: str, **fields: object) -> str:
    """One [[inputs.preprocess]] table."""
    lines = [f'step = "{name}"'] + [f"{k} = {v!r}".replace("'", '"') for k, v in fields.items()]
    return "[[inputs.preprocess]]\n" + "\n".join(lines) + "\n"


def network_spec(resize: str, layout: str) -> str:
    """A model.toml declaring ImageNet preprocessing with the given resize mode and layout."""
    shape = [-1, 3, 224, 224] if layout == "NCHW" else [-1, 224, 224, 3]
    geometry = (step("resize", size=256, mode="shorter") + step("center_crop", size=224)
                if resize == "shorter" else step("resize", size=224, mode=resize))
    outputs = "".join(
        f'[[outputs]]\nname = "{n}"\ndtype = "float32"\nshape = [-1, 3]\n\n'
        for n in ("pooled", "probabilities")
    )
    return (
        'labels = ["red", "green", "blue"]\n\n'
        f'[[inputs]]\nname = "image"\ndtype = "float32"\nshape = {shape}\n\n'
        + step("convert", mode="RGB") + geometry
        + step("normalize", scale=1 / 255, mean=MEAN.tolist(), std=STD.tolist())
        + step("layout", order=layout) + "\n" + outputs
        + '[[outputs]]\nname = "label_name"\ndtype = "bytes"\nshape = [-1]\n'
        'derive = "argmax_label"\nsource = "probabilities"\n'
    )


NETWORKS = {  # model name -> (resize mode, layout)
    "net-shorter": ("shorter", "NCHW"),
    "net-crop": ("crop", "NCHW"),
    "net-stretch": ("stretch", "NCHW"),
    "net-nhwc": ("shorter", "NHWC"),
}


@pytest.fixture(scope="module")
def networks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    """A client of an app over a repository of the tiny network under each preprocessing."""
    root: Path = tmp_path_factory.mktemp("networks")
    for name, (resize, layout) in NETWORKS.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "model.toml").write_text(network_spec(resize, layout))
        (root / name / "1" / "model.onnx").write_bytes(network(layout))
    app = create_app({"TESTING": True, "models_dir": root, "reload_interval_s": 0.0})
    yield app.test_client()


def window(size: tuple[int, int], resize: str) -> tuple[float, float, float, float]:
    """The part of a (width, height) image the network sees, in its pixels: left, top, right, bottom."""
    width, height = size
    if resize == "stretch":
        return 0, 0, width, height
    if resize == "crop":
        side = min(width, height)
        return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2
    scale = 256 / min(width, height)
    resized_w, resized_h = round(width * scale), round(height * scale)
    left, top = (resized_w - 224) // 2, (resized_h - 224) // 2
    return left / scale, top / scale, (left + 224) / scale, (top + 224) / scale


def seen_colour(pixels: np.ndarray, resize: str) -> np.ndarray:
    """The mean colour of the window of an image the network sees."""
    left, top, right, bottom = (round(v) for v in window((pixels.shape[1], pixels.shape[0]), resize))
    return pixels[top:bottom, left:right].reshape(-1, 3).mean(axis=0)


def expected(pixels: np.ndarray, resize: str) -> tuple[np.ndarray, np.ndarray]:
    """The pooled channels and probabilities, from the mean colour of the window the network sees."""
    pooled = (seen_colour(pixels, resize) / 255 - MEAN) / STD
    logits = pooled @ WEIGHTS
    return pooled, np.exp(logits) / np.exp(logits).sum()


def classify(client: FlaskClient, name: str, image: bytes) -> dict:
    """One prediction of a network, the image sent as base64 over TensorFlow Serving REST."""
    response = client.post(f"/v1/models/{name}:predict", json={"instances": [b64(image)]})
    assert response.status_code == 200, response.json
    return response.json["predictions"][0]


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize(("size", "colour"), [((640, 480), (200, 120, 40)), ((300, 500), (10, 90, 230))])
def test_solid_colour_is_exact(
    name: str, size: tuple[int, int], colour: tuple[int, int, int], networks: FlaskClient
) -> None:
    image = Image.new("RGB", size, colour)
    answer = classify(networks, name, encoded(image, "PNG"))
    pooled = (np.array(colour) / 255 - MEAN) / STD
    # the network pools 50176 values in float32; one level of 255 would be off by more than 0.017
    np.testing.assert_allclose(answer["pooled"], pooled, atol=1e-3)
    _, probabilities = expected(np.asarray(image, np.float64), NETWORKS[name][0])
    np.testing.assert_allclose(answer["probabilities"], probabilities, atol=1e-3)
    assert answer["label_name"] == ["red", "green", "blue"][int(np.argmax(probabilities))]


def banded(width: int, height: int) -> Image.Image:
    """Red in the middle, blue bands at the ends of the long side, a green gradient across the short side."""
    pixels = np.zeros((height, width, 3), np.uint8)
    band = max(width, height) // 5
    along = np.arange(max(width, height))
    middle = (along >= band) & (along < max(width, height) - band)
    if height >= width:
        pixels[middle, :, 0], pixels[~middle, :, 2] = 255, 255
        pixels[:, :, 1] = np.rint(np.linspace(0, 255, width))[None, :]
    else:
        pixels[:, middle, 0], pixels[:, ~middle, 2] = 255, 255
        pixels[:, :, 1] = np.rint(np.linspace(0, 255, height))[:, None]
    return Image.fromarray(pixels, "RGB")


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("size", [(300, 500), (640, 480), (500, 180)])
def test_geometry_matches_the_declared_resize(
    name: str, size: tuple[int, int], networks: FlaskClient
) -> None:
    image = banded(*size)
    answer = classify(networks, name, encoded(image, "PNG"))
    pooled, probabilities = expected(np.asarray(image, np.float64), NETWORKS[name][0])
    np.testing.assert_allclose(answer["pooled"], pooled, atol=0.035)  # 2 levels of 255
    np.testing.assert_allclose(answer["probabilities"], probabilities, atol=0.02)


def test_the_resize_modes_see_different_parts() -> None:
    tall, wide = np.asarray(banded(300, 500), np.float64), np.asarray(banded(640, 480), np.float64)
    assert seen_colour(tall, "shorter")[2] == seen_colour(tall, "crop")[2] == 0  # the blue bands are cut away
    assert seen_colour(tall, "stretch")[2] == pytest.approx(0.4 * 255)
    blue = [seen_colour(wide, mode)[2] / 255 for mode in ("shorter", "crop", "stretch")]
    assert blue == pytest.approx([36 / 420, 0.2, 0.4], abs=0.003)


def test_v2_binary_bytes_input_is_preprocessed(networks: FlaskClient) -> None:
    image = encoded(Image.new("RGB", (640, 480), (30, 200, 90)), "JPEG", quality=100)
    header = {
        "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": 4 + len(image)}}],
        "outputs": [{"name": "pooled"}],
    }
    head = json.dumps(header).encode()
    response = networks.post(
        "/v2/models/net-nhwc/infer", data=head + struct.pack("<I", len(image)) + image,
        headers={"Inference-Header-Content-Length": str(len(head))}, content_type="application/octet-stream",
    )
    assert response.status_code == 200, response.json
    (output,) = response.json["outputs"]
    assert output["shape"] == [1, 3]
    np.testing.assert_allclose(output["data"], (np.array([30, 200, 90]) / 255 - MEAN) / STD, atol=0.02)


# --- bombs and bad images ----------------------------------------------------------------------------------


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit PNG of any size, compressed row by row so it is never held in memory."""
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed pixels
    deflate = zlib.compressobj(1)
    rows_per_block = max(1, 4_000_000 // len(row))
    starts = range(0, height, rows_per_block)
    blocks = [deflate.compress(row * min(rows_per_block, height - y)) for y in starts]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", b"".join(blocks) + deflate.flush()) + png_chunk(b"IEND", b""))


def test_blank_png_is_a_valid_image() -> None:
    image = Image.open(io.BytesIO(blank_png(37, 21)))
    image.load()
    assert image.size == (37, 21)
    assert image.getextrema() == (0, 0)


def predict_image(client: FlaskClient, data: bytes, name: str = "digits-light") -> tuple[int, dict]:
    """Status and JSON body of predicting one encoded image."""
    response = client.post(f"/v1/models/{name}:predict", json={"instances": [b64(data)]})
    assert response.is_json
    return response.status_code, response.json


@pytest.mark.parametrize("side", [30_000, 10_000, 6_000])
def test_image_bomb_is_refused(side: int, client: FlaskClient, digits: tuple[np.ndarray, np.ndarray]) -> None:
    status, body = predict_image(client, blank_png(side, side))
    assert status == 413
    assert "pixels" in body["error"]
    x, y = digits
    status, body = predict_image(client, digit_photo(x[1], 1))
    assert (status, body["predictions"][0]["label"]) == (200, y[1])


def test_max_image_pixels_setting() -> None:
    app = create_app({"TESTING": True, "reload_interval_s": 0.0, "max_image_pixels": 5_000})
    client = app.test_client()
    status, body = predict_image(client, encoded(Image.new("L", (100, 100), 255), "PNG"))
    assert status == 413
    assert "100x100" in body["error"] and "5000" in body["error"]
    status, _ = predict_image(client, encoded(Image.new("L", (70, 70), 255), "PNG"))
    assert status == 200


def noise() -> Image.Image:
    """A seeded noisy grey image, so its encodings are long enough to cut."""
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 256, (90, 120), dtype=np.uint8), "L")


BAD_IMAGES = {
    "truncated-jpeg": lambda: encoded(noise(), "JPEG", quality=90)[:2_000],
    "truncated-png": lambda: encoded(noise(), "PNG")[:2_000],
    "random-bytes": lambda: np.random.default_rng(3).bytes(4_000),
    "empty": lambda: b"",
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_is_a_client_error(kind: str, client: FlaskClient) -> None:
    status, body = predict_image(client, BAD_IMAGES[kind]())
    assert status == 400
    assert "image" in body["error"]


COMMON_FORMATS = ["PNG", "GIF", "BMP", "WEBP", "TIFF"]


@pytest.fixture(scope="module")
def formats_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    """A client of an app over a copy of digits-heavy whose spec declares more formats than PNG and JPEG."""
    root: Path = tmp_path_factory.mktemp("formats")
    shutil.copytree(PACKAGE_DIR / "digits-heavy", root / "digits-heavy")
    spec = root / "digits-heavy" / "model.toml"
    declared = 'step = "convert"\nmode = "L"\nformats = ' + json.dumps(COMMON_FORMATS) + "\n"
    spec.write_text(spec.read_text().replace('step = "convert"\nmode = "L"\n', declared, 1))
    app = create_app({"TESTING": True, "models_dir": root, "reload_interval_s": 0.0})
    yield app.test_client()
    close_app(app)


def preprocessed(pipeline: ImagePipeline, data: bytes) -> np.ndarray:
    """One encoded image as the pipeline turns it into a tensor."""
    return pipeline.tensor(pipeline.open(data, 10**6))


@pytest.mark.parametrize(("fmt", "mode"), [("GIF", "L"), ("BMP", "RGB"), ("WEBP", "RGB"), ("TIFF", "L")])
def test_declared_formats_are_decoded(
    fmt: str, mode: str, client: FlaskClient, formats_client: FlaskClient, digits: tuple[np.ndarray, np.ndarray]
) -> None:
    pipeline = specs.load(PACKAGE_DIR / "digits-heavy").inputs[0].image
    assert pipeline is not None
    wider = replace(pipeline, formats=tuple(COMMON_FORMATS))
    x, _ = digits
    for i in (1, 6, 11):  # PNG photos
        png = digit_photo(x[i], i)
        photo = Image.open(io.BytesIO(png)).convert(mode)
        options = {"lossless": True} if fmt == "WEBP" else {}
        data = encoded(photo, fmt, **options)
        assert Image.open(io.BytesIO(data)).format == fmt
        np.testing.assert_array_equal(preprocessed(wider, data), preprocessed(pipeline, png))
        status, body = predict_image(formats_client, data, "digits-heavy")
        assert status == 200, body
        assert body == predict_image(formats_client, png, "digits-heavy")[1]
        status, body = predict_image(client, data, "digits-heavy")  # the committed spec declares none
        assert (status, body["error"]) == (400, "input 'pixels'[0]: not a PNG or JPEG image "
                                                "(the formats this input takes)")
