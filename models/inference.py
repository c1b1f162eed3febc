"""The one prediction entry point that the web process and every worker call."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
from PIL import Image

from models import postprocess, tensor
from models.errors import InputTooLarge, InvalidInput, ModelError, ModelFailed
from models.image import PixelBudget
from models.registry import ModelVersion
from models.spec import ModelSpec
from models.tensor import TensorSpec

log = logging.getLogger(__name__)
T = TypeVar("T")


def predict(version: ModelVersion, inputs: Mapping[str, np.ndarray],
            pixels: PixelBudget | None = None, timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Check inputs against the spec, preprocess images, run the graph and derive outputs.

    `pixels` bounds the images decoded for this call; by default, the request budget of the version's limits.
    `timings`, if given, gets the seconds spent checking and preprocessing the inputs (`preprocess`) and
    running the graph and deriving the outputs (`model`), once both succeeded.
    """
    started = time.perf_counter()
    feeds = prepare(version, inputs, pixels=pixels)
    prepared = time.perf_counter()
    outputs = postprocess.derive(version.spec, version.session.run(feeds))
    if timings is not None:
        timings["preprocess"], timings["model"] = prepared - started, time.perf_counter() - prepared
    return outputs


def arrays(version: ModelVersion, values: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Convert JSON values, one per input name, to arrays of the declared dtypes."""
    _check_names(version, values)
    return {t.name: tensor.from_values(values[t.name], t.dtype, t.where)
            for t in version.spec.inputs if t.name in values}


def prepare(version: ModelVersion, inputs: Mapping[str, np.ndarray], images: bool = True,
            pixels: PixelBudget | None = None) -> dict[str, np.ndarray]:
    """Turn client arrays into the exact feeds the graph takes, or raise InvalidInput saying why.

    The batch size is checked before anything is converted, and every image's header before any is decoded:
    one over MAX_IMAGE_PIXELS, or all of them over `pixels` (by default a fresh request budget), refuse the
    lot. With `images=False`, encoded images are only checked to be a list, not opened: the check a web
    process makes before it queues a job whose images a worker will preprocess.
    """
    _check_names(version, inputs)
    _check_rows(version.spec, inputs)
    opened = _open_images(version, inputs, pixels) if images else {}
    return {t.name: _feed(version, t, inputs[t.name], opened.get(t.name)) for t in version.spec.inputs}


def has_encoded_images(version: ModelVersion, inputs: Mapping[str, np.ndarray]) -> bool:
    """Whether some input carries encoded images, which preprocessing must decode before the model runs."""
    return any(t.name in inputs and _encoded(t, inputs[t.name]) for t in version.spec.inputs)


def _check_names(version: ModelVersion, inputs: Mapping[str, object]) -> None:
    spec = version.spec
    if inputs.keys() <= spec.input_names:
        return
    unknown = set(inputs) - spec.input_names
    if unknown:
        raise InvalidInput(f"unknown input {sorted(unknown)[0]!r}; model {spec.name!r} takes "
                           f"{', '.join(repr(t.name) for t in spec.inputs)}")


def _check_rows(spec: ModelSpec, inputs: Mapping[str, np.ndarray]) -> None:
    """Refuse a missing input, and a batch that is uneven, empty or over the model's limit, before any work."""
    rows = set()
    for t in spec.inputs:
        value = inputs.get(t.name)
        if value is None:
            raise InvalidInput(f"missing input {t.name!r} {t.dtype.name} {t.shape_text()}")
        if value.ndim:  # a scalar has no rows; its shape is refused with the declared one
            rows.add(value.shape[0])
    if len(rows) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {sorted(rows)}")
    count = max(rows, default=1)
    if count > spec.options.max_instances:
        raise InvalidInput(f"{count} rows in one request; model {spec.name!r} takes at most "
                           f"{spec.options.max_instances}")
    if count == 0:
        raise InvalidInput("no rows: a request carries at least one")


def _encoded(t: TensorSpec, value: np.ndarray) -> bool:
    """Whether `value` holds encoded images for an input that preprocesses them."""
    return t.image is not None and value.dtype.kind == "O" and not t.dtype.is_bytes


def _open_images(version: ModelVersion, inputs: Mapping[str, np.ndarray],
                 pixels: PixelBudget | None) -> dict[str, list[Image.Image]]:
    """Every encoded image's header, read and checked against the limits before any pixel is decoded."""
    encoded = [t for t in version.spec.inputs if _encoded(t, inputs[t.name])]
    if not encoded:
        return {}
    limit = version.limits.image_pixels
    opened = {t.name: [_guarded(version, f"{t.where}[{i}]", functools.partial(t.image.open, data, limit))
                       for i, data in enumerate(_image_list(inputs[t.name], t.where))]
              for t in encoded}
    budget = pixels or PixelBudget(version.limits.request_pixels, "request")
    budget.spend(sum(image.width * image.height for images in opened.values() for image in images))
    return opened


def _feed(version: ModelVersion, t: TensorSpec, value: np.ndarray, opened: list[Image.Image] | None) -> np.ndarray:
    where = t.where
    if opened is not None:
        value = _images(version, t, opened)
    elif _encoded(t, value):
        return _image_list(value, where)
    else:
        value = tensor.cast(value, t.dtype, where)
    tensor.check(value, t, where)
    return value


def _image_list(value: np.ndarray, where: str) -> np.ndarray:
    if value.ndim == 2 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim != 1:
        raise InvalidInput(f"{where}: expected a list of encoded images, got shape {list(value.shape)}")
    return value


def _images(version: ModelVersion, t: TensorSpec, opened: list[Image.Image]) -> np.ndarray:
    where = t.where
    items = [_guarded(version, f"{where}[{i}]", functools.partial(t.image.tensor, image))
             for i, image in enumerate(opened)]
    batch = np.stack(items) if items else np.empty((0, *t.image.item_shape), np.float32)
    batch = batch.reshape((len(items), *t.shape[1:]))
    target = t.dtype.numpy
    if target.kind in "iub":
        info = np.iinfo(target) if target.kind != "b" else np.iinfo(np.uint8)
        batch = np.clip(np.rint(batch), info.min, info.max)
    return batch.astype(target)


def _guarded(version: ModelVersion, where: str, work: Callable[[], T]) -> T:
    """One image's work: the client's faults name the image; any other failure is the server's, and logged."""
    try:
        return work()
    except (InvalidInput, InputTooLarge) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    except ModelError:
        raise
    except Exception as exc:
        log.exception("model %s: preprocessing %s failed", version.name, where)
        raise ModelFailed(f"model {version.name!r} failed to preprocess {where} ({type(exc).__name__})") from None
