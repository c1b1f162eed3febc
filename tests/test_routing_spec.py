"""The `[routing]` table of a spec, the plans made from it, and how a shadow's answer is compared."""

from __future__ import annotations

import collections
import tomllib
from pathlib import Path

import numpy as np
import pytest

from models import SpecError, agreement, routing
from models.fields import Fields
from models.routing import Rule, Target
from webapp.traffic import Plan, Queued, bucket

PATH = Path("iris/model.toml")


def parsed(text: str) -> routing.Routing | None:
    """The `[routing]` table of a spec of model `iris` holding `text`."""
    return routing.parse("iris", Fields(tomllib.loads(text), PATH).sub("routing"))


def test_a_routing_table_is_read_with_its_split_made_shares():
    found = parsed("""
        [routing]
        split = { "2" = 1, "10" = 3 }
        sticky_header = "X-User-ID"
        shadow = [{ version = 3 }, { model = "iris-setosa" }, { model = "other", version = 2 }]
        queue_batch = true
        [[routing.rules]]
        header = "X-Region"
        equals = "EU"
        model = "iris-eu"
    """)
    assert found.split == ((2, 0.25), (10, 0.75)) and found.sticky_header == "x-user-id"
    assert found.rules == (Rule("x-region", "EU", Target("iris-eu")),)
    assert found.shadow == (Target("iris", 3), Target("iris-setosa"), Target("other", 2))
    assert found.queue_batch and [str(t) for t in found.shadow] == ["iris:3", "iris-setosa", "other:2"]
    assert parsed("description = 'no routing'") is None


@pytest.mark.parametrize(("text", "field", "message"), [
    ('split = { "v1" = 1 }', "routing.split.v1", "version numbers"),
    ('split = { "01" = 1 }', "routing.split.01", "version numbers"),
    ('split = { "1" = -1 }', "routing.split.1", "at least 0"),
    ('split = { "1" = 0, "2" = 0 }', "routing.split", "must not all be 0"),
    ('sticky_header = "X-User-ID"', "routing.sticky_header", "needs a split"),
    ('split = { "1" = 1 }\nsticky_header = "X User"', "routing.sticky_header", "not a header name"),
    ('shadow = [{ model = "iris" }]', "routing.shadow", "another version or model"),
    ("shadow = [{}]", "routing.shadow[0]", "name a version, a model, or both"),
    ("shadow = [{ version = 0 }]", "routing.shadow[0].version", "at least 1"),
    ('rules = [{ header = "X-A", equals = "b" }]', "routing.rules[0]", "name a version"),
    ('rules = [{ header = "X-A", version = 2 }]', "routing.rules[0].equals", "is required"),
    ('rules = [{ header = "X-A", equals = "b", version = 2, weight = 1 }]', "routing.rules[0].weight",
     "unknown field"),
    ("queue_batch = 1", "routing.queue_batch", "expected bool"),
    ("splitt = {}", "routing.splitt", "unknown field"),
])
def test_a_broken_routing_table_names_its_field(text: str, field: str, message: str):
    with pytest.raises(SpecError) as caught:
        parsed(f"[routing]\n{text}\n")
    assert caught.value.field == field and message in str(caught.value)


def plan(shares: tuple[tuple[int, float], ...] = ((1, 0.8), (2, 0.2)), **fields: object) -> Plan:
    """A plan of model `iris` splitting by `shares`."""
    bounds = tuple(np.cumsum([share for _, share in shares]))[:-1]
    return Plan("iris", tuple(v for v, _ in shares), bounds, **fields)


def test_a_random_split_follows_its_shares_and_a_named_version_or_a_rule_comes_first():
    chosen = collections.Counter(plan().choose(None, {})[1] for _ in range(20_000))
    assert abs(chosen[2] / 20_000 - 0.2) < 0.015 and set(chosen) == {1, 2}
    ruled = plan(rules=(Rule("x-region", "eu", Target("iris-eu", 3)),))
    assert ruled.choose(None, {"x-region": "eu"}) == ("iris-eu", 3)
    assert ruled.choose(None, {"x-region": "EU"})[0] == "iris"  # values match exactly
    assert ruled.choose(2, {"x-region": "eu"}) == ("iris", 2)  # a named version bypasses rules and split
    assert plan(((1, 0.0), (2, 1.0))).choose(None, {}) == ("iris", 2)


def test_a_sticky_split_gives_one_client_one_version_and_ties_no_two_models():
    sticky = plan(sticky="x-user-id")
    users = [f"user-{n}" for n in range(2000)]
    first = {user: sticky.choose(None, {"x-user-id": user}) for user in users}
    assert all(sticky.choose(None, {"x-user-id": user}) == first[user] for user in users[:200])
    share = sum(version == 2 for _, version in first.values()) / len(users)
    assert abs(share - 0.2) < 0.03
    points = [(bucket("iris", user), bucket("digits", user)) for user in users]
    assert all(0 <= a < 1 and 0 <= b < 1 for a, b in points)
    assert abs(np.corrcoef(np.array(points).T)[0, 1]) < 0.1  # one user's arms in two experiments are not tied


def test_the_batch_latency_class_is_queued_for_the_version_chosen():
    queued = plan(sticky="x-user-id", queue_batch=True)
    with pytest.raises(Queued) as caught:
        queued.choose(None, {"x-latency-class": " Batch ", "x-user-id": "u"})
    version = queued.choose(None, {"x-user-id": "u"})[1]
    assert (caught.value.model, caught.value.version) == ("iris", version)
    assert queued.choose(None, {"x-latency-class": "inline", "x-user-id": "u"}) == ("iris", version)
    assert plan().choose(None, {"x-latency-class": "batch"})[0] == "iris"  # a model that does not queue


def test_a_request_is_mirrored_to_every_shadow_but_the_version_that_answered_it():
    shadowed = plan(shadows=(Target("iris", 2), Target("iris-setosa")))
    assert shadowed.shadows_of(1) == (("iris", 2), ("iris-setosa", None))
    assert shadowed.shadows_of(2) == (("iris-setosa", None),)


def labels(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_agreement_counts_rows_with_the_same_labels_and_ignores_scores_when_labels_exist():
    live = {"label": labels(0, 1, 2, 1), "probabilities": np.eye(4, 3, dtype=np.float32),
            "label_name": np.array([b"a", b"b", b"c", b"b"], dtype=object)}
    same_labels = {**live, "probabilities": live["probabilities"] + 0.3}
    assert agreement.compare(live, same_labels) == (4, 4)
    other = {**live, "label": labels(0, 2, 2, 0), "label_name": np.array([b"a", b"c", b"c", b"a"], dtype=object)}
    assert agreement.compare(live, other) == (4, 2)
    mixed = {**live, "label_name": np.array([b"a", b"b", b"x", b"b"], dtype=object)}
    assert agreement.compare(live, mixed) == (4, 3)  # a row agrees only when every label does


def test_agreement_of_float_tensors_is_closeness_and_unlike_answers_are_refused():
    live = {"scores": np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)}
    assert agreement.compare(live, {"scores": live["scores"] * (1 + 1e-6)}) == (2, 2)
    assert agreement.compare(live, {"scores": live["scores"] + [[0, 0], [0, 0.1]]}) == (2, 1)
    with pytest.raises(agreement.Incomparable, match="no output of the same name and shape"):
        agreement.compare(live, {"scores": np.zeros((2, 3), dtype=np.float32)})
    with pytest.raises(agreement.Incomparable):
        agreement.compare({"label": labels(1)}, {"label": np.array([b"1"], dtype=object)})
