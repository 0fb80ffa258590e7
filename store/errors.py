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
