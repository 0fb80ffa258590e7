"""Reading medical images: DICOM (pydicom), PNG and TIFF, to oriented, windowed arrays with pseudonymous ids.

    >>> from store.images import read_image
    >>> img = read_image("1-130.dcm")                 # MedicalImage; patient identifiers stay inside this module
    >>> img.id, img.laterality, img.view, img.flipped  # ('img-5d0c…', 'L', 'CC', False)
    >>> disp = img.display(scale=0.25)                 # float32 (y, x) in [0, 1], windowed, MONOCHROME1 inverted

Orientation: every image is flipped left↔right when needed so that the chest wall is on the LEFT edge and the
breast points right; `flipped` records it so coordinates map back (`to_source_xy`). 16-bit data stays 16-bit
(after the modality LUT, as float32) until `display` applies the VOI LUT/window.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageError

__all__ = ["MedicalImage", "read_image", "pseudonym", "DEFAULT_MAX_PIXELS"]

# 8 real CBIS-DDSM films are ≈13 Mpx; 60 Mpx leaves room for large detectors and refuses pixel bombs.
DEFAULT_MAX_PIXELS = 60_000_000


@dataclass
class MedicalImage:
    """One grayscale image, oriented chest wall left. `data` is float32 (y, x) after the modality LUT."""

    id: str  # stable pseudonym, never a patient identifier
    path: Path
    data: np.ndarray  # float32 (y, x), modality values, oriented
    flipped: bool  # True when the source was mirrored left↔right to put the chest wall on the left
    laterality: str = ""  # "L", "R" or "" (unknown)
    view: str = ""  # "CC", "MLO", … or ""
    modality: str = ""
    window: tuple[float, float] | None = None  # (center, width) from the file, None → robust percentiles
    invert: bool = False  # MONOCHROME1: invert after windowing
    voi: object = field(default=None, repr=False)  # callable(data) -> windowed float in [0, 1], when a VOI LUT applies

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape  # (y, x)

    def display(self, *, scale: float = 1.0, window: tuple[float, float] | None = None) -> np.ndarray:
        """Windowed float32 (y, x) in [0, 1] (bright = dense), resized by `scale` (area averaging)."""
        raise NotImplementedError  # filled in below by _display

    def to_source_xy(self, x: float, y: float) -> tuple[float, float]:
        """Oriented (x, y) → (x, y) in the file's own pixel grid."""
        return ((self.data.shape[1] - 1 - x) if self.flipped else x, y)


def pseudonym(*parts: str, salt: str = "conceptlens") -> str:
    """Stable pseudonymous id from identifying strings (never reversible, never shown elsewhere)."""
    h = hashlib.sha256(("\x1f".join([salt, *parts])).encode("utf-8")).hexdigest()
    return f"img-{h[:12]}"


def read_image(path, *, max_pixels: int = DEFAULT_MAX_PIXELS, salt: str = "conceptlens") -> MedicalImage:
    """Read a DICOM, PNG or TIFF file. Raises ImageError (naming the file and reason) for anything unusable."""
    raise NotImplementedError
