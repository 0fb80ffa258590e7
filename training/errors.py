"""One exception root for training/; each subclass names what is wrong and inherits the matching builtin."""

from __future__ import annotations

__all__ = ["TrainingError", "ConfigError", "DataError", "TrackingError", "ModelLoadError", "UntrustedModelError"]


class TrainingError(Exception):
    """Root of every error raised by training/."""


class ConfigError(TrainingError, ValueError):
    """A training config is malformed: unknown key, wrong type, impossible value (the message names the key)."""


class DataError(TrainingError, ValueError):
    """The dataset cannot be trained on: missing files, one class, an empty split, mixed image sizes…"""


class TrackingError(TrainingError, ConnectionError):
    """The mlflow tracking server cannot be reached or refuses the request (the message names the URI)."""


class ModelLoadError(TrainingError, ValueError):
    """A model reference cannot be resolved or its files are not a valid, pickle-free model."""


class UntrustedModelError(ModelLoadError):
    """A saved model names code (a user factory) that the caller did not trust, or its weights carry a pickle."""
