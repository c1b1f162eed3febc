"""No client input makes the API answer 5xx.

First schemathesis fuzzes every operation of the app's own OpenAPI document, in process and again over HTTP
against the web process under gunicorn (conftest's `live_server`); then property tests aim at the request
codecs: TF Serving rows and columns, V2 JSON and binary tensors, wire encodings, and encoded images.
Every answer must be below 500, every error a JSON object with an "error" string, every 200 the documented
shape. Generation is derandomized and keeps no example database, so runs are reproducible.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import math
import os
import struct
import zlib

import numpy as np
import schemathesis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.config import SchemathesisConfig
from werkzeug.test import TestResponse

from models.tensor import TensorSpec
from webapp import create_app

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "mysql+pymysql://root@127.0.0.1:3306/test")

APP = create_app({"TESTING": True, "redis_url": REDIS_URL, "database_url": DATABASE_URL, "result_expires_s": 60})
CLIENT = APP.test_client()
REGISTRY = APP.extensions["registry"]
MODELS = ("iris", "digits-light")
MODEL_OPERATIONS = r"^/v[12]/models/\{name\}(:predict|/infer)$"
HEADER = "Inference-Header-Content-Length"


def assert_json_error(status: int, content: bytes) -> None:
    """Fail unless the answer is below 500 and, when not 2xx, a JSON object with an "error" string."""
    event(f"HTTP {status}")  # --hypothesis-show-statistics shows how many examples got past validation
    assert status < 500, content[:500]
    if status >= 300:
        body = json.loads(content)
        assert isinstance(body, dict) and isinstance(body.get("error"), str), body


# Schema-driven: every operation of /openapi.json, with random path parameters and with real model names.


def schemathesis_config(name: str | None = None) -> SchemathesisConfig:
    """A reproducible schemathesis setup; `name`, when given, is the `name` of every path."""
    data: dict = {
        "seed": 20240601,
        "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        "generation": {"deterministic": True, "database": "none", "max-examples": 10 if name is None else 40},
        # The document is the same for every model, so a schema-valid body (any input name, any shape)
        # is rightly refused by most models: a 400 there is no failure.
        "checks": {"positive_data_acceptance": {"enabled": False}},
    }
    if name is not None:
        data["parameters"] = {"path.name": name}
    return SchemathesisConfig.from_dict(data)


def model_schema(name: str, over_http: bool = False) -> schemathesis.BaseSchema:
    """The predict and infer operations of one real model, so generated bodies reach validation."""
    return api_schema(name, over_http).include(method="POST", path_regex=MODEL_OPERATIONS)


def api_schema(name: str | None = None, over_http: bool = False) -> schemathesis.BaseSchema:
    """The app's document; its cases go to the app in process, or `over_http` to the base URL each call names."""
    config = schemathesis_config(name)
    if over_http:  # a schema with no app is sent with requests
        return schemathesis.openapi.from_dict(CLIENT.get("/openapi.json").get_json(), config=config)
    return schemathesis.openapi.from_wsgi("/openapi.json", APP, config=config)


API = api_schema()
IRIS = model_schema("iris")
DIGITS = model_schema("digits-light")
LIVE_API = api_schema(over_http=True)
LIVE_IRIS = model_schema("iris", over_http=True)
LIVE_DIGITS = model_schema("digits-light", over_http=True)


def call_and_check(case: schemathesis.Case, base_url: str | None = None) -> None:
    """Send the case to the app (or to the server at `base_url`), run schemathesis' own checks and ours."""
    response = case.call_and_validate(base_url=base_url)
    assert_json_error(response.status_code, response.content)


@API.parametrize()
def test_every_operation_answers_without_server_errors(case: schemathesis.Case) -> None:
    call_and_check(case)


@IRIS.parametrize()
def test_iris_answers_generated_bodies_without_server_errors(case: schemathesis.Case) -> None:
    call_and_check(case)


@DIGITS.parametrize()
def test_digits_answers_generated_bodies_without_server_errors(case: schemathesis.Case) -> None:
    call_and_check(case)


@LIVE_API.parametrize()
def test_every_operation_answers_over_http_without_server_errors(case: schemathesis.Case, live_server: str) -> None:
    call_and_check(case, live_server)


@LIVE_IRIS.parametrize()
def test_iris_answers_generated_bodies_over_http_without_server_errors(case: schemathesis.Case,
                                                                       live_server: str) -> None:
    call_and_check(case, live_server)


