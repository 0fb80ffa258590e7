"""Reading medical images: DICOM (pydicom), PNG and TIFF, to oriented, windowed arrays with pseudonymous ids.

    >>> from store.images import read_image
    >>> img = read_image("1-130.dcm")                 # MedicalImage; patient identifiers stay inside this module
    >>> img.id, img.laterality, img.view, img.flipped  # ('img-5d0c…', 'L', 'CC', False)
    >>> disp = img.display(scale=0.25)                 # float32 (y, x) in [0, 1], windowed, MONOCHROME1 inverted

Orientation: every image is flipped left↔right when needed so that the chest wall is on the LEFT edge and the
breast points right; `flipped` records it so coordinates map back (`to_source_xy`). 16-bit data stays 16-bit
(after the modality LUT, as float32) until `display` applies the VOI LUT/window.

Hostile files: the declared size is checked against a pixel budget from the header alone (pixel data not read),
the pixel data length is checked against the header before decoding, and every failure is an `ImageError` whose
message names the file path and the reason — never a value read from inside the file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageError, MissingDecoderError, PixelBudgetError

__all__ = [
    "MedicalImage",
    "VoiTransform",
    "read_image",
    "pseudonym",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MODALITIES",
    "window_linear",
    "window_sigmoid",
]

log = logging.getLogger(__name__)

# 8 real CBIS-DDSM films are ≈13 Mpx; 60 Mpx leaves room for large detectors and refuses pixel bombs.
DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_MODALITIES = ("MG",)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Headers, overlays and private data beyond the pixel data itself: a generous allowance, still bounded.
_HEADER_SLACK_BYTES = 32 * 1024 * 1024
_DEFER_BYTES = 4096  # values larger than this are not read while parsing the header

# Which package decodes which transfer syntax, for the "missing decoder" message (pydicom's own list is used first).
_DECODER_PACKAGES = {
    "1.2.840.10008.1.2.4.50": "pillow, pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.51": "pillow, pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.57": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.70": "pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.80": "pyjpegls, pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pyjpegls, pylibjpeg + pylibjpeg-libjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.90": "pillow (with OpenJPEG), pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.91": "pillow (with OpenJPEG), pylibjpeg + pylibjpeg-openjpeg, or python-gdcm",
    "1.2.840.10008.1.2.4.201": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.202": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg + pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.5": "pydicom (built in) or pylibjpeg + pylibjpeg-rle",
}


# -- windowing (DICOM PS3.3 C.11.2.1.2), output in [0, 1] ---------------------------------------------------------
def window_linear(x: np.ndarray, center: float, width: float, *, exact: bool = False) -> np.ndarray:
    """DICOM LINEAR (or LINEAR_EXACT) VOI window mapped to [0, 1].

        >>> window_linear(np.array([0., 50., 100.]), 50, 101)   # → [0.005, 0.5, 0.995] (LINEAR's half-pixel shift)
    """
    x = np.asarray(x, dtype=np.float32)
    if exact:
        width = max(float(width), 1e-6)
        y = (x - np.float32(center)) / np.float32(width) + np.float32(0.5)
    else:
        width = max(float(width), 1.0)
        if width == 1.0:  # degenerate window: a threshold at center - 0.5
            return (x > np.float32(center - 0.5)).astype(np.float32)
        y = (x - np.float32(center - 0.5)) / np.float32(width - 1.0) + np.float32(0.5)
    return np.clip(y, 0.0, 1.0, out=y)


def window_sigmoid(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM SIGMOID VOI function mapped to [0, 1]: 1 / (1 + exp(-4 (x - c) / w)).

        >>> window_sigmoid(np.array([50.]), 50, 100)              # → [0.5]
    """
    x = np.asarray(x, dtype=np.float32)
    width = max(float(width), 1e-6)
    z = np.float32(-4.0 / width) * (x - np.float32(center))
    np.clip(z, -80.0, 80.0, out=z)  # exp overflow guard; the result is 0 or 1 there anyway
    return (1.0 / (1.0 + np.exp(z))).astype(np.float32)


