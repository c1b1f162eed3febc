"""Many independent instances predicted together, each with its own answer or its own failure.

Batch runs store each item as the JSON of one row-format instance (what a client puts in `instances`)
and keep each prediction as the JSON of what `:predict` answers for it. One runtime call serves them all;
if the call refuses the lot, they are run one by one, so a bad item fails alone, with its reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from models import answer, instances
from models.errors import ModelError
from models.inference import predict
from models.registry import ModelVersion

Outcome = tuple[bool, str]
"""(True, the prediction's JSON) or (False, the reason it failed)."""


def predict_json(version: ModelVersion, texts: Sequence[str | bytes]) -> list[Outcome]:
    """Predict each JSON instance; answer, in order, its prediction's JSON or the reason it failed."""
    decoded: list[object] = []
    outcomes: list[Outcome | None] = []
    for text in texts:
        try:
            decoded.append(instances.decode(text))
            outcomes.append(None)
        except ValueError as exc:
            outcomes.append((False, f"the stored input is not JSON: {exc}"))
    answers = iter(_answers(version, decoded)) if decoded else iter(())
    return [outcome if outcome is not None else next(answers) for outcome in outcomes]


def _answers(version: ModelVersion, values: list[object]) -> list[Outcome]:
    try:
        arrays, _ = instances.parse({"instances": values}, version)
        outputs = predict(version, arrays)
        rows = answer.rows(outputs, version.spec.output_names)["predictions"]
        return [(True, orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY).decode()) for row in rows]
    except (ModelError, ValueError, KeyError) as exc:
        if len(values) == 1:
            return [(False, str(exc))]
    return [outcome for value in values for outcome in _answers(version, [value])]