@LIVE_DIGITS.parametrize()
def test_digits_answers_generated_bodies_over_http_without_server_errors(case: schemathesis.Case,
                                                                         live_server: str) -> None:
    call_and_check(case, live_server)


# Property tests aimed at the codecs, through the test client.

FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, database=None, print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES")
ITEM_SIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2,
             "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8, "BYTES": 4}
LATIN_1 = st.characters(min_codepoint=32, max_codepoint=255, exclude_characters="\x7f")
HEADER_TEXT = st.text(LATIN_1, max_size=12)
"""Header values as a client can send them: latin-1, so digits such as '²' that int() refuses."""
LENGTHS = (st.none() | st.integers(-3, 2**70).map(str) | HEADER_TEXT
           | st.sampled_from(["²", "1²", " 12 ", "+1", "-0", "0x10", "1e3", "9" * 5000]))

TEXT = st.text(max_size=10) | st.sampled_from(["\ud800", "a\udfff", "\U0001f600"])
"""Strings, with lone surrogates (JSON escapes carry them, yet they are not Unicode) and an emoji."""
FINITE = st.floats(-1e4, 1e4) | st.integers(-20, 20)
FLOATS = st.floats() | st.floats(width=32) | st.sampled_from([math.nan, math.inf, 1e308, -1e39, 3.5e38])
INTEGERS = st.integers(-20, 20) | st.integers() | st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**64,
                                                                    10**400])
NUMBERS = FLOATS | INTEGERS | st.booleans()
B64 = st.binary(max_size=40).map(lambda b: {"b64": base64.b64encode(b).decode()}) | st.fixed_dictionaries(
    {"b64": TEXT | INTEGERS}, optional={"x": st.none()})
SCALARS = NUMBERS | st.none() | TEXT | B64
NAMES = st.sampled_from(["features", "pixels", "label", "probabilities", "label_name", "b64", "inputs", ""])
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(NAMES | TEXT, inner, max_size=3),
    max_leaves=30,
)


def model_input(model: str) -> TensorSpec:
    """The one input of a reference model."""
    (spec,) = REGISTRY.get(model).spec.inputs
    return spec


def rows(width: int, values: st.SearchStrategy = FINITE, max_rows: int = 4) -> st.SearchStrategy[list]:
    """One to `max_rows` rows of `width` values."""
    return st.lists(st.lists(values, min_size=width, max_size=width), min_size=1, max_size=max_rows)


def assert_output_row(row: dict, model: str) -> None:
    """One row of a model's outputs, as its spec declares them."""
    spec = REGISTRY.get(model).spec
    labels = list(spec.labels)
    assert set(row) == {o.name for o in spec.outputs}
    assert row["label"] in range(len(labels))
    assert len(row["probabilities"]) == len(labels) and all(math.isfinite(p) for p in row["probabilities"])
    assert row["label_name"] == labels[row["label"]]


def assert_tfserving_answer(response: TestResponse, model: str, key: str) -> None:
    """An error, or predictions (row format) / outputs (columnar) holding every output of the model."""
    assert_json_error(response.status_code, response.data)
    if response.status_code != 200:
        return
    body = response.get_json()
    if key == "instances":
        assert set(body) == {"predictions"} and body["predictions"]
        for row in body["predictions"]:
            assert_output_row(row, model)
        return
    assert set(body) == {"outputs"}
    columns = body["outputs"]
    assert set(columns) == {o.name for o in REGISTRY.get(model).spec.outputs}
    for i in range(len(columns["label"])):
        assert_output_row({name: column[i] for name, column in columns.items()}, model)


def assert_v2_answer(response: TestResponse, model: str, request_id: object = None) -> None:
    """An error, or a V2 infer response whose tensors fill their shapes, binary ones included."""
    assert_json_error(response.status_code, response.data)
    if response.status_code != 200:
        return
    split = int(response.headers.get(HEADER, len(response.data)))
    head, tail = json.loads(response.data[:split]), response.data[split:]
    assert head["model_name"] == model and head["model_version"] == str(REGISTRY.get(model).number)
    assert head.get("id") == request_id
    outputs = {o.name: o for o in REGISTRY.get(model).spec.outputs}
    binary = 0
    for output in head["outputs"]:
        assert output["datatype"] == outputs[output["name"]].dtype.v2
        if "data" in output:
            assert len(output["data"]) == math.prod(output["shape"])
        else:
            binary += output["parameters"]["binary_data_size"]
    assert binary == len(tail)


