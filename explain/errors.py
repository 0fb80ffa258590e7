"""One exception root for explain/; each subclass names what is wrong and inherits the matching builtin.

    >>> from explain.errors import ExplainError, UnknownLayerError
    >>> try:
    ...     raise UnknownLayerError("layer9", known=["features.3", "features.6"])
    ... except KeyError as e:          # also an ExplainError
    ...     print(e)
    unknown layer 'layer9' (known: features.3, features.6)

Every message carries the id, value or path that is wrong. Nothing in explain/ catches an error only to print it.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "ExplainError",
    "RegionError",
    "UnknownIdError",
    "UnknownLayerError",
    "UnknownUnitError",
    "UnknownImageError",
    "UnknownConceptError",
    "UnknownActionError",
    "ProbeDataError",
    "LabelError",
]


class ExplainError(Exception):
    """Root of every error raised by explain/."""


class RegionError(ExplainError, ValueError):
    """A drawn region cannot be used: too few points, NaN/inf coordinates, too many vertices, empty mask, ..."""


class ProbeDataError(ExplainError, ValueError):
    """A concept probe cannot be fitted from the examples it was given (e.g. only positives)."""


class LabelError(ExplainError, ValueError):
    """A unit-labeling request is invalid (bad threshold, mismatched IoU vector, action already undone, ...)."""


def _short_list(items: Iterable, limit: int = 12) -> str:
    items = [str(i) for i in items]
    if len(items) > limit:
        return ", ".join(items[:limit]) + f", … ({len(items)} in all)"
    return ", ".join(items)


class UnknownIdError(ExplainError, KeyError):
    """An id (layer, unit, image, concept, action) that the store or database does not know."""

    kind = "id"

    def __init__(self, value, *, known: Iterable | None = None, where: str | None = None):
        self.value = value
        self.known = None if known is None else list(known)
        self.where = where
        msg = f"unknown {self.kind} {value!r}"
        if where:
            msg += f" in {where}"
        if self.known is not None:
            msg += f" (known: {_short_list(self.known)})"
        self.message = msg
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.message


class UnknownLayerError(UnknownIdError):
    """A layer name that the activation store (or model) does not have."""

    kind = "layer"


class UnknownUnitError(UnknownIdError):
    """A unit index outside 0 … n_units-1 of its layer."""

    kind = "unit"


class UnknownImageError(UnknownIdError):
    """An image id that is not in the store or manifest."""

    kind = "image"


class UnknownConceptError(UnknownIdError):
    """A concept id not in the concept vocabulary."""

    kind = "concept"


class UnknownActionError(UnknownIdError):
    """A labeling action id that does not exist (e.g. undo of an unknown action)."""

    kind = "action"
