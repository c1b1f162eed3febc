"""A model's `[limits]`: the spec's fields, places that never wait, fallbacks, and circuits that open and close."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

from models import Registry, Settings, SpecError
from models import spec as specs
from models.config import PACKAGE_DIR
from samples import error_of, gather_model
from tasks import resources
from tasks.circuits import Circuits
from webapp import close_app, create_app
from webapp.guard import Guard, Refused

IRIS = {"instances": [[5.1, 3.5, 1.4, 0.2]]}
MEMBERS = ("iris-setosa", "iris-versicolor", "iris-virginica")


def with_limits(folder: Path, limits: str) -> Path:
    """Give the model in `folder` a `[limits]` table; answers the repository holding it."""
    spec = folder / "model.toml"
    spec.write_text(spec.read_text() + f"\n[limits]\n{limits}\n")
    return folder.parent


def iris_repo(root: Path, limits: str, *others: str) -> Registry:
    """A repository with `iris` under `limits` and copies of the committed models `others`."""
    for name in ("iris", *others):
        shutil.copytree(PACKAGE_DIR / name, root / name)
    return Registry(Settings(models_dir=with_limits(root / "iris", limits)))


def test_the_limits_table_is_read_and_checked(tmp_path: Path):
    registry = iris_repo(tmp_path, 'max_concurrency = 2\nmax_queue_depth = 50\nfallback = "iris-setosa"\n'
                                   "retry_after_s = 3\nbreaker_failures = 4\nbreaker_reset_s = 2.5")
    limits = registry.get("iris").spec.limits
    assert (limits.max_concurrency, limits.max_queue_depth, limits.fallback) == (2, 50, "iris-setosa")
    assert (limits.retry_after_s, limits.breaker_failures, limits.breaker_reset_s) == (3, 4, 2.5)
    assert specs.load(PACKAGE_DIR / "iris").limits is None


@pytest.mark.parametrize(("limits", "field", "says"), [
    ("max_concurency = 2", "limits.max_concurency", "unknown field"),
    ("max_concurrency = 0", "limits.max_concurrency", "at least 1"),
    ('fallback = "iris"', "limits.fallback", "another model"),
    ('fallback = "../x"', "limits.fallback", "another model"),
    ("breaker_reset_s = 5", "limits.breaker_reset_s", "needs breaker_failures"),
    ('retry_after_s = "1"', "limits.retry_after_s", "an integer"),
])
def test_a_wrong_limit_names_its_field(tmp_path: Path, limits: str, field: str, says: str):
    shutil.copytree(PACKAGE_DIR / "iris", tmp_path / "iris")
    with pytest.raises(SpecError) as raised:
        specs.load(with_limits(tmp_path / "iris", limits) / "iris")
    assert raised.value.field == field and says in str(raised.value)


def test_a_model_without_limits_is_admitted_by_one_reusable_admission(tmp_path: Path):
    registry = iris_repo(tmp_path, "max_concurrency = 1", "iris-setosa")
    guard, plain = Guard(registry, Circuits()), registry.get("iris-setosa")
    with guard.admit(plain) as running:
        assert running is plain
    assert guard.admit(plain) is guard.admit(plain)  # remembered: no gate, no lock, no allocation
    reloaded = dataclasses.replace(plain)  # the registry reloaded it unchanged: the same key, another object
    with guard.admit(reloaded) as running:
        assert running is reloaded and reloaded.key == plain.key
    assert guard.admit(registry.get("iris")) is not guard.admit(registry.get("iris"))


def test_past_its_concurrency_a_request_is_refused_at_once_with_retry_after(tmp_path: Path):
    registry = iris_repo(tmp_path, "max_concurrency = 2\nretry_after_s = 7")
    guard, iris = Guard(registry, Circuits()), registry.get("iris")
    with guard.admit(iris), guard.admit(iris):
        started = time.perf_counter()
        with pytest.raises(Refused) as refused, guard.admit(iris):
            pass
        assert time.perf_counter() - started < 0.05  # never waits for a place
        assert (refused.value.status, refused.value.headers) == (429, {"Retry-After": "7"})
        assert "limit of 2" in str(refused.value)
    with guard.admit(iris) as running:  # the places are given back, also by a block that raised
        assert running is iris
    with pytest.raises(ValueError), guard.admit(iris), guard.admit(iris):
        raise ValueError("the handler failed")
    with guard.admit(iris), guard.admit(iris):
        pass


def test_places_are_counted_across_threads(tmp_path: Path):
    registry = iris_repo(tmp_path, "max_concurrency = 3")
    guard, iris = Guard(registry, Circuits()), registry.get("iris")
    inside, release, outcomes = threading.Barrier(4), threading.Event(), []

    def request() -> None:
        try:
            with guard.admit(iris):
                outcomes.append(200)
                inside.wait(timeout=5)
                release.wait(timeout=5)
        except Refused as exc:
            outcomes.append(exc.status)

    threads = [threading.Thread(target=request) for _ in range(3)]
    for thread in threads:
        thread.start()
    inside.wait(timeout=5)  # three hold a place
    request()
    release.set()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [200, 200, 200, 429]


def test_past_its_concurrency_the_fallback_answers_under_its_own_limits(tmp_path: Path):
    registry = iris_repo(tmp_path, 'max_concurrency = 1\nfallback = "iris-copy"')
    shutil.copytree(PACKAGE_DIR / "iris", tmp_path / "iris-copy")
    with_limits(tmp_path / "iris-copy", 'max_concurrency = 1\nfallback = "iris-setosa"')
    shutil.copytree(PACKAGE_DIR / "iris-setosa", tmp_path / "iris-setosa")
    guard, iris = Guard(registry, Circuits()), registry.get("iris")
    with guard.admit(iris) as first, guard.admit(iris) as second:
        assert (first.name, second.name) == ("iris", "iris-copy")
        with pytest.raises(Refused) as refused, guard.admit(iris):  # the fallback is full too: no fallback's fallback
            pass
        assert refused.value.status == 429 and "'iris'" in str(refused.value)


def test_a_fallback_taking_other_inputs_is_not_used(tmp_path: Path):
    registry = iris_repo(tmp_path, 'max_concurrency = 1\nfallback = "digits-light"', "digits-light")
    guard, iris = Guard(registry, Circuits()), registry.get("iris")
    with guard.admit(iris), pytest.raises(Refused), guard.admit(iris):
        pass


@pytest.fixture
def failing_app(tmp_path: Path) -> Iterator[Flask]:
    """An app over `gather` (an index past 9 fails in the runtime) whose circuit opens after 3 failures for
    0.5 s, and a copy of it, `gather-copy`, with no limits."""
    gather_model(tmp_path)
    shutil.copytree(tmp_path / "gather", tmp_path / "gather-copy")
    with_limits(tmp_path / "gather", "breaker_failures = 3\nbreaker_reset_s = 0.5")
    app = create_app({"TESTING": True, "models_dir": tmp_path, "reload_interval_s": 0.0})
    yield app
    close_app(app)


def test_a_circuit_opens_after_failures_in_a_row_and_closes_after_its_reset(failing_app: Flask):
    client, good, bad = failing_app.test_client(), {"instances": [[3]]}, {"instances": [[10]]}
    for _ in range(2):
        error_of(client.post("/v1/models/gather:predict", json=bad), 500)
    assert client.post("/v1/models/gather:predict", json=good).get_json() == {"predictions": [[3.0]]}
    error_of(client.post("/v1/models/gather:predict", json={"instances": [[1, 2]]}), 400)  # the client's fault
    for _ in range(3):  # a success reset the count, a client's error left it: three more in a row are needed
        error_of(client.post("/v1/models/gather:predict", json=bad), 500)
    refused = client.post("/v1/models/gather:predict", json=good)
    assert "circuit is open" in error_of(refused, 503)
    assert refused.headers["Retry-After"] == "1"  # 0.5 s, rounded up
    assert "circuit is open" in error_of(client.post("/v2/models/gather/infer", json={"inputs": [
        {"name": "index", "shape": [1, 1], "datatype": "INT64", "data": [3]}]}), 503)
    time.sleep(0.6)
    error_of(client.post("/v1/models/gather:predict", json=bad), 500)  # the trial failed: open again
    error_of(client.post("/v1/models/gather:predict", json=good), 503)
    time.sleep(0.6)
    assert client.post("/v1/models/gather:predict", json=good).status_code == 200  # the trial closed it
    assert client.post("/v1/models/gather:predict", json=good).status_code == 200


def test_an_open_circuit_answers_with_the_fallback_and_says_so(failing_app: Flask, tmp_path: Path):
    spec = tmp_path / "gather" / "model.toml"
    spec.write_text(spec.read_text() + 'fallback = "gather-copy"\n')
    client = failing_app.test_client()
    for _ in range(3):
        error_of(client.post("/v1/models/gather:predict", json={"instances": [[10]]}), 500)
    answered = client.post("/v1/models/gather:predict", json={"instances": [[4]]})
    assert answered.status_code == 200 and answered.headers["X-Fallback"] == "gather-copy"
    assert answered.get_json() == {"predictions": [[4.0]]}
    assert "X-Fallback" not in client.post("/v1/models/gather-copy:predict", json={"instances": [[4]]}).headers


@pytest.fixture
def broken_members(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """A repository with the iris one-vs-rest ensemble whose named members have a broken artefact and a circuit
    opening after 2 failures for 0.5 s; the eager worker reads it too."""
    def make(*broken: str) -> Path:
        for name in (*MEMBERS, "iris-ovr"):
            shutil.copytree(PACKAGE_DIR / name, tmp_path / name)
        for name in broken:
            (tmp_path / name / "1" / "model.onnx").write_bytes(b"broken")
            with_limits(tmp_path / name, "breaker_failures = 2\nbreaker_reset_s = 0.5")
        monkeypatch.setattr(resources, "_registry", Registry(Settings(models_dir=tmp_path)))
        return tmp_path

    return make


def test_a_member_whose_circuit_is_open_is_not_sent_and_the_others_answer(
        broken_members: Callable[..., Path], make_eager_app: Callable[..., Flask]):
    client = make_eager_app(models_dir=broken_members("iris-virginica")).test_client()

    def virginica() -> str:
        body = client.post("/v1/ensembles/iris-ovr:predict", json=IRIS).get_json()
        assert body["failed"] == ["iris-virginica"] and body["predictions"][0]["member"] == "iris-setosa"
        return body["members"]["iris-virginica"]["error"]

    assert ["cannot serve" in virginica() for _ in range(2)] == [True, True]
    assert "circuit is open" in virginica()
    time.sleep(0.6)
    assert "cannot serve" in virginica()  # sent again once the reset passed; it failed, so the circuit opened again
    assert "circuit is open" in virginica()


def test_when_every_member_circuit_is_open_the_ensemble_answers_503(
        broken_members: Callable[..., Path], make_eager_app: Callable[..., Flask]):
    client = make_eager_app(models_dir=broken_members(*MEMBERS)).test_client()
    for _ in range(2):
        assert client.post("/v1/ensembles/iris-ovr:predict", json=IRIS).get_json()["failed"] == list(MEMBERS)
    refused = client.post("/v1/ensembles/iris-ovr:predict", json=IRIS)
    assert "circuits are open" in error_of(refused, 503) and refused.headers["Retry-After"] == "1"
