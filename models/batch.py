"""Many independent instances predicted together, each with its own answer or its own failure.

Batch runs store each item as the JSON of one row-format instance (what a client puts in `instances`)
and keep each prediction as the JSON of what `:predict` answers for it. One runtime call serves them all;
if the call refuses the lot, they are run one by one, so a bad item fails alone, with its reason. The images
of a call may have at most the pixels its caller allows: over them, the lot is refused from the images'
headers, and the items run one by one take from one budget of that size; those past it fail, to be retried.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from models import answer, instances
from models.errors import ModelError
from models.image import PixelBudget
from models.inference import predict
from models.registry import ModelVersion

Outcome = tuple[bool, str]
"""(True, the prediction's JSON) or (False, the reason it failed)."""


def predict_json(version: ModelVersion, texts: Sequence[str | bytes], pixels: int) -> list[Outcome]:
    """Predict each JSON instance, decoding at most `pixels` of images at a time; answer, in order, each one's
    prediction's JSON or the reason it failed."""
    decoded: list[object] = []
    outcomes: list[Outcome | None] = []
    for text in texts:
        try:
            decoded.append(instances.decode(text))
            outcomes.append(None)
        except ValueError as exc:
            outcomes.append((False, f"the stored input is not JSON: {exc}"))
    answers = iter(_answers(version, decoded, pixels)) if decoded else iter(())
    return [outcome if outcome is not None else next(answers) for outcome in outcomes]


def _answers(version: ModelVersion, values: list[object], pixels: int) -> list[Outcome]:
    try:
        return _predict(version, values, PixelBudget(pixels, "batch chunk"))
    except (ModelError, ValueError, KeyError) as exc:
        if len(values) == 1:
            return [(False, str(exc))]
    budget = PixelBudget(pixels, "batch chunk")  # the lot's images may have been decoded once already
    return [_alone(version, value, budget) for value in values]


def _alone(version: ModelVersion, value: object, budget: PixelBudget) -> Outcome:
    try:
        return _predict(version, [value], budget)[0]
    except (ModelError, ValueError, KeyError) as exc:
        return False, str(exc)


def _predict(version: ModelVersion, values: list[object], budget: PixelBudget) -> list[Outcome]:
    arrays, _ = instances.parse({"instances": values}, version)
    outputs = predict(version, arrays, budget)
    rows = answer.rows(outputs, version.spec.output_names)["predictions"]
    return [(True, orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY).decode()) for row in rows]
