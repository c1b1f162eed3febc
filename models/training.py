"""Train the reference models from data sets that ship inside scikit-learn and export them to ONNX.

Run `make models` (or `python -m models.training`). Needs the `train` extra; nothing is downloaded.
Each model's held-out accuracy is measured on the exported ONNX artefact and written into its spec, and the
statistics of its training inputs beside the artefact (`reference.json`: drift and outliers are judged by them).
`--reference-only` writes those statistics alone, leaving the models and their specs as they are.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import reference
from models import spec as specs
from models.config import PACKAGE_DIR
from models.spec import Evaluation

IRIS_LABELS = ["setosa", "versicolor", "virginica"]
IRIS_FEATURES = "sepal length, sepal width, petal length, petal width (cm)"
DIGITS_PREPROCESS = """
[[inputs.preprocess]]
step = "convert"
mode = "L"

[[inputs.preprocess]]
step = "autocontrast"

[[inputs.preprocess]]
step = "invert"
when = "light_background"

[[inputs.preprocess]]
step = "crop_to_content"
threshold = 64
margin = 0.0  # scikit-learn's digits fill the 8x8 box top to bottom

[[inputs.preprocess]]
step = "resize"
size = 8
resample = "box"

[[inputs.preprocess]]
step = "normalize"
scale = 0.0627450980392157  # 16 / 255: the 0-16 scale of scikit-learn's digits
"""


@dataclass(frozen=True)
class Recipe:
    """How one reference model is made and declared."""

    name: str
    description: str
    dataset: str
    estimator: str
    labels: list[str]
    positive_class: int | None = None
    options: str = ""
    shift_augment: bool = False
    """Also train on copies shifted one pixel left and right: served images are centred on their ink,
    which moves many of scikit-learn's 8x8 digits by a column."""


RECIPES = [
    Recipe("iris", "Iris species from four flower measurements (random forest, 100 trees).",
           "iris", "forest", IRIS_LABELS),  # no prediction cache: a Redis round trip costs more than the model
    *[
        Recipe(f"iris-{label}", f"Is the iris a {label}? One-vs-rest classifier (calibrated RBF SVC).",
               "iris", "scaled-svc", ["other", label], positive_class=k)
        for k, label in enumerate(IRIS_LABELS)
    ],
    Recipe("digits-light", "Handwritten digit from an 8x8 image, fast (one-hidden-layer perceptron).",
           "digits", "mlp", [str(d) for d in range(10)], options="max_batch_size = 64\n", shift_augment=True),
    Recipe("digits-heavy", "Handwritten digit from an 8x8 image, slower and more accurate (calibrated RBF SVC).",
           "digits", "svc", [str(d) for d in range(10)], options="max_batch_size = 64\ncache_ttl_s = 300\n",
           shift_augment=True),
]


def held_out(evaluation: Evaluation) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The train and held-out split a spec's evaluation describes: (x_train, x_test, y_train, y_test)."""
    from sklearn.datasets import load_digits, load_iris
    from sklearn.model_selection import train_test_split

    data = (load_iris if evaluation.dataset == "iris" else load_digits)()
    x, y = data.data.astype(np.float32), data.target
    if evaluation.positive_class is not None:
        y = (y == evaluation.positive_class).astype(np.int64)
    return train_test_split(x, y, test_size=evaluation.test_size, random_state=evaluation.seed, stratify=y)


def shifted(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8x8 images plus copies moved one column left and right (the empty column filled with 0)."""
    images = x.reshape(-1, 8, 8)
    left, right = np.zeros_like(images), np.zeros_like(images)
    left[:, :, :-1], right[:, :, 1:] = images[:, :, 1:], images[:, :, :-1]
    both = np.concatenate([images, left, right]).reshape(-1, 64)
    return both, np.concatenate([y, y, y])


def accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of an exported model, measured with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    labels = session.run(["label"], {session.get_inputs()[0].name: x})[0]
    return float(np.mean(labels == y))


def estimator(kind: str) -> object:
    """A fresh, seeded scikit-learn estimator of the given kind."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return {
        "forest": lambda: RandomForestClassifier(n_estimators=100, random_state=0),
        "scaled-svc": lambda: make_pipeline(StandardScaler(), CalibratedClassifierCV(SVC(C=1), ensemble=False)),
        "svc": lambda: CalibratedClassifierCV(SVC(C=10, gamma=0.001), ensemble=False),
        "logistic": lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)),
        "mlp": lambda: make_pipeline(StandardScaler(), MLPClassifier((128,), max_iter=1000, random_state=0)),
    }[kind]()


