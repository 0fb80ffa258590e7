"""The one input transform of ConceptLens: uint8 patches → normalized float32 network input.

    >>> from training.transforms import preprocess
    >>> x = preprocess(patches, {"mean": 0.42, "std": 0.21})    # patches uint8 (batch, y, x) → float32 (batch, 1, y, x)

Training, activation extraction and the app all call `preprocess`, so a model always sees the same numbers for the
same pixels. Training inserts its brightness/contrast jitter between the two halves (`to_unit` then `normalize`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["preprocess", "to_unit", "normalize", "check_transform", "DEFAULT_TRANSFORM"]

DEFAULT_TRANSFORM = {"mean": 0.5, "std": 0.25}


def check_transform(transform: Mapping) -> dict[str, float]:
    """Validate a {mean, std} transform and return it as plain floats."""
    try:
        mean, std = float(transform["mean"]), float(transform["std"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"transform {transform!r} must be a mapping with numeric 'mean' and 'std'") from None
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise ValueError(f"transform {transform!r}: mean must be finite and std > 0")
    return {"mean": mean, "std": std}


def to_unit(images) -> torch.Tensor:
    """uint8 (batch, y, x) or (batch, 1, y, x), ndarray or tensor → float32 (batch, 1, y, x) in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"preprocess: expected a uint8 ndarray or tensor, got {type(images).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"preprocess: expected uint8 pixels, got {t.dtype} (convert 16-bit patches with >> 8)")
    if t.ndim == 3:
        t = t.unsqueeze(1)  # (batch, 1, y, x)
    if t.ndim != 4 or t.shape[1] != 1:
        raise ValueError(f"preprocess: expected (batch, y, x) or (batch, 1, y, x), got shape {tuple(t.shape)}")
    return t.to(torch.float32).div_(255.0)


def normalize(x: torch.Tensor, transform: Mapping) -> torch.Tensor:
    """float (batch, 1, y, x) in [0, 1] → (x - mean) / std."""
    tr = check_transform(transform)
    return (x - tr["mean"]) / tr["std"]


def preprocess(images, transform: Mapping) -> torch.Tensor:
    """uint8 (batch, y, x) or (batch, 1, y, x) → float32 (batch, 1, y, x), `(pixel / 255 - mean) / std`.

    The result lives on the input tensor's device; numpy input gives a CPU tensor.
    """
    return normalize(to_unit(images), transform)
