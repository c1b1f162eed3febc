"""The `[monitoring]` spec table, the reference statistics of the committed models, PSI and outlier rules."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models import Registry, Settings, reference, training
from models import spec as specs
from models.config import PACKAGE_DIR
from models.errors import SpecError
from models.monitoring import Monitoring
from models.spec import Evaluation
from tasks import drift

IRIS_SPEC = (PACKAGE_DIR / "iris" / "model.toml").read_text()


def iris_training_rows() -> np.ndarray:
    """The rows the committed iris model was trained on."""
    return training.held_out(Evaluation("iris", 0.0))[0]


def spec_with(tmp_path: Path, monitoring: str) -> specs.ModelSpec:
    folder = tmp_path / "iris"
    folder.mkdir(exist_ok=True)
    (folder / "model.toml").write_text(IRIS_SPEC + "\n[monitoring]\n" + monitoring)
    return specs.load(folder)


def test_the_monitoring_table_defaults_to_logging_nothing_and_reads_every_field(tmp_path: Path):
    assert specs.load(PACKAGE_DIR / "iris").monitoring == Monitoring(log_rate=0.0)
    found = spec_with(tmp_path, 'log_rate = 0.25\nfeatures = false\noutliers = "z_score"\nz_score = 3\n'
                                "drift_window = 500\ndrift_threshold = 0.1\n").monitoring
    assert found == Monitoring(0.25, False, "z_score", 3.0, 500, 0.1)


@pytest.mark.parametrize(("table", "field", "message"), [
    ("log_rate = 1.5", "log_rate", "at most 1"),
    ("log_rate = -0.1", "log_rate", "at least 0"),
    ("log_rate = nan", "log_rate", "finite"),
    ('log_rate = "all"', "log_rate", "expected an integer or a number"),
    ('outliers = "iqr"', "outliers", "must be one of none, range, z_score"),
    ("z_score = 3", "z_score", 'only with outliers = "z_score"'),
    ('outliers = "z_score"\nz_score = 0', "z_score", "above 0"),
    ("drift_window = 10", "drift_window", "at least 100"),
    ("drift_threshold = inf", "drift_threshold", "finite"),
    ("features = 1", "features", "expected bool"),
    ("log_rates = 0.5", "log_rates", "unknown field"),
])
def test_a_bad_monitoring_field_is_an_error_naming_it(tmp_path: Path, table: str, field: str, message: str):
    with pytest.raises(SpecError) as raised:
        spec_with(tmp_path, table + "\n")
    assert f"monitoring.{field}" in str(raised.value) and message in str(raised.value)


def test_every_committed_model_has_statistics_that_fit_its_spec_and_come_from_its_training_data(tmp_path: Path):
    registry = Registry(Settings())
    for recipe in training.RECIPES:
        version = registry.get(recipe.name)
        committed = reference.of(version)
        assert committed is not None and committed.names == reference.feature_names(version.spec)
        (tmp_path / recipe.name).mkdir()
        shutil.copy(version.spec.path, tmp_path / recipe.name / "model.toml")
        (tmp_path / recipe.name / "1").mkdir()
        written = training.write_reference(recipe, tmp_path)
        assert written.read_text() == (version.session.path.parent / reference.FILE).read_text(), recipe.name


def test_features_are_named_per_value_of_a_row_and_images_are_not_features():
    iris, digits = Registry(Settings()).get("iris"), Registry(Settings()).get("digits-light")
    assert reference.feature_names(iris.spec) == [f"features[{j}]" for j in range(4)]
    assert len(reference.feature_names(digits.spec)) == 64
    assert reference.matrix(digits.spec, {"pixels": np.array([b"\x89PNG"], dtype=object)}) is None
    assert reference.matrix(iris.spec, {}) is None
    logged = reference.matrix(iris.spec, {"features": [[5.1, 3.5, 1.4, 0.2]]})  # read back from the log's JSON
    assert logged.dtype == np.float32 and logged.shape == (1, 4)


def test_psi_is_near_zero_on_the_training_distribution_and_large_on_a_shift():
    statistics = reference.of(Registry(Settings()).get("iris"))
    x = iris_training_rows()
    assert statistics is not None
    assert all(reference.psi(f, x[:, j]) < 0.01 for j, f in enumerate(statistics.features))
    resampled = x[np.random.default_rng(1).integers(0, len(x), 500)]
    assert all(reference.psi(f, resampled[:, j]) < 0.1 for j, f in enumerate(statistics.features))
    shifted = x + 3 * x.std(axis=0)
    assert all(reference.psi(f, shifted[:, j]) > 1.0 for j, f in enumerate(statistics.features))


def test_a_drift_check_needs_a_full_window_and_alerts_on_shifted_inputs_only(tmp_path: Path):
    version = Registry(Settings()).get("iris")
    monitored = type(version)(spec_with(tmp_path, "log_rate = 1\ndrift_window = 200\n"), version.number,
                              version.session, version.stamp, version.limits)
    x = iris_training_rows()
    drawn = x[np.random.default_rng(2).integers(0, len(x), 200)]
    records = [{"features": drawn[i:i + 20].tolist()} for i in range(0, 200, 20)]
    assert drift.measure(monitored, records[:-1]) is None  # 180 rows: not checked yet
    calm = drift.measure(monitored, records)
    assert calm is not None and calm.rows == 200 and not calm.alert and calm.worst < 0.2
    shifted = [{"features": (np.asarray(r["features"]) + 3 * x.std(axis=0)).tolist()} for r in records]
    alarmed = drift.measure(monitored, shifted)
    assert alarmed is not None and alarmed.alert and min(alarmed.psi.values()) > 0.2


def test_outliers_by_range_and_by_z_score_name_the_row_and_the_feature(tmp_path: Path):
    statistics = reference.of(Registry(Settings()).get("iris"))
    x = iris_training_rows()
    wide, short = np.array([0, 0, 0, 2.6]), np.array([0.5, 0, 0, 0])
    rows = np.array([x.mean(axis=0), x.mean(axis=0) + wide, x.max(axis=0), x.min(axis=0) - short], dtype=np.float32)
    by_range = reference.outliers(statistics, Monitoring(), rows)
    assert by_range == [{"row": 1, "features": ["features[3]"]}, {"row": 3, "features": ["features[0]"]}]
    assert reference.outliers(statistics, Monitoring(), x) == []  # the training data is inside its own range
    z = reference.outliers(statistics, Monitoring(outliers="z_score", z_score=3.0), rows)
    assert z == [{"row": 1, "features": ["features[3]"]}, {"row": 2, "features": ["features[1]"]}]  # 3.4 and 3.01
    z = reference.outliers(statistics, Monitoring(outliers="z_score", z_score=3.2), rows)
    assert z == [{"row": 1, "features": ["features[3]"]}]  # 0.5 cm below the least sepal length is 2.4 std
    assert reference.outliers(statistics, Monitoring(outliers="none"), rows) == []


def test_statistics_that_do_not_fit_the_spec_are_not_used(tmp_path: Path):
    shutil.copytree(PACKAGE_DIR / "iris", tmp_path / "iris")
    path = tmp_path / "iris" / "1" / reference.FILE
    path.write_text(path.read_text().replace("features[3]", "petal_width"))
    assert reference.of(Registry(Settings(models_dir=tmp_path)).get("iris")) is None
    path.write_text("{not json")
    assert reference.of(Registry(Settings(models_dir=tmp_path)).get("iris")) is None
