"""The serving template: a model folder's `model.toml`, parsed into typed, checked settings."""

from __future__ import annotations

import functools
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from models import dtype, image, monitoring, postprocess, routing
from models.dtype import DType
from models.errors import SpecError
from models.fields import Fields
from models.monitoring import Monitoring
from models.tensor import TensorSpec

SPEC_FILE = "model.toml"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass(frozen=True)
class Options:
    """Per-model serving options; every field has a safe default."""

    intra_op_threads: int | None = None
    """onnxruntime threads inside one operator; None takes the platform default for this host."""
    inter_op_threads: int = 1
    """onnxruntime threads across operators."""
    cache_ttl_s: float = 0.0
    """Seconds a cached prediction lives; 0 turns the prediction cache off for this model."""
    max_batch_size: int = 32
    """Most queued jobs coalesced into one runtime call."""
    max_batch_delay_ms: float = 2.0
    """Longest a queued job waits for others to fill a batch."""
    max_instances: int = 10_000
    """Most rows one request may carry."""


@dataclass(frozen=True)
class ServingLimits:
    """What one model takes before its requests are refused or sent to its fallback (the `[limits]` table)."""

    max_concurrency: int | None = None
    """Most requests of the model one web process serves at once; past it, 429 or the fallback's answer."""
    max_queue_depth: int | None = None
    """Most jobs of the model waiting in its queue; past it, `:submit` answers 429."""
    fallback: str | None = None
    """The model (taking the same inputs) that answers when this one sheds or its circuit is open."""
    retry_after_s: int = 1
    """The `Retry-After` of a request or job refused for the model's concurrency or queue depth."""
    breaker_failures: int | None = None
    """Model failures in a row that open the model version's circuit; None: no circuit."""
    breaker_reset_s: float = 30.0
    """Seconds an open circuit refuses before it lets a trial request through."""


@dataclass(frozen=True)
class Evaluation:
    """How the model's held-out accuracy was measured, and the figure to hold it to."""

    dataset: str
    accuracy: float
    test_size: float = 0.25
    seed: int = 0
    positive_class: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything declared about one model: signature, labels, options, evaluation."""

    name: str
    path: Path
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...] = ()
    default_version: int | None = None
    options: Options = field(default_factory=Options)
    evaluation: Evaluation | None = None
    limits: ServingLimits | None = None
    """None when the spec declares no `[limits]`: the model is never refused for its load."""
    monitoring: Monitoring = field(default_factory=Monitoring)
    """The `[monitoring]` table: the prediction log's sampling, outliers and drift."""
    routing: routing.Routing | None = None
    """The `[routing]` table: splits, rules and shadows; None (the default version serves) when absent."""

    @functools.cached_property
    def input_names(self) -> frozenset[str]:
        """Names of the declared inputs."""
        return frozenset(t.name for t in self.inputs)

    @functools.cached_property
    def inputs_by_name(self) -> dict[str, TensorSpec]:
        """The declared inputs by name, in declared order."""
        return {t.name: t for t in self.inputs}

    @functools.cached_property
    def output_names(self) -> list[str]:
        """Names of every output, the derived ones included, in declared order."""
        return [o.name for o in self.outputs]

    @functools.cached_property
    def output_dtypes(self) -> dict[str, DType]:
        """The element type of every output by name."""
        return {o.name: o.dtype for o in self.outputs}

    @functools.cached_property
    def derived_outputs(self) -> tuple[TensorSpec, ...]:
        """Outputs computed after the graph runs."""
        return tuple(o for o in self.outputs if o.derive is not None)

    @property
    def runtime_outputs(self) -> tuple[TensorSpec, ...]:
        """Outputs the ONNX graph produces (the rest are derived after it runs)."""
        return tuple(o for o in self.outputs if o.derive is None)

    @functools.cached_property
    def max_request_values(self) -> int | None:
        """Most JSON values (numbers, strings, lists) a request body for this model can need, with room for the
        protocols' own fields; None when an input's rows have no fixed size, or hold text (whose commas count)."""
        per_row = 0
        for t in self.inputs:
            if -1 in t.shape[1:] or (t.dtype.is_bytes and t.image is None):
                return None
            per_row += math.prod(t.shape[1:]) + 2
        return self.options.max_instances * per_row + 64 * (len(self.inputs) + len(self.outputs)) + 1024

    @property
    def takes_images(self) -> bool:
        """Whether some input accepts encoded images."""
        return any(i.image is not None for i in self.inputs)


def load(folder: Path) -> ModelSpec:
    """Read and check `folder/model.toml`; raise SpecError naming the file and field."""
    path = folder / SPEC_FILE
    if not NAME.match(folder.name):
        raise SpecError(folder, "", "a model folder's name must be letters, digits, '_', '.' or '-'")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(path, "", f"cannot be read as TOML ({exc})") from None
    return parse(folder.name, path, Fields(table, path))


