"""The model repository: folders of specs and versioned artefacts, rescanned while serving."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import ensemble as ensemble_spec
from models import pipeline as pipeline_spec
from models import spec as specs
from models.config import Limits, Settings
from models.ensemble import EnsembleSpec
from models.errors import ModelNotFound, ModelNotReady, SpecError, VersionNotFound
from models.pipeline import PipelineSpec
from models.runtime import ARTEFACT, Session
from models.spec import ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelVersion:
    """One servable version: the spec it was loaded with and its session in this process."""

    spec: ModelSpec
    number: int
    session: Session
    stamp: tuple[int, int, int]
    limits: Limits

    @property
    def name(self) -> str:
        """The model's name."""
        return self.spec.name

    @functools.cached_property
    def fingerprint(self) -> str:
        """What tells this artefact and spec apart from any other served under the same version number:
        caches key on it, so a version redeployed in place never meets the old one's entries."""
        text = repr(self.stamp).encode()
        with contextlib.suppress(OSError):  # the spec file gone meanwhile: the artefact's stamp still differs
            text += self.spec.path.read_bytes()
        return hashlib.sha1(text).hexdigest()[:12]

    @functools.cached_property
    def key(self) -> str:
        """Name, number and fingerprint: what the caches' keys and tables name this version by."""
        return f"{self.name}:{self.number}:{self.fingerprint}"


@dataclass(frozen=True)
class Model:
    """A model folder: its spec and its versions, newest last."""

    spec: ModelSpec
    stamp: tuple[int, int, int]
    versions: dict[int, ModelVersion] = field(default_factory=dict)
    problem: str | None = None

    @functools.cached_property
    def default_number(self) -> int | None:
        """The version served when none is named: pinned by the spec, else the newest."""
        return self.spec.default_version or max(self.versions, default=None)

    def version(self, number: int | None = None) -> ModelVersion:
        """The named version, or the default one."""
        if number is None:
            if self.problem:
                raise ModelNotReady(self.problem)
            number = self.default_number
        found = self.versions.get(number) if number is not None else None
        if found is None:
            raise VersionNotFound(f"model {self.spec.name!r} has no version {number}")
        return found


