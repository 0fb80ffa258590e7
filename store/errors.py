"""One exception root for store/; each subclass names what is wrong and inherits the matching builtin."""

from __future__ import annotations

__all__ = [
    "StoreError",
    "ImageError",
    "PixelBudgetError",
    "MissingDecoderError",
    "ManifestError",
    "ActivationStoreError",
    "StoreMismatchError",
    "ChunkCorruptionError",
    "MisalignedWriteError",
    "AccessDenied",
    "ConflictError",
    "AccountError",
]


class StoreError(Exception):
    """Root of every error raised by store/."""


class ImageError(StoreError, ValueError):
    """An image file cannot be used; the message names the file and the reason.

    The path shown is the file's path on disk: never patient identifiers read from inside it.
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class PixelBudgetError(ImageError):
    """The declared image size is larger than the pixel budget; refused before decoding."""


class MissingDecoderError(ImageError):
    """The transfer syntax needs a decoder plugin that is not installed."""


class ManifestError(StoreError, ValueError):
    """A dataset manifest is malformed or points at missing files."""


class ActivationStoreError(StoreError):
    """Root of activation-store errors."""


class StoreMismatchError(ActivationStoreError, ValueError):
    """A store made from another model version or dataset was used with the wrong ones."""


class ChunkCorruptionError(ActivationStoreError, IOError):
    """A stored chunk fails its checksum; names the array and the chunk."""


class MisalignedWriteError(ActivationStoreError, ValueError):
    """A writer tried to write a region that is not whole, aligned chunks."""


class AccessDenied(StoreError, PermissionError):
    """The user may not see or change this (not a member of the session, not an admin, another's work) → HTTP 403.

    The message names the user and what was refused, never the data behind it.
    """


class ConflictError(StoreError):
    """A stale `version`: someone changed the item since the writer read it → HTTP 409; nothing was written.

        >>> raise ConflictError("comment 12", who="bob", when=stamp)
        ConflictError: comment 12 was changed by bob at 2025-03-01T10:02:11+00:00; reload and try again

    `what`, `who`, `when` (datetime or None) and `current_version` are kept as attributes for the caller.
    """

    def __init__(self, what: str, *, who: str | None = None, when=None, current_version: int | None = None):
        self.what, self.who, self.when, self.current_version = what, who, when, current_version
        by = f" by {who}" if who else ""
        at = f" at {when.isoformat() if hasattr(when, 'isoformat') else when}" if when is not None else ""
        super().__init__(f"{what} was changed{by}{at}; reload and try again")


class AccountError(StoreError, ValueError):
    """A bad user name, role, password or an unknown user → HTTP 400; nothing was written."""