def export(model: object, features: int, input_name: str) -> bytes:
    """Export a fitted estimator with a float input and plain tensor outputs (no ZipMap)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType

    onx = to_onnx(model, initial_types=[(input_name, FloatTensorType([None, features]))],
                  options={"zipmap": False}, target_opset={"": 17, "ai.onnx.ml": 3})
    return onx.SerializeToString()


def build(recipe: Recipe, root: Path) -> float:
    """Train, export and declare one model under `root`; answer its held-out accuracy."""
    evaluation = Evaluation(recipe.dataset, 0.0, positive_class=recipe.positive_class)
    x_train, x_test, y_train, y_test = held_out(evaluation)
    model = estimator(recipe.estimator)
    if recipe.shift_augment:
        x_train, y_train = shifted(x_train, y_train)
    model.fit(x_train, y_train)
    input_name = "features" if recipe.dataset == "iris" else "pixels"
    onnx_bytes = export(model, x_train.shape[1], input_name)
    score = accuracy(onnx_bytes, x_test, y_test)
    folder = root / recipe.name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "1" / "model.onnx").write_bytes(onnx_bytes)
    (folder / "model.toml").write_text(spec_text(recipe, input_name, x_train.shape[1], score))
    write_reference(recipe, root)
    return score


def write_reference(recipe: Recipe, root: Path) -> Path:
    """Write the statistics of a model's training inputs (the split it was trained on, before any augmenting)
    beside its artefact; answer the file's path."""
    x_train, _, _, _ = held_out(Evaluation(recipe.dataset, 0.0, positive_class=recipe.positive_class))
    folder = root / recipe.name
    path = folder / "1" / reference.FILE
    path.write_text(reference.to_json(reference.compute(x_train, reference.feature_names(specs.load(folder)))))
    return path


def spec_text(recipe: Recipe, input_name: str, features: int, score: float) -> str:
    """The model.toml of a reference model."""
    labels = ", ".join(f'"{label}"' for label in recipe.labels)
    described = IRIS_FEATURES if recipe.dataset == "iris" else "8x8 grayscale image, 0 (paper) to 16 (ink)"
    positive = "" if recipe.positive_class is None else f"positive_class = {recipe.positive_class}\n"
    preprocess = DIGITS_PREPROCESS if recipe.dataset == "digits" else ""
    return f"""# Written by `make models` (models/training.py); edit the recipe there, not this file.
description = "{recipe.description}"
labels = [{labels}]

[[inputs]]
name = "{input_name}"
dtype = "float32"
shape = [-1, {features}]
description = "{described}"
{preprocess}
[[outputs]]
name = "label"
dtype = "int64"
shape = [-1]
description = "index of the predicted class"

[[outputs]]
name = "probabilities"
dtype = "float32"
shape = [-1, {len(recipe.labels)}]
description = "probability of each class, in the order of `labels`"

[[outputs]]
name = "label_name"
dtype = "bytes"
shape = [-1]
derive = "argmax_label"
source = "probabilities"
description = "name of the most probable class"

[options]
{recipe.options}
[evaluation]
dataset = "{recipe.dataset}"
{positive}accuracy = {math.floor(score * 10_000) / 10_000:.4f}  # floored: the test holds the artefact to it
"""


def main() -> None:
    """Build every reference model (or the named ones) into the repository."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", help="models to build (default: all)")
    parser.add_argument("--root", type=Path, default=PACKAGE_DIR, help="repository root")
    parser.add_argument("--reference-only", action="store_true",
                        help="write only the reference statistics, from the training data; retrain nothing")
    args = parser.parse_args()
    for recipe in RECIPES:
        if args.names and recipe.name not in args.names:
            continue
        if args.reference_only:
            print(f"{recipe.name}: wrote {write_reference(recipe, args.root)}")
        else:
            print(f"{recipe.name}: held-out accuracy {build(recipe, args.root):.4f}")


if __name__ == "__main__":
    main()
