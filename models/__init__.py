"""Model repository and runtime: specs, versioned ONNX artefacts, sessions and the prediction entry point.

This package is the service layer both the web process and the workers call. It imports neither Flask,
Celery, Redis nor SQLAlchemy.
"""

from models.config import Settings
from models.errors import (
    InputTooLarge,
    InvalidInput,
    ModelError,
    ModelFailed,
    ModelNotFound,
    ModelNotReady,
    SpecError,
    VersionNotFound,
)
from models.inference import arrays, has_encoded_images, predict, prepare
from models.registry import Model, ModelVersion, Registry

__all__ = [
    "InputTooLarge",
    "InvalidInput",
    "Model",
    "ModelError",
    "ModelFailed",
    "ModelNotFound",
    "ModelNotReady",
    "ModelVersion",
    "Registry",
    "Settings",
    "SpecError",
    "VersionNotFound",
    "arrays",
    "has_encoded_images",
    "predict",
    "prepare",
]
