"""The one prediction entry point that the web process and every worker call."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models import postprocess, tensor
from models.errors import InvalidInput
from models.registry import ModelVersion
from models.tensor import TensorSpec


def predict(version: ModelVersion, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check inputs against the spec, preprocess images, run the graph and derive outputs."""
    feeds = prepare(version, inputs)
    return postprocess.derive(version.spec, version.session.run(feeds))


def arrays(version: ModelVersion, values: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Convert JSON values, one per input name, to arrays of the declared dtypes."""
    _check_names(version, values)
    return {t.name: tensor.from_values(values[t.name], t.dtype, t.where)
            for t in version.spec.inputs if t.name in values}


def prepare(version: ModelVersion, inputs: Mapping[str, np.ndarray], images: bool = True) -> dict[str, np.ndarray]:
    """Turn client arrays into the exact feeds the graph takes, or raise InvalidInput saying why.

    With `images=False`, encoded images are only checked to be a list, not decoded: the check a web
    process makes before it queues a job whose images a worker will preprocess.
    """
    spec = version.spec
    _check_names(version, inputs)
    feeds: dict[str, np.ndarray] = {}
    for t in spec.inputs:
        if t.name not in inputs:
            raise InvalidInput(f"missing input {t.name!r} {t.dtype.name} {t.shape_text()}")
        feeds[t.name] = _feed(t, inputs[t.name], version.max_image_pixels, images)
    rows = {len(f) for f in feeds.values()}
    if len(rows) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {sorted(rows)}")
    if rows and max(rows) > spec.options.max_instances:
        raise InvalidInput(f"{max(rows)} rows in one request; model {spec.name!r} takes at most "
                           f"{spec.options.max_instances}")
    return feeds


def has_encoded_images(version: ModelVersion, inputs: Mapping[str, np.ndarray]) -> bool:
    """Whether some input carries encoded images, which preprocessing must decode before the model runs."""
    return any(
        t.image is not None and not t.dtype.is_bytes and t.name in inputs and inputs[t.name].dtype.kind == "O"
        for t in version.spec.inputs
    )


def _check_names(version: ModelVersion, inputs: Mapping[str, object]) -> None:
    spec = version.spec
    if inputs.keys() <= spec.input_names:
        return
    unknown = set(inputs) - spec.input_names
    if unknown:
        raise InvalidInput(f"unknown input {sorted(unknown)[0]!r}; model {spec.name!r} takes "
                           f"{', '.join(repr(t.name) for t in spec.inputs)}")


def _feed(t: TensorSpec, value: np.ndarray, max_pixels: int, images: bool = True) -> np.ndarray:
    where = t.where
    if t.image is not None and value.dtype.kind == "O" and not t.dtype.is_bytes:
        if not images:
            return _image_list(value, where)
        value = _images(t, value, max_pixels, where)
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


def _images(t: TensorSpec, value: np.ndarray, max_pixels: int, where: str) -> np.ndarray:
    value = _image_list(value, where)
    items = []
    for i, data in enumerate(value):
        try:
            items.append(t.image.tensor(data, max_pixels))
        except InvalidInput as exc:
            raise InvalidInput(f"{where}[{i}]: {exc}") from None
    batch = np.stack(items) if items else np.empty((0, *t.image.item_shape), np.float32)
    batch = batch.reshape((len(items), *t.shape[1:]))
    target = t.dtype.numpy
    if target.kind in "iub":
        info = np.iinfo(target) if target.kind != "b" else np.iinfo(np.uint8)
        batch = np.clip(np.rint(batch), info.min, info.max)
    return batch.astype(target)
