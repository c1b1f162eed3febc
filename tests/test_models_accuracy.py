"""Every committed model holds the held-out accuracy its spec records, through the serving path."""

from __future__ import annotations

import numpy as np
import pytest

import models
from models import Registry, Settings
from models.config import PACKAGE_DIR
from models.spec import SPEC_FILE
from models.training import held_out

EVALUATED = sorted(
    p.parent.name for p in PACKAGE_DIR.glob(f"*/{SPEC_FILE}") if "[evaluation]" in p.read_text()
)


@pytest.fixture(scope="module")
def registry() -> Registry:
    """The committed repository, as the app serves it."""
    return Registry(Settings())


def test_every_reference_model_is_evaluated(registry: Registry) -> None:
    assert not registry.problems
    served = {m.spec.name for m in registry.models()}
    assert set(EVALUATED) == served
    assert {"iris", "digits-light", "digits-heavy"} <= served


@pytest.mark.parametrize("name", EVALUATED)
def test_held_out_accuracy_is_at_least_the_recorded_figure(name: str, registry: Registry) -> None:
    version = registry.get(name)
    evaluation = version.spec.evaluation
    assert evaluation is not None
    _, x_test, _, y_test = held_out(evaluation)
    (declared,) = version.spec.inputs
    outputs = models.predict(version, {declared.name: x_test})
    labels = np.asarray(version.spec.labels, dtype=object)
    assert list(outputs["label_name"]) == list(labels[outputs["label"]])
    np.testing.assert_allclose(outputs["probabilities"].sum(axis=1), 1.0, atol=1e-4)
    accuracy = float(np.mean(outputs["label"] == y_test))
    assert accuracy >= evaluation.accuracy, f"{name}: {accuracy:.4f} < recorded {evaluation.accuracy:.4f}"


@pytest.mark.parametrize(("features", "species"), [
    ([5.1, 3.5, 1.4, 0.2], "setosa"),
    ([6.3, 3.3, 6.0, 2.5], "virginica"),
])
def test_iris_reference_points(features: list[float], species: str, registry: Registry) -> None:
    version = registry.get("iris")
    outputs = models.predict(version, {"features": np.array([features], np.float32)})
    assert outputs["label_name"][0] == species
    k = version.spec.labels.index(species)
    assert outputs["label"][0] == k
    assert outputs["probabilities"][0, k] > 0.9