@dataclass(frozen=True)
class VoiTransform:
    """A VOI transform read from the file: a window (LINEAR, LINEAR_EXACT, SIGMOID) or a VOI LUT table.

        >>> VoiTransform(kind="SIGMOID", center=50, width=100)(np.array([50.]))   # → [0.5]
    """

    kind: str  # "LINEAR", "LINEAR_EXACT", "SIGMOID" or "LUT"
    center: float = 0.0
    width: float = 1.0
    lut: np.ndarray | None = field(default=None, repr=False)  # (entry,) float32 in [0, 1] for kind "LUT"
    first: int = 0  # input value mapped to lut[0]

    def __call__(self, data: np.ndarray) -> np.ndarray:
        if self.kind == "LUT":
            idx = np.clip(np.rint(np.asarray(data, dtype=np.float64)) - self.first, 0, len(self.lut) - 1)
            return self.lut[idx.astype(np.intp)]
        if self.kind == "SIGMOID":
            return window_sigmoid(data, self.center, self.width)
        return window_linear(data, self.center, self.width, exact=self.kind == "LINEAR_EXACT")


@dataclass
class MedicalImage:
    """One grayscale image, oriented chest wall left. `data` is float32 (y, x) after the modality LUT.

        >>> img = read_image("1-132.dcm"); img.flipped, img.to_source_xy(0, 10)   # (True, (2863, 10))
    """

    id: str  # stable pseudonym, never a patient identifier
    path: Path
    data: np.ndarray = field(repr=False)  # float32 (y, x), modality values, oriented
    flipped: bool  # True when the source was mirrored left↔right to put the chest wall on the left
    laterality: str = ""  # "L", "R" or "" (unknown)
    view: str = ""  # "CC", "MLO", … or ""
    modality: str = ""
    window: tuple[float, float] | None = None  # (center, width) from the file, None → robust percentiles
    invert: bool = False  # MONOCHROME1 or Presentation LUT Shape INVERSE: invert after windowing
    voi: VoiTransform | None = field(default=None, repr=False)  # the file's VOI transform, when it has one
    format: str = ""  # "dicom", "png" or "tiff"
    orientation_source: str = ""  # what decided `flipped`: "patient_orientation", "tissue", "laterality", "none"
    bits_stored: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape  # (y, x)

    def auto_window(self) -> tuple[float, float]:
        """(center, width) from robust percentiles of the tissue, for files without a VOI window."""
        return robust_window(self.data)

    def windowed(self, *, window: tuple[float, float] | None = None) -> np.ndarray:
        """Full-resolution float32 (y, x) in [0, 1] after the VOI transform and the MONOCHROME1 inversion."""
        if window is not None:
            out = window_linear(self.data, *window)
        elif self.voi is not None:
            out = self.voi(self.data)
        else:
            out = window_linear(self.data, *self.auto_window())
        out = np.asarray(out, dtype=np.float32)
        if self.invert:  # after windowing: the window's center/width are in stored-value space
            out = np.float32(1.0) - out
        return out

    def display(self, *, scale: float = 1.0, window: tuple[float, float] | None = None) -> np.ndarray:
        """Windowed float32 (y, x) in [0, 1] (bright = dense), resized by `scale` (area averaging).

        `window=(center, width)` overrides the file's VOI transform with a LINEAR window.
        """
        if not (0 < scale <= 1.0):
            raise ValueError(f"scale={scale!r}: expected 0 < scale <= 1 (display only shrinks)")
        out = self.windowed(window=window)
        if scale < 1.0:
            out = downsample_area(out, scale)
        return out

    def display_shape(self, scale: float) -> tuple[int, int]:
        """Shape (y, x) that `display(scale=scale)` returns."""
        return _scaled_shape(self.data.shape, scale)

    def to_source_xy(self, x: float, y: float) -> tuple[float, float]:
        """Oriented (x, y) → (x, y) in the file's own pixel grid."""
        return ((self.data.shape[1] - 1 - x) if self.flipped else x, y)

    def from_source_xy(self, x: float, y: float) -> tuple[float, float]:
        """(x, y) in the file's own pixel grid → oriented (x, y); the inverse of `to_source_xy`."""
        return self.to_source_xy(x, y)  # a mirror is its own inverse


