"""Settings of the model repository and runtime, read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Limits:
    """What decoding a client's images may cost; each is checked from the images' headers, before any decoding."""

    image_pixels: int = 25_000_000
    """Most pixels of one image."""
    request_pixels: int = 50_000_000
    """Most pixels of all the images of one request or job."""
    batch_chunk_pixels: int = 1_000_000_000
    """Most pixels of all the images one batch chunk decodes."""


@dataclass(frozen=True)
class Settings:
    """Typed settings with safe development defaults; each maps to one environment variable."""

    models_dir: Path = PACKAGE_DIR
    """MODELS_DIR: root of the model repository, one folder per model."""
    reload_interval_s: float = 1.0
    """MODEL_RELOAD_INTERVAL_S: how often the repository is rescanned for new versions; 0 = every request."""
    intra_op_threads: int = 1
    """ORT_INTRA_OP_THREADS: onnxruntime threads per session unless a spec sets its own."""
    max_image_pixels: int = Limits.image_pixels
    """MAX_IMAGE_PIXELS: images with more pixels are refused before they are decoded."""
    max_request_pixels: int = Limits.request_pixels
    """MAX_REQUEST_PIXELS: a request or job whose images have more pixels together is refused before any is decoded."""
    max_batch_chunk_pixels: int = Limits.batch_chunk_pixels
    """MAX_BATCH_CHUNK_PIXELS: the pixels one batch chunk may decode; items past it fail, to be retried."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_dir", Path(self.models_dir))

    @property
    def limits(self) -> Limits:
        """The image limits every version of the repository is served with."""
        return Limits(self.max_image_pixels, self.max_request_pixels, self.max_batch_chunk_pixels)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Read the settings from environment variables, falling back to the defaults."""
        return cls(
            models_dir=Path(env.get("MODELS_DIR", str(cls.models_dir))),
            reload_interval_s=float(env.get("MODEL_RELOAD_INTERVAL_S", cls.reload_interval_s)),
            intra_op_threads=int(env.get("ORT_INTRA_OP_THREADS", cls.intra_op_threads)),
            max_image_pixels=int(env.get("MAX_IMAGE_PIXELS", cls.max_image_pixels)),
            max_request_pixels=int(env.get("MAX_REQUEST_PIXELS", cls.max_request_pixels)),
            max_batch_chunk_pixels=int(env.get("MAX_BATCH_CHUNK_PIXELS", cls.max_batch_chunk_pixels)),
        )
