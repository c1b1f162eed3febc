"""Errors raised by the model repository and runtime; the web layer maps each to a status code."""


class ModelError(Exception):
    """Base of every error this package raises on purpose."""


class ModelNotFound(ModelError):
    """No model of that name is in the repository."""


class VersionNotFound(ModelError):
    """The model exists but not at that version."""


class ModelNotReady(ModelError):
    """The model or version exists but cannot serve (its artefact failed to load)."""


class InvalidInput(ModelError):
    """The request's inputs do not fit the model's signature."""


class InputTooLarge(ModelError):
    """An input (an image, a tensor) exceeds a configured limit."""


class ModelFailed(ModelError):
    """The model or its preprocessing failed on inputs that passed validation: the server's fault, not the client's."""


class SpecError(ModelError):
    """A model's spec or artefact is broken; the message names the file and the field."""

    def __init__(self, path: object, field: str, message: str):
        self.path, self.field = str(path), field
        where = f"{self.path}: {field}" if field else self.path
        super().__init__(f"{where}: {message}")