def pseudonym(*parts: str, salt: str = "conceptlens") -> str:
    """Stable pseudonymous id from identifying strings (never reversible, never shown elsewhere).

        >>> pseudonym("dicom", "1.2.3.4")   # 'img-' + 12 hex digits, same on every machine
    """
    h = hashlib.sha256(("\x1f".join([salt, *parts])).encode("utf-8")).hexdigest()
    return f"img-{h[:12]}"


# -- resampling and automatic window --------------------------------------------------------------------------------
def _scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    return (max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale))))


def downsample_area(img: np.ndarray, scale: float) -> np.ndarray:
    """Area-average float32 (y, x) down by `scale` (0 < scale <= 1); pillow's BOX filter on 32-bit float."""
    from PIL import Image

    h, w = _scaled_shape(img.shape, scale)
    if (h, w) == img.shape:
        return img.astype(np.float32, copy=True)
    pil = Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
    out = np.asarray(pil.resize((w, h), resample=Image.Resampling.BOX), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def robust_window(data: np.ndarray) -> tuple[float, float]:
    """(center, width) covering the tissue: from the background level to a high percentile of what is above it.

    Mammograms are mostly background (near the minimum) with a few saturated film labels; percentiles of the whole
    image would be dominated by the background, so the upper bound comes from pixels above the background level.
    """
    step = max(1, int(math.sqrt(data.size / 1_000_000)))  # ≈1 Mpx sample: exact enough, fast
    sample = data[::step, ::step].ravel()
    lo = float(np.percentile(sample, 1.0))
    fg = sample[sample > lo + 0.02 * (float(sample.max()) - lo)]
    hi = float(np.percentile(fg, 99.5)) if fg.size >= 100 else float(sample.max())
    if not hi > lo:
        hi = lo + 1.0
    return (lo + hi) / 2.0 + 0.5, hi - lo + 1.0  # LINEAR: maps lo → 0 and hi → 1


# -- reading ------------------------------------------------------------------------------------------------------
def read_image(
    path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    salt: str = "conceptlens",
    allow_modalities: tuple[str, ...] | None = DEFAULT_MODALITIES,
    orient: bool = True,
) -> MedicalImage:
    """Read a DICOM, PNG or TIFF file. Raises ImageError (naming the file and reason) for anything unusable.

        >>> img = read_image("scan.dcm", max_pixels=20_000_000, allow_modalities=("MG", "DX"))

    `allow_modalities=None` accepts any DICOM modality. `orient=False` keeps the file's own left↔right order.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise ImageError(path, f"cannot open file ({type(e).__name__}: {e.strerror or 'unreadable'})") from None
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise ImageError(path, f"cannot read file ({type(e).__name__}: {e.strerror or 'unreadable'})") from None
    try:
        if head.startswith(_PNG_MAGIC):
            img, row_direction = _read_pillow(path, "png", max_pixels=max_pixels, salt=salt), ""
        elif head[:4] in _TIFF_MAGICS:
            img, row_direction = _read_pillow(path, "tiff", max_pixels=max_pixels, salt=salt), ""
        elif len(head) == 132 and head[128:132] == b"DICM":
            img, row_direction = _read_dicom(
                path, size, max_pixels=max_pixels, salt=salt, allow_modalities=allow_modalities
            )
        elif len(head) < 132 and head[:1] == b"\x00":
            raise ImageError(path, f"truncated or not an image: only {size} bytes, no DICOM preamble")
        else:
            raise ImageError(
                path, "not a DICOM, PNG or TIFF file (no 'DICM' marker at byte 128, no PNG or TIFF signature)"
            )
        if orient:
            _orient(img, row_direction)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError(path, "reading the image needs more memory than is available") from None
    except Exception as e:  # noqa: BLE001 — the promise is "an image or an ImageError", whatever the bytes are
        raise ImageError(path, f"malformed image file ({_safe_reason(e)})") from None
    return img


# -- DICOM --------------------------------------------------------------------------------------------------------
_QUOTED = re.compile(r"('[^']*'|\"[^\"]*\"|b'[^']*')")


def _safe_reason(exc: BaseException, known_values: set[str] = frozenset()) -> str:
    """An exception as '<Type>: <message>' with anything that could be read from the file removed.

    Parsers quote offending values in their messages ("Invalid value 'DOE^JOHN'…"); quoted text and every string
    value known from the header are replaced, and the message is cut short.
    """
    msg = str(exc)
    for v in sorted(known_values, key=len, reverse=True):
        if len(v) >= 3:
            msg = msg.replace(v, "<value>")
    msg = _QUOTED.sub("<value>", msg)
    msg = re.sub(r"[^\x20-\x7e]", "?", msg)[:160]
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _header_strings(ds) -> set[str]:
    """Every text run in a dataset's values (sequences and private tags included), to scrub from messages.

    Raw values are read as bytes and never converted: pydicom's conversion validates values and logs the invalid
    ones verbatim (a patient name in a date field would reach the log).
    """
    out: set[str] = set()

    def add(raw: bytes) -> None:
        for run in re.findall(rb"[\x20-\x7e]{3,}", raw[:4096]):
            s = run.decode("ascii").strip()
            if len(s) >= 3:
                out.add(s)
                out.update(p for p in re.split(r"[\^=\\ ]", s) if len(p) >= 3)

    def walk(d, depth=0):
        if depth > 8:
            return
        for tag in list(d.keys()):
            try:
                elem = d.get_item(tag, keep_deferred=True)
                value = getattr(elem, "value", None)
                if value is None:
                    continue
                if isinstance(value, (bytes, bytearray)):  # raw (unconverted) value
                    add(bytes(value))
                elif getattr(elem, "VR", "") == "SQ":
                    for item in value:
                        walk(item, depth + 1)
                elif isinstance(value, str):
                    add(value.encode("latin-1", "replace"))
                elif isinstance(value, (list, tuple)) or hasattr(value, "__iter__"):
                    for v in value:
                        add(str(v).encode("latin-1", "replace"))
            except Exception:  # noqa: BLE001 — a value we cannot read is a value we cannot leak
                continue

    try:
        walk(ds)
    except Exception:  # noqa: BLE001
        pass
    return out


_MODALITIES = frozenset(
    "AR AU BDUS BI BMD CR CT DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS MG MR NM OAM OCT OP "
    "OPM OPT OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTPLAN RTRECORD RTSTRUCT RWV SEG SM SMR SR SRF "
    "STAIN TG US VA XA XC".split()
)
_PHOTOMETRICS = frozenset(
    ["MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422",
     "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"]
)  # fmt: skip


def _shown(value: str, known: frozenset[str]) -> str:
    """A header value fit for an error message: defined terms as they are, anything else withheld."""
    if not value:
        return "(missing)"
    return value if value in known else "(unrecognised value)"


def _int(ds, name: str, default: int | None = None) -> int | None:
    """An integer attribute (US/IS); `default` when absent, None when unreadable."""
    try:
        v = ds.get(name, None)
    except Exception:  # noqa: BLE001 — a malformed value is as good as none
        return None
    if v is None or v == "":
        return default
    try:
        if not isinstance(v, (str, bytes, int)) and hasattr(v, "__getitem__"):
            v = v[0]
        return int(v)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _text(ds, name: str) -> str:
    """A text attribute, upper-cased, multiple values joined by '\\', read from the raw bytes when still raw.

    Reading the raw bytes skips pydicom's value conversion, which validates values and logs invalid ones verbatim:
    a hostile file could put a patient's name in any field.
    """
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(name)
    if tag is None or tag not in ds:
        return ""
    try:
        v = ds.get_item(tag, keep_deferred=True).value
    except Exception:  # noqa: BLE001
        return ""
    if v is None:
        return ""
    if isinstance(v, (bytes, bytearray)):
        v = bytes(v[:1024]).decode("latin-1").strip("\x00 ")
    elif not isinstance(v, str) and hasattr(v, "__iter__"):
        v = "\\".join(str(x) for x in v)
    return "\\".join(part.strip(" \x00") for part in str(v).split("\\")).strip().upper()


def _floats(ds, name: str) -> list[float]:
    """A DS attribute's values as finite floats (from the raw text); [] when absent or malformed."""
    text = _text(ds, name)
    if not text:
        return []
    out = []
    for x in text.split("\\"):
        try:
            f = float(x)
        except ValueError:
            return []
        if not math.isfinite(f):
            return []
        out.append(f)
    return out


def _read_dicom(path: Path, size: int, *, max_pixels: int, salt: str, allow_modalities) -> tuple[MedicalImage, str]:
    """(image, PatientOrientation row direction) of a DICOM file, after header checks in two passes."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    # Pass 1: the header only, pixel data untouched — refuses pixel bombs before anything large is read.
    try:
        with warnings.catch_warnings(record=True) as caught:  # pydicom's warnings quote values: kept in here
            warnings.simplefilter("always")
            hdr = pydicom.dcmread(path, stop_before_pixels=True, defer_size=_DEFER_BYTES)
    except InvalidDicomError as e:
        raise ImageError(path, f"not a valid DICOM file ({_safe_reason(e)})") from None
    except MemoryError:
        raise ImageError(path, "DICOM header needs too much memory") from None
    except Exception as e:  # noqa: BLE001 — any parser failure on a hostile file is an ImageError
        raise ImageError(path, f"corrupt or truncated DICOM header ({_safe_reason(e)})") from None
    known = _header_strings(hdr)

    def fail(reason: str, exc_type=ImageError):
        return exc_type(path, reason)

    tsyntax = str(getattr(getattr(hdr, "file_meta", None), "get", lambda *_: None)("TransferSyntaxUID", "") or "")
    if not tsyntax:
        raise fail("DICOM file meta has no Transfer Syntax UID")
    rows, cols = _int(hdr, "Rows"), _int(hdr, "Columns")
    frames = _int(hdr, "NumberOfFrames", 1)
    spp = _int(hdr, "SamplesPerPixel", 1)
    bits_alloc, bits_stored = _int(hdr, "BitsAllocated"), _int(hdr, "BitsStored")
    if not rows or not cols:
        raise fail("Rows/Columns missing or zero (a truncated header, or not an image)")
    if frames is None or frames < 1 or spp is None or spp < 1:
        raise fail("invalid NumberOfFrames or SamplesPerPixel")
    declared = rows * cols * frames * spp
    if declared > max_pixels:
        raise fail(
            f"declared image {rows}×{cols}×{frames} frame(s)×{spp} sample(s) = {declared} pixels exceeds the "
            f"pixel budget of {max_pixels}",
            PixelBudgetError,
        )
    if frames != 1:
        raise fail(f"multi-frame image ({frames} frames): only single-frame mammograms are supported")
    if spp != 1:
        raise fail(f"{spp} samples per pixel: only grayscale (1 sample) images are supported")
    if bits_alloc not in (8, 16, 32) or not bits_stored or bits_stored > bits_alloc:
        raise fail(f"unsupported BitsAllocated={bits_alloc} / BitsStored={bits_stored}")
    photometric = _text(hdr, "PhotometricInterpretation")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise fail(f"photometric interpretation {_shown(photometric, _PHOTOMETRICS)} is not MONOCHROME1/2")
    modality = _text(hdr, "Modality")
    if allow_modalities is not None and modality not in allow_modalities:
        raise fail(
            f"modality {_shown(modality, _MODALITIES)} is not a mammogram (allowed: {', '.join(allow_modalities)}); "
            "pass allow_modalities= to read it anyway"
        )
    if size > declared * (bits_alloc // 8) + _HEADER_SLACK_BYTES:
        raise fail(f"file is {size} bytes, far more than its declared {rows}×{cols} image needs", PixelBudgetError)

    # Pass 2: the whole dataset with large values deferred, to check the pixel data element before decoding it.
    try:
        with warnings.catch_warnings(record=True) as more:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
            raw = ds.get_item(0x7FE00010, keep_deferred=True) if 0x7FE00010 in ds else None
        caught.extend(more)
    except Exception as e:  # noqa: BLE001
        raise fail(f"corrupt or truncated DICOM ({_safe_reason(e, known)})") from None
    if raw is None:
        if any(t in ds for t in (0x7FE00008, 0x7FE00009)):
            raise fail("float pixel data (FloatPixelData) is not supported")
        if _contains(path, b"\xe0\x7f\x10\x00"):  # the tag is there but the parser could not finish it
            raise fail("pixel data element (7FE0,0010) is truncated or corrupt")
        raise fail("DICOM file has no pixel data (7FE0,0010)")
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    undefined = length == 0xFFFFFFFF
    if length is not None and not undefined and tell is not None and tell + length > size:
        raise fail(f"pixel data claims {length} bytes but the file ends {size - tell} bytes after its start")
    from pydicom.uid import UID

    uid = UID(tsyntax)
    try:
        encapsulated = uid.is_encapsulated
        known_syntax = uid.is_transfer_syntax
    except Exception:  # noqa: BLE001 — pydicom raises on UIDs it does not know
        encapsulated, known_syntax = True, False
    if not re.fullmatch(r"[0-9.]{1,64}", tsyntax):
        raise fail("transfer syntax UID is malformed (not digits and dots)")
    syntax_name = uid.name if uid.name != str(uid) else str(uid)
    if not known_syntax:
        raise fail(f"unknown transfer syntax {tsyntax}: no decoder exists for it", MissingDecoderError)
    if not encapsulated:
        if length is not None and not undefined:
            expected = rows * cols * frames * spp * (bits_alloc // 8)
            if length < expected or length > expected + 1:
                raise fail(
                    f"pixel data is {length} bytes but the header declares {rows}×{cols} × {bits_alloc} bit = "
                    f"{expected} bytes"
                )
    else:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            decoder = get_decoder(uid)
        except Exception:  # noqa: BLE001 — pydicom has no decoder class at all for this syntax
            decoder = None
        if decoder is None or not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies) if decoder is not None else ""
            packages = _DECODER_PACKAGES.get(str(uid), "no known Python package")
            raise fail(
                f"missing decoder for transfer syntax {syntax_name} ({tsyntax}): install {packages}"
                + (f" [pydicom: {missing}]" if missing else ""),
                MissingDecoderError,
            )

    # Decode. Any decoder failure (corrupt RLE segments, bad JPEG stream) is refused, never shown as garbage.
    try:
        with warnings.catch_warnings(record=True) as more:
            warnings.simplefilter("always")
            arr = ds.pixel_array
        caught.extend(more)
    except MemoryError:
        raise fail("decoding the pixel data needs too much memory") from None
    except Exception as e:  # noqa: BLE001
        raise fail(f"cannot decode pixel data ({syntax_name}: {_safe_reason(e, known)})") from None
    if arr.shape != (rows, cols):
        raise fail(f"decoded pixel data has shape {arr.shape}, header declares ({rows}, {cols})")

    data, slope_ok = _modality_lut(ds, arr)
    if not slope_ok:
        raise fail("invalid modality LUT (RescaleSlope/RescaleIntercept or ModalityLUTSequence)")
    voi = _voi(ds)
    # MONOCHROME1 is displayed inverted; for MONOCHROME1 files INVERSE is the standard's way of saying the same thing
    # (PS3.3 C.8.11.6: MG "for presentation" uses INVERSE with MONOCHROME1), so the two never cancel out.
    invert = photometric == "MONOCHROME1" or _text(ds, "PresentationLUTShape") == "INVERSE"
    laterality = _text(ds, "ImageLaterality") or _text(ds, "Laterality")
    laterality = laterality if laterality in ("L", "R") else ""
    view = _view(ds)
    sop = _text(ds, "SOPInstanceUID") or _text(getattr(ds, "file_meta", None) or {}, "MediaStorageSOPInstanceUID")
    if sop:
        pid = pseudonym("dicom", sop, _text(ds, "StudyInstanceUID"), salt=salt)
    else:  # no UID to anchor on: the file's own bytes
        pid = pseudonym("file", _sha256_file(path), salt=salt)
    img = MedicalImage(
        id=pid,
        path=path,
        data=data,
        flipped=False,
        laterality=laterality,
        view=view,
        modality=modality,
        window=(voi.center, voi.width) if voi is not None and voi.kind != "LUT" else None,
        invert=invert,
        voi=voi,
        format="dicom",
        bits_stored=int(bits_stored),
    )
    orientation = _text(ds, "PatientOrientation")
    row_direction = orientation.split("\\")[0] if "\\" in orientation else ""
    log.debug("read %s: %s %dx%d %s (%d parser warnings withheld)", path, syntax_name, rows, cols, img.id, len(caught))
    return img, row_direction


def _contains(path: Path, needle: bytes) -> bool:
    """Whether the file's bytes contain `needle` (memory-mapped: no copy of the file)."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(needle) >= 0
    except (OSError, ValueError):
        return False


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _view(ds) -> str:
    """CC / MLO / … from ViewPosition, else from PatientOrientation when a file (like CBIS-DDSM) puts it there."""
    known = ("CC", "MLO", "ML", "LM", "XCC", "XCCL", "XCCM", "FB", "SIO", "LMO", "AT", "CV")
    for name in ("ViewPosition", "PatientOrientation"):
        v = _text(ds, name)
        if v in known:
            return v
    try:
        seq = ds.get("ViewCodeSequence", None)
        meaning = _text(seq[0], "CodeMeaning").lower() if seq else ""
    except Exception:  # noqa: BLE001
        meaning = ""
    if "medio-lateral oblique" in meaning:
        return "MLO"
    if "cranio-caudal" in meaning:
        return "CC"
    return ""


def _modality_lut(ds, arr: np.ndarray) -> tuple[np.ndarray, bool]:
    """Stored values → modality values as float32 (y, x): Modality LUT Sequence or rescale slope/intercept."""
    seq = ds.get("ModalityLUTSequence", None)
    if seq:
        try:
            item = seq[0]
            desc = [int(v) for v in item.LUTDescriptor]
            n = desc[0] or 65536
            first = desc[1]
            raw = item.LUTData
            lut = np.frombuffer(raw[: len(raw) // 2 * 2] if isinstance(raw, bytes) else b"", dtype="<u2")
            if lut.size == 0:
                lut = np.asarray(item.LUTData, dtype=np.float32)
            lut = lut[:n].astype(np.float32)
            if lut.size == 0:
                return arr.astype(np.float32), False
            idx = np.clip(arr.astype(np.int64) - first, 0, lut.size - 1)
            return lut[idx], True
        except Exception:  # noqa: BLE001
            return arr.astype(np.float32), False
    slope = _floats(ds, "RescaleSlope") or [1.0]
    intercept = _floats(ds, "RescaleIntercept") or [0.0]
    if slope[0] == 0:
        return arr.astype(np.float32), False
    data = arr.astype(np.float32)
    if slope[0] != 1.0 or intercept[0] != 0.0:
        data *= np.float32(slope[0])
        data += np.float32(intercept[0])
    return data, True


def _voi(ds) -> VoiTransform | None:
    """The file's first VOI transform: a VOI LUT Sequence table, else the first window (LINEAR/…/SIGMOID)."""
    seq = ds.get("VOILUTSequence", None)
    if seq:
        try:
            item = seq[0]
            desc = [int(v) for v in item.LUTDescriptor]
            n, first, bits = (desc[0] or 65536), desc[1], desc[2]
            raw = item.LUTData
            if isinstance(raw, bytes):  # OW: one 16-bit word per entry whatever the entry's bit depth
                lut = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<u2")
            else:
                lut = np.asarray(raw if isinstance(raw, (list, tuple)) else [raw])
            lut = lut[:n].astype(np.float32)
            if lut.size and 1 <= bits <= 16:
                lut = np.clip(lut / np.float32(2**bits - 1), 0.0, 1.0)
                return VoiTransform(kind="LUT", lut=lut, first=first)
        except Exception:  # noqa: BLE001 — a malformed LUT falls back to the window or percentiles
            pass
    centers = _floats(ds, "WindowCenter")
    widths = _floats(ds, "WindowWidth")
    if centers and widths and widths[0] > 0:
        func = _text(ds, "VOILUTFunction") or "LINEAR"
        if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            func = "LINEAR"
        return VoiTransform(kind=func, center=centers[0], width=widths[0])
    return None


# -- PNG and TIFF -------------------------------------------------------------------------------------------------
def _read_pillow(path: Path, fmt: str, *, max_pixels: int, salt: str) -> MedicalImage:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own budget decides below
            im = Image.open(path)  # lazy: reads the header only
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise PixelBudgetError(
                    path, f"declared image {h}×{w} = {w * h} pixels exceeds the pixel budget of {max_pixels}"
                )
            frames = getattr(im, "n_frames", 1)
            if frames != 1:
                raise ImageError(path, f"multi-frame {fmt.upper()} ({frames} frames) is not supported")
            mode = im.mode
            im.load()
            if mode in ("L", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                arr = np.array(im)
            elif mode in ("1", "P", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "PA", "La"):
                arr = np.array(im.convert("L"))
                mode = "L"
            else:
                raise ImageError(path, f"unsupported {fmt.upper()} pixel mode {mode}")
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise PixelBudgetError(path, "declared image size exceeds the pixel budget (pillow's bomb limit)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError) as e:
        raise ImageError(path, f"unreadable {fmt.upper()} ({_safe_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 — pillow plugins raise many types on hostile input
        raise ImageError(path, f"unreadable {fmt.upper()} ({_safe_reason(e)})") from None
    if arr.ndim != 2 or arr.shape != (h, w):
        raise ImageError(path, f"decoded {fmt.upper()} has shape {arr.shape}, header declares ({h}, {w})")
    bits = {"L": 8, "F": 32}.get(mode, 16)
    if mode == "I" and arr.size and int(arr.max()) > 65535:
        bits = 32
    data = arr.astype(np.float32)
    # 8-bit files are already display-ready: the identity window x/255. Deeper files get robust percentiles.
    voi = VoiTransform(kind="LINEAR", center=128.0, width=256.0) if bits == 8 else None
    return MedicalImage(
        id=pseudonym("file", _sha256_file(path), salt=salt),
        path=path,
        data=data,
        flipped=False,
        modality="",
        window=(128.0, 256.0) if voi is not None else None,
        invert=False,
        voi=voi,
        format=fmt,
        bits_stored=bits,
    )


# -- orientation --------------------------------------------------------------------------------------------------
def tissue_side(data: np.ndarray) -> tuple[str, float]:
    """Which vertical edge the breast sits against: ('L' | 'R', evidence in [0, 1]) from an Otsu threshold.

    The chest wall side has tissue along most of its height; the other edge is background plus, at most, a label.
    """
    step = max(1, int(math.sqrt(data.size / 250_000)))
    small = data[::step, ::step]
    t = otsu_threshold(small)
    fg = small > t
    band = max(2, fg.shape[1] // 20)
    left, right = float(fg[:, :band].mean()), float(fg[:, -band:].mean())
    return ("L" if left >= right else "R"), abs(left - right)


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of an array's values (between-class variance maximised over a histogram)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def _orient(img: MedicalImage, row_direction: str = "") -> None:
    """Mirror `img` in place so the chest wall is on the left; record why in `orientation_source`.

    Order of evidence: PatientOrientation's row direction when it is a real direction (A: rows run toward the
    nipple, so the chest wall is already left; P: mirrored); then the tissue itself when it is decisive; then the
    laterality convention of screen-film archives such as CBIS-DDSM (R breasts stored chest wall right).
    """
    flip, source = None, "none"
    if row_direction[:1] in ("A", "P"):
        flip, source = row_direction.startswith("P"), "patient_orientation"
    else:
        side, evidence = tissue_side(img.data)
        if evidence >= 0.15:
            flip, source = side == "R", "tissue"
        elif img.laterality in ("L", "R"):
            flip, source = img.laterality == "R", "laterality"
    if flip:
        img.data = np.ascontiguousarray(img.data[:, ::-1])
        img.flipped = True
    img.orientation_source = source