def post_json(path: str, body: object) -> TestResponse:
    """POST a JSON body written with NaN and Infinity tokens, as TensorFlow Serving clients may."""
    return CLIENT.post(path, data=json.dumps(body), content_type="application/json")


@FUZZ
@given(model=st.sampled_from(MODELS), version=st.none() | st.integers(-2, 3) | JSON_VALUES,
       instances=rows(4) | rows(4, NUMBERS) | rows(64, NUMBERS) | JSON_VALUES)
def test_batch_registrations_never_fail_the_server(model: str, version: object, instances: object) -> None:
    body = {"model": model, "instances": instances} | ({} if version is None else {"version": version})
    response = post_json("/v1/batch/items", body)
    assert_json_error(response.status_code, response.data)
    if response.status_code == 201:
        assert len(response.get_json()["ids"]) == len(instances)


@st.composite
def tfserving_requests(draw: st.DrawFn) -> tuple[str, str, object]:
    """A model, the body key (instances or inputs) and any value: well-formed rows, odd numbers, junk."""
    model, key = draw(st.sampled_from(MODELS)), draw(st.sampled_from(["instances", "inputs"]))
    spec = model_input(model)
    value = draw(rows(spec.shape[1]) | rows(spec.shape[1], NUMBERS) | rows(draw(st.integers(0, 65)), NUMBERS)
                 | JSON_VALUES)
    if key == "inputs" and draw(st.booleans()):
        value = {spec.name: value}
    return model, key, value


@FUZZ
@given(request=tfserving_requests())
def test_tfserving_values_never_fail_the_server(request: tuple[str, str, object]) -> None:
    model, key, value = request
    response = post_json(f"/v1/models/{model}:predict", {key: value})
    assert_tfserving_answer(response, model, key)


@st.composite
def v2_tensors(draw: st.DrawFn, spec: TensorSpec, honest: bool) -> dict:
    """An input tensor that fits `spec` (its values may still be anything), or has some fields wrong."""
    data = draw(rows(spec.shape[1]) | rows(spec.shape[1], NUMBERS))
    tensor = {"name": spec.name, "shape": [len(data), len(data[0])], "datatype": spec.dtype.v2,
              "data": draw(st.sampled_from([data, [v for row in data for v in row]]))}
    if honest:
        return tensor
    junk = {
        "name": JSON_VALUES | st.text(max_size=8),
        "shape": st.lists(st.integers(0, 4) | st.integers(0, 2**62) | st.integers(-2, 2), max_size=4)
        | JSON_VALUES,
        "datatype": st.sampled_from(DATATYPES) | st.text(max_size=5) | SCALARS,
        "data": JSON_VALUES,
        "parameters": st.fixed_dictionaries({"binary_data_size": INTEGERS | SCALARS}) | JSON_VALUES,
    }
    wrong = draw(st.sets(st.sampled_from(sorted(junk)), min_size=1))
    for field in sorted(wrong):  # a set's order changes with the hash seed, and so would the draws
        tensor[field] = draw(junk[field])
    return tensor


@st.composite
def v2_bodies(draw: st.DrawFn, model: str) -> dict:
    """An infer request for `model`: well-formed, or with junk in any of its fields."""
    honest = draw(st.booleans())
    outputs = [o.name for o in REGISTRY.get(model).spec.outputs]
    tensors = st.lists(v2_tensors(model_input(model), honest), min_size=1, max_size=1 if honest else 2)
    binary = st.fixed_dictionaries({"binary_data": st.booleans()})
    output = st.fixed_dictionaries({"name": st.sampled_from(outputs)}, optional={"parameters": binary})
    optional = {
        "id": TEXT,
        "parameters": st.fixed_dictionaries({"binary_data_output": st.booleans()}),
        "outputs": st.lists(output, max_size=3, unique_by=lambda o: o["name"]),
    }
    if not honest:
        tensors |= JSON_VALUES
        optional = {key: values | SCALARS for key, values in optional.items()} | {"extra": SCALARS}
    body = {"inputs": draw(tensors)}
    for key, values in optional.items():
        if draw(st.booleans()):
            body[key] = draw(values)
    return body


IRIS_ROW = {"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}


@FUZZ
@given(request=st.sampled_from(MODELS).flatmap(lambda m: st.tuples(st.just(m), v2_bodies(m))))
@example(request=("iris", {"inputs": [{**IRIS_ROW, "name": {}}]}))
@example(request=("iris", {"id": "\ud800", "inputs": [IRIS_ROW]}))
@example(request=("digits-light", {"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES",
                                                "data": ["\udc00"]}]}))
