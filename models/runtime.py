"""onnxruntime sessions: created lazily, once per process and after fork, checked against the spec."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from models.errors import ModelFailed, ModelNotReady, SpecError
from models.spec import ModelSpec
from models.tensor import TensorSpec

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)
ARTEFACT = "model.onnx"


class Session:
    """One versioned artefact's onnxruntime session, made on first use in this process."""

    def __init__(self, spec: ModelSpec, path: Path, intra_op_threads: int):
        self.spec, self.path = spec, path
        self.intra_op_threads = spec.options.intra_op_threads or intra_op_threads
        self._ort: ort.InferenceSession | None = None
        self._run_options: ort.RunOptions | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._output_names = [o.name for o in spec.runtime_outputs]

    @property
    def error(self) -> str | None:
        """Why the artefact cannot serve, once a load has failed."""
        return self._error

    @property
    def loaded(self) -> bool:
        """Whether the session exists in this process."""
        return self._ort is not None

    def load(self) -> ort.InferenceSession:
        """Create the session if needed; raise ModelNotReady if the artefact is broken."""
        session = self._ort
        if session is not None:
            return session
        with self._lock:
            if self._ort is None and self._error is None:
                try:
                    session = self._create()
                    self._run_options = _run_options()
                    self._ort = session
                except SpecError as exc:
                    self._error = str(exc)
                except Exception as exc:  # onnxruntime raises its own exception types
                    self._error = str(SpecError(self.path, "", f"cannot be loaded ({exc})"))
                if self._error:
                    log.error("model %s: %s", self.spec.name, self._error)
            if self._ort is None:
                raise ModelNotReady(f"model {self.spec.name!r} cannot serve: {self._error}")
            return self._ort

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on inputs checked against the spec; a failure is the server's (ModelFailed), logged."""
        session = self._ort or self.load()
        try:
            results = session.run(self._output_names, feeds, self._run_options)
        except Exception as exc:  # onnxruntime raises its own exception types
            log.error("model %s: the runtime failed on checked inputs: %s", self.spec.name, exc)
            raise ModelFailed(f"model {self.spec.name!r} failed while running: {_short(exc)}") from None
        return dict(zip(self._output_names, results, strict=True))

    def _create(self) -> ort.InferenceSession:
        # Imported here, never at module level: a process that imported onnxruntime and then forks
        # (gunicorn's master, Celery's prefork parent) leaves children that abort or hang at exit.
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.spec.options.inter_op_threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        _match(self.path, "inputs", self.spec.inputs, session.get_inputs())
        _match(self.path, "outputs", self.spec.runtime_outputs, session.get_outputs())
        log.info("model %s: loaded %s", self.spec.name, self.path)
        return session


def _run_options() -> ort.RunOptions:
    """The RunOptions every call of a session shares (made once: each costs an allocation)."""
    import onnxruntime as ort

    return ort.RunOptions()


def _match(path: Path, kind: str, declared: tuple[TensorSpec, ...], actual: list) -> None:
    """Check the artefact's inputs or outputs against the spec's declaration."""
    found = {a.name: a for a in actual}
    if set(found) != {d.name for d in declared}:
        raise SpecError(path, kind, f"the artefact's {kind} are {sorted(found)}, "
                                    f"the spec declares {sorted(d.name for d in declared)}")
    for d in declared:
        a = found[d.name]
        if a.type != d.dtype.onnx:
            raise SpecError(path, f"{kind}.{d.name}", f"is {a.type} in the artefact, {d.dtype.name} in the spec")
        if not _dims_fit(d.shape, a.shape):
            raise SpecError(path, f"{kind}.{d.name}", f"has shape {a.shape} in the artefact, "
                                                       f"{d.shape_text()} in the spec")


def _dims_fit(declared: tuple[int, ...], actual: list) -> bool:
    if len(declared) != len(actual):
        return False
    return all(not isinstance(a, int) or a == d for d, a in zip(declared, actual, strict=True))


def _short(exc: Exception) -> str:
    text = str(exc).split(" : ", 1)[-1]
    return text if len(text) < 300 else text[:300] + "..."