def parse(name: str, path: Path, top: Fields) -> ModelSpec:
    """Build a ModelSpec from the top-level table of a spec file."""
    labels = tuple(top.each("labels", _label))
    inputs = tuple(_input(t) for t in top.table_list("inputs", required=True))
    outputs = tuple(_output(t) for t in top.table_list("outputs", required=True))
    spec = ModelSpec(
        name=name,
        path=path,
        description=top.str("description", ""),
        inputs=inputs,
        outputs=outputs,
        labels=labels,
        default_version=top.int("default_version", minimum=1),
        options=_options(top.sub("options")),
        evaluation=_evaluation(top.sub("evaluation")),
        limits=_limits(name, top.sub("limits")),
        monitoring=monitoring.parse(top.sub("monitoring")),
        routing=routing.parse(name, top.sub("routing")),
    )
    top.done()
    _check_names(top, "inputs", inputs)
    _check_names(top, "outputs", outputs)
    for i, out in enumerate(outputs):
        if out.derive is not None:
            postprocess.check(spec, out, Fields({}, path, f"outputs[{i}]"))
    return spec


def _label(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("labels must be strings")
    return value


def _tensor_fields(t: Fields) -> dict:
    shape = tuple(t.each("shape", _dim, required=True))
    if not shape:
        raise t.fail("shape", "must have at least the batch dimension")
    return {
        "name": t.str("name", required=True),
        "dtype": t.choice("dtype", dtype.BY_NAME),
        "shape": shape,
        "description": t.str("description", ""),
    }


def _dim(value: object) -> int:
    if type(value) is not int or value < -1 or value == 0:
        raise ValueError("a dimension is a positive integer or -1 (any size)")
    return value


def _input(t: Fields) -> TensorSpec:
    fields = _tensor_fields(t)
    steps = t.table_list("preprocess")
    pipeline = image.parse(steps) if steps else None
    spec = TensorSpec(**fields, allow_nonfinite=t.bool("allow_nonfinite"), image=pipeline)
    t.done()
    if pipeline is not None:
        declared = spec.shape[1:]
        if -1 in declared or math.prod(declared) != math.prod(pipeline.item_shape):
            raise t.fail("shape", f"preprocessing yields {list(pipeline.item_shape)} per image, "
                                  f"which does not fit {spec.shape_text()}")
    return spec


def _output(t: Fields) -> TensorSpec:
    fields = _tensor_fields(t)
    derive = t.choice("derive", sorted(postprocess.DERIVATIONS), "") or None
    spec = TensorSpec(**fields, derive=derive, source=t.str("source"))
    if derive is None and spec.source is not None:
        raise t.fail("source", "only a derived output has a source")
    t.done()
    return spec


def _options(t: Fields) -> Options:
    options = Options(
        intra_op_threads=t.int("intra_op_threads", minimum=1),
        inter_op_threads=t.int("inter_op_threads", 1, minimum=1),
        cache_ttl_s=t.number("cache_ttl_s", 0.0, minimum=0.0),
        max_batch_size=t.int("max_batch_size", 32, minimum=1),
        max_batch_delay_ms=t.number("max_batch_delay_ms", 2.0, minimum=0.0),
        max_instances=t.int("max_instances", 10_000, minimum=1),
    )
    t.done()
    return options


def _evaluation(t: Fields) -> Evaluation | None:
    if not t.table:
        return None
    evaluation = Evaluation(
        dataset=t.choice("dataset", ["iris", "digits"]),
        accuracy=t.number("accuracy", minimum=0.0, required=True),
        test_size=t.number("test_size", 0.25, minimum=0.01),
        seed=t.int("seed", 0),
        positive_class=t.int("positive_class"),
    )
    t.done()
    return evaluation


def _limits(name: str, t: Fields) -> ServingLimits | None:
    if not t.table:
        return None
    limits = ServingLimits(
        max_concurrency=t.int("max_concurrency", minimum=1),
        max_queue_depth=t.int("max_queue_depth", minimum=1),
        fallback=t.str("fallback"),
        retry_after_s=t.int("retry_after_s", 1, minimum=1),
        breaker_failures=t.int("breaker_failures", minimum=1),
        breaker_reset_s=t.number("breaker_reset_s", 30.0, minimum=0.001),
    )
    t.done()
    if limits.fallback is not None and (not NAME.match(limits.fallback) or limits.fallback == name):
        raise t.fail("fallback", "must name another model")
    if limits.breaker_failures is None and "breaker_reset_s" in t.table:
        raise t.fail("breaker_reset_s", "needs breaker_failures")
    return limits


def _check_names(top: Fields, key: str, tensors: tuple[TensorSpec, ...]) -> None:
    seen: set[str] = set()
    for i, tensor in enumerate(tensors):
        if tensor.name in seen:
            raise top.fail(f"{key}[{i}].name", f"duplicate name {tensor.name!r}")
        seen.add(tensor.name)