def test_v2_json_bodies_never_fail_the_server(request: tuple[str, dict]) -> None:
    model, body = request
    response = post_json(f"/v2/models/{model}/infer", body)
    assert_v2_answer(response, model, body.get("id"))


@st.composite
def binary_inputs(draw: st.DrawFn, spec: TensorSpec, honest: bool) -> tuple[dict, bytes]:
    """A binary input entry and its bytes: fitting `spec`, or with lying sizes, shapes and datatypes."""
    if honest:
        data = draw(rows(spec.shape[1], FINITE | st.floats(width=32), max_rows=3))
        raw = np.asarray(data, "<f4").tobytes()
        entry = {"name": spec.name, "shape": [len(data), spec.shape[1]], "datatype": "FP32"}
        return {**entry, "parameters": {"binary_data_size": len(raw)}}, raw
    datatype = draw(st.sampled_from(DATATYPES))
    shape = draw(st.lists(st.integers(0, 70) | st.integers(0, 2**40), max_size=3))
    fitting = math.prod(shape) * ITEM_SIZE[datatype] if math.prod(shape) < 4096 else 0
    size = draw(st.just(fitting) | st.integers(0, 300) | st.integers(-5, 2**40))
    fill = max(0, min(size, 1024))
    raw = draw(st.binary(min_size=fill, max_size=fill) | st.binary(max_size=64))
    if datatype == "BYTES" and draw(st.booleans()):
        items = draw(st.lists(st.binary(max_size=20), max_size=4))
        raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
    name = draw(st.sampled_from([spec.name, spec.name, "pixels", "features"]))
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}, raw


@st.composite
def binary_requests(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """A model, a JSON header announcing binary tensors with their bytes after it, and a header length."""
    model, honest = draw(st.sampled_from(MODELS)), draw(st.booleans())
    inputs = binary_inputs(model_input(model), honest)
    entries = draw(st.lists(inputs, min_size=1, max_size=1 if honest else 2))
    body: dict = {"inputs": [entry for entry, _ in entries]}
    if draw(st.booleans()):
        body["parameters"] = {"binary_data_output": draw(st.booleans())}
    header = json.dumps(body).encode()
    length = str(len(header))
    if not honest:
        length = draw(st.just(length) | LENGTHS)
    return model, header + b"".join(raw for _, raw in entries), length


@FUZZ
@given(request=binary_requests(),
       content_type=st.sampled_from(["application/octet-stream", "application/json"]))
def test_v2_binary_bodies_never_fail_the_server(request: tuple[str, bytes, str | None],
                                                content_type: str) -> None:
    model, data, length = request
    headers = {HEADER: length} if length is not None else {}
    response = CLIENT.post(f"/v2/models/{model}/infer", data=data, headers=headers, content_type=content_type)
    assert_v2_answer(response, model)


@FUZZ
@given(model=st.sampled_from(MODELS), data=st.binary(max_size=200),
       length=st.integers(-1, 300).map(str) | LENGTHS)
@example(model="iris", data=b"{}", length="²")  # a digit to str.isdigit(), not to int()
@example(model="iris", data=b"{}", length="9" * 5000)  # over int()'s 4300 digits
def test_v2_raw_bytes_never_fail_the_server(model: str, data: bytes, length: str | None) -> None:
    headers = {HEADER: length} if length is not None else {}
    response = CLIENT.post(f"/v2/models/{model}/infer", data=data, headers=headers,
                           content_type="application/octet-stream")
    assert_v2_answer(response, model)


def encode(data: bytes, how: str) -> bytes:
    """The body compressed as `how` says, or damaged on purpose."""
    if how == "gzip":
        return gzip.compress(data)
    if how == "deflate":
        return zlib.compress(data)
    if how == "truncated":
        return gzip.compress(data)[:-9]
    return data


@FUZZ
@given(
    v2=st.booleans(),
    content_type=st.sampled_from(["application/json", "application/octet-stream", "text/plain", "",
                                  "application/vnd.x+json", "application/json; charset=latin-1",
                                  "multipart/form-data; boundary=x"]) | HEADER_TEXT,
    encoding=st.sampled_from(["gzip", "deflate", "x-gzip", "identity", "", "br", " GZIP "])
    | HEADER_TEXT,
    how=st.sampled_from(["gzip", "deflate", "plain", "truncated"]),
)
def test_content_type_and_encoding_never_fail_the_server(v2: bool, content_type: str, encoding: str,
                                                         how: str) -> None:
    if v2:
        path, body = "/v2/models/iris/infer", {"inputs": [IRIS_ROW]}
    else:
        path, body = "/v1/models/iris:predict", {"instances": [IRIS_ROW["data"]]}
    response = CLIENT.post(path, data=encode(json.dumps(body).encode(), how),
                           headers={"Content-Type": content_type, "Content-Encoding": encoding})
    if v2:
        assert_v2_answer(response, "iris")
    else:
        assert_tfserving_answer(response, "iris", "instances")


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I", "I;16", "F", "CMYK", "YCbCr", "LAB"]
FORMATS = ["PNG", "GIF", "BMP", "TIFF", "JPEG", "WEBP", "PPM", "ICO"]


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """An encoded image of any mode, size, format and EXIF orientation (TIFF if the format refuses it)."""
    width, height = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32))).integers(0, 256, (height, width), np.uint8)
    image = Image.fromarray(pixels * draw(st.sampled_from([0, 1]))).convert(draw(st.sampled_from(MODES)))
    exif = Image.Exif()
    exif[0x0112] = draw(st.integers(0, 10))  # orientation, valid or not
    out = io.BytesIO()
    try:
        image.save(out, format=draw(st.sampled_from(FORMATS)), exif=exif.tobytes())
    except (OSError, KeyError, ValueError, TypeError):
        out = io.BytesIO()
        image.save(out, format="TIFF", exif=exif.tobytes())
    return out.getvalue()


