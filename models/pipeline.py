"""The sync-async pattern's spec: a light model answered at once, a heavy one queued, same inputs.

A pipeline is a folder holding `pipeline.toml` (no artefacts of its own):

    description = "Digits: a fast answer now, a better one as a job."
    light = "digits-light"
    heavy = "digits-heavy"
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from models.errors import SpecError
from models.fields import Fields
from models.spec import NAME, ModelSpec

PIPELINE_FILE = "pipeline.toml"


@dataclass(frozen=True)
class PipelineSpec:
    """A declared light/heavy pair."""

    name: str
    path: Path
    description: str
    light: str
    heavy: str


def load(folder: Path) -> PipelineSpec:
    """Read and check `folder/pipeline.toml`; raise SpecError naming the file and field."""
    path = folder / PIPELINE_FILE
    if not NAME.match(folder.name):
        raise SpecError(folder, "", "a pipeline folder's name must be letters, digits, '_', '.' or '-'")
    try:
        top = Fields(tomllib.loads(path.read_text(encoding="utf-8")), path)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(path, "", f"cannot be read as TOML ({exc})") from None
    spec = PipelineSpec(folder.name, path, top.str("description", ""), top.str("light", required=True),
                        top.str("heavy", required=True))
    top.done()
    return spec


def check(spec: PipelineSpec, light: ModelSpec | None, heavy: ModelSpec | None) -> None:
    """Check that both members exist and take the same inputs."""
    for field, member in (("light", light), ("heavy", heavy)):
        if member is None:
            raise SpecError(spec.path, field, f"no servable model named {getattr(spec, field)!r}")
    signature = [(t.name, t.dtype, t.shape[1:], t.image is not None) for t in light.inputs]
    if signature != [(t.name, t.dtype, t.shape[1:], t.image is not None) for t in heavy.inputs]:
        raise SpecError(spec.path, "heavy", f"{heavy.name!r} takes other inputs than {light.name!r}")
