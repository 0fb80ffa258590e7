"""One exception root for vis/; each subclass says what is wrong and inherits the matching builtin.

    >>> from vis.errors import InvalidInput
    >>> raise InvalidInput("region", "path has 2 points (need ≥ 3)")    # → HTTP 400 from any callback

`InvalidInput` is what a callback raises for a value no honest browser sends (a forged or malformed payload):
the app turns it into a 400 response with the message, and nothing is written. `NotReady` is for a workspace that
cannot be shown yet (no dataset, no store, a store from another model): pages render its message instead of views.
"""

from __future__ import annotations

__all__ = ["VisError", "InvalidInput", "NotReady", "UserInputError"]


class VisError(Exception):
    """Root of every error raised by vis/."""


class InvalidInput(VisError, ValueError):
    """A callback argument has the wrong type, size or value; the message names the argument and the value."""

    def __init__(self, what: str, reason: str):
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class NotReady(VisError, LookupError):
    """The workspace lacks what a view needs (dataset, store, model); the message tells which command makes it."""


class UserInputError(VisError, ValueError):
    """Something a user typed cannot be used (e.g. a concept name with odd characters); shown as a message."""
