"""Sample inputs and reference answers shared by the protocol tests."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from werkzeug.test import TestResponse

from models import spec
from models.config import PACKAGE_DIR

IRIS_LABELS = spec.load(PACKAGE_DIR / "iris").labels


def iris_reference(rows: object) -> dict[str, np.ndarray]:
    """What the committed iris artefact answers for `rows` when onnxruntime runs it directly."""
    import onnxruntime as ort  # not at module level: see models/runtime.py

    session = ort.InferenceSession(str(PACKAGE_DIR / "iris" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"features": np.float32(rows)})
    names = np.array([IRIS_LABELS[i] for i in label])
    return {"label": label, "probabilities": probabilities, "label_name": names}


def error_of(response: TestResponse, status: int) -> str:
    """Check that `response` is a JSON error with `status`; answer its message."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.is_json
    message = response.get_json()["error"]
    assert isinstance(message, str) and message
    return message


def digit_png(pixels: np.ndarray) -> bytes:
    """Draw one of scikit-learn's 8x8 digits as a PNG: upscaled, dark ink on a larger light page."""
    ink = np.asarray(pixels, np.float32).reshape(8, 8)
    glyph = Image.fromarray(np.rint(255 - ink * 255 / 16).astype(np.uint8), "L")
    page = Image.new("L", (64, 64), 255)
    page.paste(glyph.resize((32, 32), Image.Resampling.NEAREST), (13, 20))
    out = io.BytesIO()
    page.save(out, "PNG")
    return out.getvalue()


class Receiver(http.server.BaseHTTPRequestHandler):
    """A callback receiver that answers the statuses queued in `answers`, then 200, and keeps the bodies."""

    answers: list[int] = []
    bodies: list[dict] = []

    def do_POST(self) -> None:
        Receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(Receiver.answers.pop(0) if Receiver.answers else 200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def callback_receiver() -> Iterator[str]:
    """A local HTTP server taking callbacks (see `Receiver`); yields its URL."""
    Receiver.answers, Receiver.bodies = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        server.server_close()


def gather_model(root: Path) -> Path:
    """Write a model into the repository at `root` whose graph looks up one of 10 rows by index: an index past
    them fails at run time, which no input check can see. Answers `root`."""
    import onnx
    from onnx import TensorProto, helper

    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 1], [float(i) for i in range(10)])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["gathered"], axis=0),
         helper.make_node("Reshape", ["gathered", "shape"], ["value"])],
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["n", 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["n", 1])],
        [table, helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (root / "gather" / "1").mkdir(parents=True)
    onnx.save(model, root / "gather" / "1" / "model.onnx")
    (root / "gather" / "model.toml").write_text(
        '[[inputs]]\nname = "index"\ndtype = "int64"\nshape = [-1, 1]\n\n'
        '[[outputs]]\nname = "value"\ndtype = "float32"\nshape = [-1, 1]\n'
    )
    return root