PNG_TYPES = [(0, 1), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 8), (4, 8), (6, 8), (6, 16)]
"""(colour type, bit depth) pairs; a colour type's channels are CHANNELS[type]."""
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def pngs(draw: st.DrawFn) -> bytes:
    """A PNG made chunk by chunk: any declared size (up to 2^31-1 a side), palette, transparency, pixels."""
    color, depth = draw(st.sampled_from(PNG_TYPES))
    width, height = (draw(st.integers(1, 12) | st.integers(1, 2**31 - 1)) for _ in range(2))
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
    for kind, size in ((b"PLTE", 60), (b"tRNS", 40)):
        if draw(st.booleans()):
            out += png_chunk(kind, draw(st.binary(max_size=size)))
    fill = height * (1 + math.ceil(width * CHANNELS[color] * depth / 8)) if width * height <= 144 else 0
    pixels = draw(st.binary(min_size=fill, max_size=fill) | st.binary(max_size=64))
    return out + png_chunk(b"IDAT", zlib.compress(pixels)) + png_chunk(b"IEND", b"")


@st.composite
def damaged(draw: st.DrawFn, originals: st.SearchStrategy[bytes]) -> bytes:
    """A valid image with some bytes overwritten, maybe cut short."""
    data = bytearray(draw(originals))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        data[at:at + 4] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data[:draw(st.integers(1, len(data)))])


def lab_tiff() -> bytes:
    """A TIFF in the LAB mode, which Pillow decodes but cannot convert to L."""
    out = io.BytesIO()
    Image.new("LAB", (4, 4)).save(out, format="TIFF")
    return out.getvalue()


def overlong_transparency_png() -> bytes:
    """A palette PNG whose transparency table is longer than its palette."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 3, 0, 0, 0))
    body = png_chunk(b"PLTE", bytes(48)) + png_chunk(b"tRNS", b"\xff" * 300)
    pixels = png_chunk(b"IDAT", zlib.compress(b"\x00\x01\x02" * 2)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + header + body + pixels


@FUZZ
@given(image=st.binary(max_size=300) | images() | pngs() | damaged(images() | pngs()), v2=st.booleans())
@example(image=lab_tiff(), v2=False)
@example(image=overlong_transparency_png(), v2=True)
def test_encoded_images_never_fail_the_server(image: bytes, v2: bool) -> None:
    if not v2:
        response = post_json("/v1/models/digits-light:predict",
                             {"instances": [{"b64": base64.b64encode(image).decode()}]})
        assert_tfserving_answer(response, "digits-light", "instances")
        return
    header = json.dumps({"inputs": [{"name": "pixels", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(image) + 4}}]}).encode()
    data = header + struct.pack("<I", len(image)) + image
    response = CLIENT.post("/v2/models/digits-light/infer", data=data, headers={HEADER: str(len(header))},
                           content_type="application/octet-stream")
    assert_v2_answer(response, "digits-light")