class Registry:
    """Every model under the repository root, rescanned at most once per reload interval."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = settings.models_dir
        self._models: dict[str, Model] = {}
        self._pipelines: dict[str, PipelineSpec] = {}
        self._ensembles: dict[str, EnsembleSpec] = {}
        self._problems: dict[str, str] = {}
        self._scanned = -float("inf")
        self._lock = threading.Lock()
        self.watchers: list[Callable[[dict[str, Model]], None]] = []
        """Told the models, by name, after each scan, on the scanning thread (tables kept beside the registry)."""

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """A model version by name; ModelNotFound or VersionNotFound when absent."""
        return self.model(name).version(version)

    def model(self, name: str) -> Model:
        """A model by name, rescanning first if the interval has passed."""
        self.refresh()
        found = self._models.get(name)
        if found is None:
            raise ModelNotFound(f"no model named {name!r}")
        return found

    def pipeline(self, name: str) -> PipelineSpec:
        """A sync-async pipeline by name, rescanning first if the interval has passed."""
        self.refresh()
        found = self._pipelines.get(name)
        if found is None:
            raise ModelNotFound(f"no pipeline named {name!r}")
        return found

    def pipelines(self) -> list[PipelineSpec]:
        """Every servable pipeline, by name."""
        self.refresh()
        return [self._pipelines[n] for n in sorted(self._pipelines)]

    def ensemble(self, name: str) -> EnsembleSpec:
        """An ensemble by name, rescanning first if the interval has passed."""
        self.refresh()
        found = self._ensembles.get(name)
        if found is None:
            raise ModelNotFound(f"no ensemble named {name!r}")
        return found

    def ensembles(self) -> list[EnsembleSpec]:
        """Every servable ensemble, by name."""
        self.refresh()
        return [self._ensembles[n] for n in sorted(self._ensembles)]

    def models(self) -> list[Model]:
        """Every servable model, by name."""
        self.refresh()
        return [self._models[n] for n in sorted(self._models)]

    @property
    def problems(self) -> dict[str, str]:
        """What is broken: path -> message naming the file and field (scan faults and failed loads)."""
        failed = {
            str(v.session.path): v.session.error
            for m in self._models.values() for v in m.versions.values() if v.session.error
        }
        return self._problems | failed

    def refresh(self, force: bool = False) -> None:
        """Rescan the repository if the reload interval has passed (or now, if forced)."""
        if not force and time.monotonic() - self._scanned < self.settings.reload_interval_s:
            return
        if not self._lock.acquire(blocking=force):
            return  # another thread is scanning; serve what we have
        try:
            self._scanned = time.monotonic()
            models, problems = self._scan()
            pipelines = self._scan_composites(pipeline_spec.PIPELINE_FILE, pipeline_spec.load,
                                              _check_pipeline, models, problems)
            ensembles = self._scan_composites(ensemble_spec.ENSEMBLE_FILE, ensemble_spec.load,
                                              ensemble_spec.check, models, problems)
            for path, message in problems.items():
                if self._problems.get(path) != message:
                    log.error("model repository: %s", message)
            self._models, self._pipelines, self._ensembles = models, pipelines, ensembles
            self._problems = problems
            for watch in self.watchers:
                watch(models)
        finally:
            self._lock.release()

    def warm(self) -> None:
        """Load every version's session now (after fork), so first requests are fast and faults show."""
        for model in self.models():
            for version in model.versions.values():
                with contextlib.suppress(ModelNotReady):  # logged, and listed in `problems`
                    version.session.load()

    def _scan(self) -> tuple[dict[str, Model], dict[str, str]]:
        models: dict[str, Model] = {}
        problems: dict[str, str] = {}
        try:
            folders = sorted(p for p in self.root.iterdir() if (p / specs.SPEC_FILE).is_file())
        except OSError as exc:
            problems[str(self.root)] = f"{self.root}: model repository cannot be read ({exc})"
            return models, problems
        for folder in folders:
            try:
                model = self._load_model(folder, problems)
            except SpecError as exc:
                problems[exc.path] = str(exc)
                continue
            except OSError as exc:  # a folder changed under the scan; the next scan sees it settled
                problems[str(folder)] = f"{folder}: cannot be read ({exc})"
                continue
            if model.versions:
                models[model.spec.name] = model
            else:
                problems[str(folder)] = f"{folder}: no version folder holds a {ARTEFACT}"
        return models, problems

    def _scan_composites(self, filename: str, load: Callable[[Path], Any],
                         check: Callable[[Any, dict[str, ModelSpec]], None], models: dict[str, Model],
                         problems: dict[str, str]) -> dict[str, Any]:
        """Specs of models made of other models (pipelines, ensembles), checked against the models found."""
        found: dict[str, Any] = {}
        try:
            folders = sorted(p for p in self.root.iterdir() if (p / filename).is_file())
        except OSError:
            return found  # already reported by the model scan
        specs_by_name = {name: model.spec for name, model in models.items()}
        for folder in folders:
            try:
                spec = load(folder)
                check(spec, specs_by_name)
            except SpecError as exc:
                problems[exc.path] = str(exc)
                continue
            found[spec.name] = spec
        return found

    def _load_model(self, folder: Path, problems: dict[str, str]) -> Model:
        old = self._models.get(folder.name)
        stamp = _stamp(folder / specs.SPEC_FILE)
        spec = old.spec if old and old.stamp == stamp else specs.load(folder)
        versions: dict[int, ModelVersion] = {}
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            artefact = sub / ARTEFACT
            if not sub.name.isdigit() or sub.name.startswith("0"):
                problems[str(sub)] = f"{sub}: a version folder's name is a positive integer"
            elif not artefact.is_file():
                problems[str(sub)] = f"{sub}: holds no {ARTEFACT}"
            else:
                versions[int(sub.name)] = self._version(spec, int(sub.name), artefact, old)
        problem = None
        if spec.default_version is not None and spec.default_version not in versions:
            problem = str(SpecError(spec.path, "default_version", f"version {spec.default_version} is not present"))
            problems[str(spec.path)] = problem
        return Model(spec, stamp, dict(sorted(versions.items())), problem)

    def _version(self, spec: ModelSpec, number: int, artefact: Path, old: Model | None) -> ModelVersion:
        stamp = _stamp(artefact)
        previous = old.versions.get(number) if old else None
        if previous is not None and previous.spec is spec and previous.stamp == stamp:
            return previous
        session = Session(spec, artefact, self.settings.intra_op_threads)
        return ModelVersion(spec, number, session, stamp, self.settings.limits)


def _check_pipeline(spec: PipelineSpec, models: dict[str, ModelSpec]) -> None:
    pipeline_spec.check(spec, models.get(spec.light), models.get(spec.heavy))


def _stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is replaced or rewritten."""
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size, st.st_ino
