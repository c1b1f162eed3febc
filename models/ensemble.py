"""The horizontal-microservice pattern's spec: member models run side by side, their answers combined.

An ensemble is a folder holding `ensemble.toml` (no artefacts of its own):

    description = "Iris species from three one-vs-rest classifiers."
    members = ["iris-setosa", "iris-versicolor", "iris-virginica"]
    aggregate = "best"        # best | mean | vote
    member_timeout_ms = 1000  # a member slower than this is reported timed out
    timeout_ms = 3000         # past this the request answers 202 with a job to poll

`best`: per row, the positive label of the member with the highest positive-class probability (members
are binary, labels [other, positive]). `mean`: the label of the highest mean probability (members share
their labels). `vote`: the label most members name (ties go to the first member's).
"""

from __future__ import annotations

import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import SpecError
from models.fields import Fields
from models.spec import NAME, ModelSpec

ENSEMBLE_FILE = "ensemble.toml"
AGGREGATES = ("best", "mean", "vote")
SCORES = "probabilities"


@dataclass(frozen=True)
class EnsembleSpec:
    """Declared members, how their answers combine, and the time each may take."""

    name: str
    path: Path
    description: str
    members: tuple[str, ...]
    aggregate: str
    member_timeout_s: float
    timeout_s: float


def load(folder: Path) -> EnsembleSpec:
    """Read and check `folder/ensemble.toml`; raise SpecError naming the file and field."""
    path = folder / ENSEMBLE_FILE
    if not NAME.match(folder.name):
        raise SpecError(folder, "", "an ensemble folder's name must be letters, digits, '_', '.' or '-'")
    try:
        top = Fields(tomllib.loads(path.read_text(encoding="utf-8")), path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(path, "", f"cannot be read as TOML ({exc})") from None
    members = tuple(top.each("members", _name, required=True))
    if len(members) < 2 or len(set(members)) != len(members):
        raise top.fail("members", "name two or more different models")
    spec = EnsembleSpec(
        folder.name, path, top.str("description", ""), members, top.choice("aggregate", list(AGGREGATES)),
        top.number("member_timeout_ms", 1000.0, minimum=1.0) / 1000,
        top.number("timeout_ms", 3000.0, minimum=1.0) / 1000,
    )
    top.done()
    return spec


def _name(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("a member is a model's name")
    return value


def check(spec: EnsembleSpec, members: dict[str, ModelSpec]) -> None:
    """Check that every member exists, takes the same inputs, and has what the aggregate needs."""
    missing = [m for m in spec.members if m not in members]
    if missing:
        raise SpecError(spec.path, "members", f"no servable model named {missing[0]!r}")
    first = members[spec.members[0]]
    for name in spec.members[1:]:
        if [(t.name, t.dtype, t.shape[1:]) for t in members[name].inputs] != \
                [(t.name, t.dtype, t.shape[1:]) for t in first.inputs]:
            raise SpecError(spec.path, "members", f"{name!r} takes other inputs than {first.name!r}")
    for name in spec.members:
        member = members[name]
        if SCORES not in member.output_names or not member.labels:
            raise SpecError(spec.path, "aggregate", f"{name!r} has no {SCORES!r} output with labels")
        if spec.aggregate == "best" and len(member.labels) != 2:
            raise SpecError(spec.path, "aggregate", f"'best' takes binary members; {name!r} has "
                                                    f"{len(member.labels)} labels")
        if spec.aggregate != "best" and member.labels != first.labels:
            raise SpecError(spec.path, "aggregate", f"{spec.aggregate!r} needs members with the same labels")


def combine(spec: EnsembleSpec, labels: dict[str, tuple[str, ...]],
            scores: dict[str, np.ndarray]) -> list[dict[str, object]]:
    """Per row, the ensemble's label and score from the members that answered (name -> [rows, classes])."""
    names = [m for m in spec.members if m in scores]
    if not names:
        return []
    if spec.aggregate == "best":
        positive = np.stack([scores[m][:, 1] for m in names], axis=1)
        winner = positive.argmax(axis=1)
        return [{"label": labels[names[w]][1], "score": float(positive[r, w]), "member": names[w]}
                for r, w in enumerate(winner)]
    if spec.aggregate == "mean":
        mean = np.mean([scores[m] for m in names], axis=0)
        classes = labels[names[0]]
        return [{"label": classes[int(i)], "score": float(row[i])} for row, i in zip(mean, mean.argmax(axis=1),
                                                                                    strict=True)]
    picks = np.stack([scores[m].argmax(axis=1) for m in names], axis=1)
    classes = labels[names[0]]
    rows = []
    for row in picks:
        label, count = Counter(row.tolist()).most_common(1)[0]
        rows.append({"label": classes[label], "score": count / len(names)})
    return rows
