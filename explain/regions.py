"""Drawn regions → validated boolean masks in patch coordinates.

    >>> from explain.regions import rasterize_polygon, rasterize_regions, Polygon, Rect, parse_plotly_shapes
    >>> mask = rasterize_polygon([(10, 10), (60, 12), (40, 50)], (128, 128))     # bool (y, x)
    >>> specs = [Rect(0, 0, 64, 64), Polygon([(8, 8), (30, 8), (20, 30)], erase=True)]
    >>> mask = rasterize_regions(specs, (128, 128))                               # rect minus the triangle
    >>> view = DisplayView.for_image((128, 128), (256, 256))                      # shown at 2× zoom
    >>> specs = parse_plotly_shapes(relayout["shapes"], view=view)                # drawn shapes → patch specs

Conventions (one place, used by every caller):

- Patch coordinates: x to the right, y down, in patch pixels. Pixel (row i, column j) is the unit square
  [j, j+1) × [i, i+1); it belongs to a region when its centre (j + 0.5, i + 0.5) lies inside.
  Edges are half-open (a centre exactly on a left/top edge is in, on a right/bottom edge is out), so two regions
  that share an edge never share a pixel and a region's translation by whole pixels moves its mask exactly.
- Fill rule: even-odd. It is plotly's default `fillrule` for drawn shapes, so the mask is what the reviewer saw
  filled on screen: a self-intersecting path (a bow tie, a loop drawn twice) fills the parts covered an odd number
  of times.
- A region is a list of specs applied in order: each spec adds its pixels, or removes them when `erase=True`.
- Display coordinates are the data coordinates of the figure the reviewer draws on; `DisplayView` maps them to
  patch coordinates with the patch's outer edges at a box in display coordinates (plotly's `imshow` puts pixel
  centres at integers, so an image of width w has its edges at -0.5 and w - 0.5: `DisplayView.for_image`).

Bad input (RELIABILITY.md #6) raises `RegionError` naming the value: fewer than 3 distinct points, NaN or infinite
coordinates, coordinates beyond ±`max_abs_coordinate`, more than `max_vertices` vertices (checked before any array
is built), unsupported path syntax, shapes without area (lines), masks of the wrong size, and regions that cover no
pixel of the image. Coordinates outside the image are clipped exactly (Sutherland–Hodgman against a box one pixel
larger than the image), so a polygon that leaves the image keeps the part inside. Time and memory are bounded:
crossings are generated in blocks of edges, O(vertices × rows) time and O(image) memory.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .errors import RegionError

__all__ = [
    "RegionConfig",
    "Polygon",
    "Rect",
    "Ellipse",
    "MaskRegion",
    "RegionSpec",
    "DisplayView",
    "rasterize_polygon",
    "rasterize_regions",
    "shoelace_area",
    "parse_svg_path",
    "parse_plotly_shape",
    "parse_plotly_shapes",
    "apply_relayout",
    "regions_to_json",
    "regions_from_json",
]


@dataclass(frozen=True)
class RegionConfig:
    """Limits on drawn input. The defaults accept anything a person can draw and refuse what only a bug or an
    attacker sends."""

    max_vertices: int = 10_000  # per region list, all polygons together
    max_abs_coordinate: float = 1e9  # beyond this a coordinate is refused rather than clipped (float overflow)
    crossing_block: int = 1 << 20  # row crossings computed per block: bounds the working memory (~50 MB)


DEFAULT_CONFIG = RegionConfig()


# -- region specs ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Polygon:
    """A closed polygon (the last point joins the first). `points` are (x, y) pairs in patch coordinates."""

    points: tuple[tuple[float, float], ...]
    erase: bool = False

    def __init__(self, points: Iterable[Sequence[float]], erase: bool = False):
        object.__setattr__(self, "points", tuple((p[0], p[1]) for p in points))
        object.__setattr__(self, "erase", bool(erase))

    def to_json(self) -> dict:
        return {"type": "polygon", "points": [[float(x), float(y)] for x, y in self.points], "erase": self.erase}


@dataclass(frozen=True)
class _Box:
    """Corners (x0, y0) and (x1, y1) of an axis-aligned box, in any order; `kind` names the shape in JSON."""

    x0: float
    y0: float
    x1: float
    y1: float
    erase: bool = False
    kind: ClassVar[str] = ""

    def to_json(self) -> dict:
        return {"type": self.kind, "x0": float(self.x0), "y0": float(self.y0), "x1": float(self.x1),
                "y1": float(self.y1), "erase": self.erase}


class Rect(_Box):
    """An axis-aligned rectangle between corners (x0, y0) and (x1, y1), in any order."""

    kind: ClassVar[str] = "rect"


class Ellipse(_Box):
    """The axis-aligned ellipse inscribed in the box (x0, y0)–(x1, y1) — plotly's "circle" shape."""

    kind: ClassVar[str] = "ellipse"


@dataclass(frozen=True)
class MaskRegion:
    """A region given as a mask (e.g. a ground-truth mask), stored as a row-major run-length code.

    `counts` alternate runs of False and True pixels, starting with False (the first run may be 0).
    """

    shape: tuple[int, int]
    counts: tuple[int, ...] = field(repr=False)
    erase: bool = False

    @classmethod
    def from_mask(cls, mask: np.ndarray, *, erase: bool = False) -> "MaskRegion":
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2:
            raise RegionError(f"a region mask must be 2-D (y, x); got shape {mask.shape}")
        flat = mask.ravel()
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        bounds = np.concatenate([[0], change, [flat.size]])
        runs = np.diff(bounds).tolist()
        if flat.size and flat[0]:
            runs = [0] + runs
        return cls(shape=(int(mask.shape[0]), int(mask.shape[1])), counts=tuple(int(r) for r in runs), erase=erase)

    def to_mask(self) -> np.ndarray:
        h, w = self.shape
        counts = np.asarray(self.counts, dtype=np.int64)
        if counts.size and (counts.min() < 0 or counts.sum() != h * w):
            raise RegionError(f"mask run lengths sum to {int(counts.sum())}, expected {h}×{w} = {h * w}")
        values = np.arange(counts.size) % 2 == 1
        return np.repeat(values, counts).reshape(h, w) if counts.size else np.zeros((h, w), bool)

    def to_json(self) -> dict:
        return {"type": "mask", "shape": list(self.shape), "counts": list(self.counts), "erase": self.erase}


RegionSpec = Polygon | Rect | Ellipse | MaskRegion


# -- display ↔ patch ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DisplayView:
    """Maps display (figure data) coordinates to patch coordinates and back — an axis-aligned affine map.

        >>> v = DisplayView.for_image((512, 512), (256, 256))       # a 512-px patch shown as a 256-px image
        >>> v.to_patch([(-0.5, -0.5)])                               # the display image's corner → patch (0, 0)

    `box` = (x0, y0, x1, y1): where the patch's outer edges lie in display coordinates; `patch_shape` = (H, W).
    For a patch cut from a larger displayed mammogram, `box` is the patch's box on that mammogram.
    """

    patch_shape: tuple[int, int]
    box: tuple[float, float, float, float]

    def __post_init__(self):
        h, w = self.patch_shape
        x0, y0, x1, y1 = self.box
        if h <= 0 or w <= 0:
            raise RegionError(f"patch shape must be positive, got {self.patch_shape}")
        if not all(math.isfinite(v) for v in self.box) or x1 == x0 or y1 == y0:
            raise RegionError(f"display box {self.box} is degenerate or not finite")

    @classmethod
    def for_image(cls, patch_shape: tuple[int, int], display_shape: tuple[int, int]) -> "DisplayView":
        """The patch shown as an image of `display_shape` (rows, cols) with pixel centres at integers (imshow)."""
        dh, dw = display_shape
        return cls(patch_shape=(int(patch_shape[0]), int(patch_shape[1])), box=(-0.5, -0.5, dw - 0.5, dh - 0.5))

    @property
    def scale(self) -> tuple[float, float]:
        """Patch pixels per display unit along x and y."""
        h, w = self.patch_shape
        x0, y0, x1, y1 = self.box
        return w / (x1 - x0), h / (y1 - y0)

    def to_patch(self, points) -> np.ndarray:
        """(n, 2) display (x, y) → float64 (n, 2) patch (x, y)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        sx, sy = self.scale
        return np.stack([(p[:, 0] - self.box[0]) * sx, (p[:, 1] - self.box[1]) * sy], axis=1)

    def to_display(self, points) -> np.ndarray:
        """(n, 2) patch (x, y) → float64 (n, 2) display (x, y)."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        sx, sy = self.scale
        return np.stack([p[:, 0] / sx + self.box[0], p[:, 1] / sy + self.box[1]], axis=1)


# -- validation --------------------------------------------------------------------------------------------------------
def _check_shape(shape) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise RegionError(f"image shape must be (rows, cols), got {shape!r}") from None
    if h <= 0 or w <= 0:
        raise RegionError(f"image shape must be positive, got {shape!r}")
    return h, w


def _as_points(points, *, config: RegionConfig, what: str = "polygon") -> np.ndarray:
    """Validate drawn points → float64 (n, 2) with consecutive duplicates (and the closing point) removed."""
    try:
        if isinstance(points, (str, bytes, Mapping)):
            raise TypeError
        n = len(points)
    except TypeError:
        raise RegionError(f"{what}: points must be a sequence of (x, y) pairs, got {type(points).__name__}") from None
    if n > config.max_vertices:  # before any conversion: a 10⁶-vertex path costs nothing to refuse
        raise RegionError(f"{what}: {n} vertices exceed the limit of {config.max_vertices}")
    try:
        p = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError):
        raise RegionError(f"{what}: points must be numeric (x, y) pairs") from None
    if p.ndim != 2 or p.shape[1] != 2:
        raise RegionError(f"{what}: points must have shape (n, 2), got {p.shape}")
    bad = ~np.isfinite(p).all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RegionError(f"{what}: vertex {i} is not finite ({float(p[i, 0])}, {float(p[i, 1])})")
    huge = (np.abs(p) > config.max_abs_coordinate).any(axis=1)
    if huge.any():
        i = int(np.flatnonzero(huge)[0])
        raise RegionError(f"{what}: vertex {i} ({p[i, 0]:g}, {p[i, 1]:g}) is beyond ±{config.max_abs_coordinate:g}")
    if len(p):
        keep = np.ones(len(p), bool)
        keep[1:] = (p[1:] != p[:-1]).any(axis=1)
        p = p[keep]
        if len(p) > 1 and (p[-1] == p[0]).all():
            p = p[:-1]
    if len(p) < 3:
        raise RegionError(f"{what}: needs at least 3 distinct points, got {len(p)}")
    return p


def shoelace_area(points) -> float:
    """Signed area of a closed polygon (positive when counter-clockwise in x-right, y-up axes)."""
    p = np.asarray(points, dtype=np.float64)
    x, y = p[:, 0], p[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


# -- rasterization -----------------------------------------------------------------------------------------------------
def _clip_halfplane(p: np.ndarray, lines: np.ndarray, axis: int, bound: float,
                    keep_below: bool) -> tuple[np.ndarray, np.ndarray]:
    """One Sutherland–Hodgman pass: keep the part of polygon p with p[:, axis] <= bound (or >= bound).

    Clipping against a half-plane keeps the even-odd fill exactly: inside the half-plane, a ray parallel to the
    boundary crosses the same edges before and after, and the new edges lie on the boundary itself.
    `lines` (vertex, 4) holds, for the edge leaving each vertex, the endpoints of the drawn edge it is part of
    (NaN for edges along the clip boundary): crossings are computed from the drawn edge, so clipping never moves a
    pixel inside the image by rounding.
    """
    if len(p) == 0:
        return p, lines
    q = np.roll(p, -1, axis=0)  # edge i goes p[i] → q[i]
    v_p, v_q = p[:, axis] - bound, q[:, axis] - bound
    if not keep_below:
        v_p, v_q = -v_p, -v_q
    in_p, in_q = v_p <= 0, v_q <= 0
    if in_p.all():
        return p, lines
    crossing = in_p != in_q
    t = np.where(crossing, v_p / np.where(crossing, v_p - v_q, 1.0), 0.0)
    inter = p + t[:, None] * (q - p)
    inter[:, axis] = np.where(crossing, bound, inter[:, axis])  # exact on the boundary
    # each edge emits its start point if inside, then the crossing point if it crosses; the edge leaving a crossing
    # point follows the drawn edge when coming in, the clip boundary when going out
    order = np.stack([in_p, crossing], axis=1)  # (edge, 2)
    points = np.stack([p, inter], axis=1)[order]
    boundary = np.full_like(lines, np.nan)
    leaving = np.stack([lines, np.where((crossing & ~in_p)[:, None], lines, boundary)], axis=1)[order]
    return points, leaving


def _clip_to_box(p: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    lines = np.concatenate([p, np.roll(p, -1, axis=0)], axis=1)  # (vertex, 4): x0, y0, x1, y1 of the drawn edge
    # one pixel of margin: nothing outside [-1, w+1] × [-1, h+1] can change a pixel centre's even-odd parity
    for axis, lo, hi in ((0, -1.0, w + 1.0), (1, -1.0, h + 1.0)):
        p, lines = _clip_halfplane(p, lines, axis, hi, keep_below=True)
        p, lines = _clip_halfplane(p, lines, axis, lo, keep_below=False)
        if len(p) < 3:
            return p[:0], lines[:0]
    own = np.isnan(lines[:, 0])  # clip-boundary edges: their own endpoints
    lines[own] = np.concatenate([p, np.roll(p, -1, axis=0)], axis=1)[own]
    return p, lines


def _accumulate_crossings(p: np.ndarray, lines: np.ndarray, h: int, w: int, toggles: np.ndarray,
                          block: int) -> None:
    """Add, for every edge crossing of a row's centre line, a toggle at the first pixel right of the crossing.

    toggles: int64 (h * (w + 1),), row-major (row, first pixel column ∈ 0…w). Parity of its running sum along a row
    is the even-odd inside test of each pixel centre. Rows come from the (clipped) edge p[i] → p[i+1]; the crossing's
    x from the drawn edge `lines[i]` it lies on.
    """
    q = np.roll(p, -1, axis=0)
    lo, hi = np.minimum(p[:, 1], q[:, 1]), np.maximum(p[:, 1], q[:, 1])
    # rows whose centre r + 0.5 lies in [lo, hi): half-open, so a shared vertex is counted once
    r0 = np.clip(np.ceil(lo - 0.5), 0, h).astype(np.int64)
    r1 = np.clip(np.ceil(hi - 0.5), 0, h).astype(np.int64)
    n = np.maximum(r1 - r0, 0)
    ends = np.cumsum(n)
    # blocks of whole edges with at most `block` crossings each (an edge has at most h crossings)
    first = 0
    while first < len(n):
        done = int(ends[first - 1]) if first else 0
        last = max(int(np.searchsorted(ends, done + block, side="right")), first + 1)
        sel = slice(first, last)
        first = last
        nb = n[sel]
        total = int(nb.sum())
        if total == 0:
            continue
        edge = np.repeat(np.arange(len(nb)), nb)
        start = np.cumsum(nb) - nb
        rows = r0[sel][edge] + (np.arange(total) - start[edge])
        ex0, ey0, ex1, ey1 = (lines[sel, k][edge] for k in range(4))
        xc = ex0 + (rows + 0.5 - ey0) * (ex1 - ex0) / (ey1 - ey0)
        col = np.clip(np.ceil(xc - 0.5), 0, w).astype(np.int64)
        toggles += np.bincount(rows * (w + 1) + col, minlength=h * (w + 1))


def _parity_mask(toggles: np.ndarray, h: int, w: int) -> np.ndarray:
    return (np.cumsum(toggles.reshape(h, w + 1), axis=1)[:, :w] % 2).astype(bool)


def _polygon_toggles(points: np.ndarray, h: int, w: int, config: RegionConfig, toggles: np.ndarray) -> None:
    clipped, lines = _clip_to_box(points, h, w)
    if len(clipped) >= 3:
        _accumulate_crossings(clipped, lines, h, w, toggles, config.crossing_block)


def rasterize_polygon(points, shape, *, config: RegionConfig = DEFAULT_CONFIG, allow_empty: bool = False) -> np.ndarray:
    """Pixels whose centres lie inside a closed polygon (even-odd rule) → bool (y, x) of `shape`.

        >>> rasterize_polygon([(0, 0), (4, 0), (4, 2), (0, 2)], (3, 5)).sum()   # 4 × 2 square
        8

    Raises RegionError for fewer than 3 distinct points, non-finite or absurd coordinates, too many vertices, and
    (unless allow_empty) a polygon that covers no pixel centre of the image.
    """
    h, w = _check_shape(shape)
    p = _as_points(points, config=config)
    toggles = np.zeros(h * (w + 1), np.int64)
    _polygon_toggles(p, h, w, config, toggles)
    mask = _parity_mask(toggles, h, w)
    if not allow_empty and not mask.any():
        raise RegionError(f"polygon with {len(p)} vertices covers no pixel of the {h}×{w} image "
                          f"(degenerate, too thin, or outside the image)")
    return mask


def _rasterize_ellipse(e: Ellipse, h: int, w: int, config: RegionConfig) -> np.ndarray:
    vals = np.array([e.x0, e.y0, e.x1, e.y1], dtype=np.float64)
    if not np.isfinite(vals).all():
        raise RegionError(f"ellipse box {tuple(vals)} is not finite")
    if (np.abs(vals) > config.max_abs_coordinate).any():
        raise RegionError(f"ellipse box {tuple(vals)} is beyond ±{config.max_abs_coordinate:g}")
    cx, cy = (e.x0 + e.x1) / 2, (e.y0 + e.y1) / 2
    rx, ry = abs(e.x1 - e.x0) / 2, abs(e.y1 - e.y0) / 2
    if rx == 0 or ry == 0:
        raise RegionError(f"ellipse box {tuple(vals)} has zero width or height")
    mask = np.zeros((h, w), bool)
    r0, r1 = max(0, math.floor(cy - ry - 1)), min(h, math.ceil(cy + ry + 1))
    c0, c1 = max(0, math.floor(cx - rx - 1)), min(w, math.ceil(cx + rx + 1))
    if r0 >= r1 or c0 >= c1:
        return mask
    yy = (np.arange(r0, r1) + 0.5 - cy) / ry
    xx = (np.arange(c0, c1) + 0.5 - cx) / rx
    mask[r0:r1, c0:c1] = yy[:, None] ** 2 + xx[None, :] ** 2 <= 1.0
    return mask


def _spec_mask(spec: RegionSpec, h: int, w: int, config: RegionConfig) -> np.ndarray:
    if isinstance(spec, Polygon):
        return rasterize_polygon(spec.points, (h, w), config=config, allow_empty=True)
    if isinstance(spec, Rect):
        pts = [(spec.x0, spec.y0), (spec.x1, spec.y0), (spec.x1, spec.y1), (spec.x0, spec.y1)]
        return rasterize_polygon(pts, (h, w), config=config, allow_empty=True)
    if isinstance(spec, Ellipse):
        return _rasterize_ellipse(spec, h, w, config)
    if isinstance(spec, MaskRegion):
        if tuple(spec.shape) != (h, w):
            raise RegionError(f"mask region of shape {tuple(spec.shape)} does not match the {h}×{w} image")
        return spec.to_mask()
    raise RegionError(f"unknown region spec {spec!r}")


def rasterize_regions(specs: Sequence[RegionSpec], shape, *, config: RegionConfig = DEFAULT_CONFIG,
                      allow_empty: bool = False) -> np.ndarray:
    """A list of region specs, applied in order (add, or remove when erase=True) → bool (y, x) of `shape`.

        >>> rasterize_regions([Rect(0, 0, 4, 4), Rect(0, 0, 2, 2, erase=True)], (4, 4)).sum()
        12

    The vertex limit counts all polygons together. Raises RegionError when the result covers no pixel (unless
    allow_empty), naming how many specs were given.
    """
    h, w = _check_shape(shape)
    if isinstance(specs, (Polygon, Rect, Ellipse, MaskRegion)):
        specs = [specs]
    specs = list(specs)
    if not specs:
        raise RegionError("no region drawn (empty list of shapes)")
    n_vertices = sum(len(s.points) for s in specs if isinstance(s, Polygon))
    if n_vertices > config.max_vertices:
        raise RegionError(f"{n_vertices} vertices in {len(specs)} shapes exceed the limit of {config.max_vertices}")
    mask = np.zeros((h, w), bool)
    for s in specs:
        m = _spec_mask(s, h, w, config)
        if s.erase:
            mask &= ~m
        else:
            mask |= m
    if not allow_empty and not mask.any():
        raise RegionError(f"the region ({len(specs)} shape(s)) covers no pixel of the {h}×{w} image "
                          f"(degenerate, erased, or outside the image)")
    return mask


# -- JSON --------------------------------------------------------------------------------------------------------------
def regions_to_json(specs: Sequence[RegionSpec]) -> list[dict]:
    """Region specs → a JSON-ready list (what the annotation database stores)."""
    return [s.to_json() for s in specs]


def regions_from_json(data, *, config: RegionConfig = DEFAULT_CONFIG) -> list[RegionSpec]:
    """The inverse of regions_to_json; RegionError names the entry that is malformed."""
    if not isinstance(data, list):
        raise RegionError(f"region JSON must be a list of shapes, got {type(data).__name__}")
    out: list[RegionSpec] = []
    for i, d in enumerate(data):
        if not isinstance(d, Mapping):
            raise RegionError(f"region shape {i} is not an object: {d!r}")
        kind, erase = d.get("type"), bool(d.get("erase", False))
        try:
            if kind == "polygon":
                pts = d["points"]
                if len(pts) > config.max_vertices:
                    raise RegionError(f"region shape {i}: {len(pts)} vertices exceed the limit {config.max_vertices}")
                out.append(Polygon(pts, erase=erase))
            elif kind in ("rect", "ellipse"):
                cls = Rect if kind == "rect" else Ellipse
                out.append(cls(float(d["x0"]), float(d["y0"]), float(d["x1"]), float(d["y1"]), erase=erase))
            elif kind == "mask":
                out.append(MaskRegion(shape=(int(d["shape"][0]), int(d["shape"][1])),
                                      counts=tuple(int(c) for c in d["counts"]), erase=erase))
            else:
                raise RegionError(f"region shape {i}: unknown type {kind!r}")
        except (KeyError, IndexError, TypeError, ValueError) as e:
            if isinstance(e, RegionError):
                raise
            raise RegionError(f"region shape {i} ({kind!r}) is malformed: {e!r}") from None
    return out


# -- plotly shapes -----------------------------------------------------------------------------------------------------
_PATH_TOKEN = re.compile(r"\s*(?:([MLHVZmlhvz])|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))\s*,?\s*")


def parse_svg_path(path: str, *, config: RegionConfig = DEFAULT_CONFIG) -> list[np.ndarray]:
    """Plotly's drawn-shape path ("M10,20L30,40L25,60Z", M/L/H/V/Z and their relative forms) → list of (n, 2)
    float64 point arrays, one per subpath. Curves (C, Q, A, …), NaN and text raise RegionError."""
    if not isinstance(path, str):
        raise RegionError(f"path must be a string, got {type(path).__name__}")
    if len(path) > config.max_vertices * 64:  # refuse before tokenizing
        raise RegionError(f"path of {len(path)} characters exceeds the vertex limit of {config.max_vertices}")
    subpaths: list[list[tuple[float, float]]] = []
    cur: list[tuple[float, float]] = []
    cmd = None
    nums: list[float] = []
    x = y = 0.0
    start = (0.0, 0.0)
    n_vertices = 0

    def flush_numbers():
        nonlocal x, y, cur, start, cmd, n_vertices
        if cmd is None:
            if nums:
                raise RegionError(f"path {path[:40]!r}…: numbers before the first command")
            return
        c = cmd.upper()
        rel = cmd.islower()
        step = {"M": 2, "L": 2, "H": 1, "V": 1, "Z": 0}[c]
        if c == "Z":
            if nums:
                raise RegionError(f"path {path[:40]!r}…: numbers after Z")
            if cur:
                subpaths.append(cur)
            cur = []
            x, y = start
            return
        if not nums or len(nums) % step:
            raise RegionError(f"path {path[:40]!r}…: command {cmd} needs a multiple of {step} numbers, got {len(nums)}")
        for k in range(0, len(nums), step):
            if c in ("M", "L"):
                nx, ny = nums[k], nums[k + 1]
                if rel:
                    nx, ny = x + nx, y + ny
            elif c == "H":
                nx, ny = (x + nums[k] if rel else nums[k]), y
            else:
                nx, ny = x, (y + nums[k] if rel else nums[k])
            if c == "M" and k == 0:
                if cur:
                    subpaths.append(cur)
                cur = []
                start = (nx, ny)
            x, y = nx, ny
            cur.append((x, y))
            n_vertices += 1
            if n_vertices > config.max_vertices:
                raise RegionError(f"path has more than {config.max_vertices} vertices")

    pos = 0
    while pos < len(path):
        m = _PATH_TOKEN.match(path, pos)
        if not m or m.end() == pos:
            snippet = path[pos:pos + 12]
            if re.match(r"\s*[-+]?(nan|inf)", snippet, re.I):
                raise RegionError(f"path has a non-finite coordinate at character {pos}: {snippet!r}")
            raise RegionError(f"unsupported path syntax at character {pos}: {snippet!r} (only M, L, H, V, Z)")
        pos = m.end()
        if m.group(1):
            flush_numbers()
            cmd, nums = m.group(1), []
        else:
            nums.append(float(m.group(2)))
    flush_numbers()
    if cur:
        subpaths.append(cur)
    if not subpaths:
        raise RegionError(f"path {path[:40]!r} has no vertices")
    return [np.asarray(s, dtype=np.float64) for s in subpaths]


def _number(shape: Mapping, key: str, i: int) -> float:
    try:
        v = float(shape[key])
    except KeyError:
        raise RegionError(f"shape {i} ({shape.get('type')!r}) has no {key!r}") from None
    except (TypeError, ValueError):
        raise RegionError(f"shape {i}: {key}={shape[key]!r} is not a number") from None
    if not math.isfinite(v):
        raise RegionError(f"shape {i}: {key}={v!r} is not finite")
    return v


def parse_plotly_shape(shape: Mapping, *, view: DisplayView | None = None, index: int = 0,
                       config: RegionConfig = DEFAULT_CONFIG) -> list[RegionSpec]:
    """One plotly layout shape (as in relayoutData["shapes"]) → region specs in patch coordinates.

    "path" → one Polygon per subpath (open paths from `drawopenpath` are closed); "rect" → Rect; "circle" →
    Ellipse. A shape whose `name` is "erase" removes pixels. Lines have no area and raise RegionError.
    """
    if not isinstance(shape, Mapping):
        raise RegionError(f"shape {index} is not an object: {shape!r}")
    kind = shape.get("type")
    erase = shape.get("name") == "erase"
    tf = view.to_patch if view is not None else (lambda p: p)
    if kind == "path":
        specs: list[RegionSpec] = []
        for sub in parse_svg_path(shape.get("path"), config=config):
            pts = tf(_as_points(sub, config=config, what=f"shape {index} path"))
            specs.append(Polygon([tuple(p) for p in pts], erase=erase))
        return specs
    if kind in ("rect", "circle"):
        x0, y0, x1, y1 = (_number(shape, k, index) for k in ("x0", "y0", "x1", "y1"))
        (a, b), (c, d) = tf(np.array([[x0, y0], [x1, y1]], dtype=np.float64))
        return [(Rect if kind == "rect" else Ellipse)(a, b, c, d, erase=erase)]
    if kind == "line":
        raise RegionError(f"shape {index} is a line: a region needs an area (draw a closed path, rect or circle)")
    raise RegionError(f"shape {index} has unsupported type {kind!r}")


def parse_plotly_shapes(shapes: Sequence[Mapping] | None, *, view: DisplayView | None = None,
                        config: RegionConfig = DEFAULT_CONFIG) -> list[RegionSpec]:
    """All shapes of a figure (relayoutData["shapes"] or figure.layout.shapes) → region specs, in drawing order."""
    if not shapes:
        raise RegionError("no region drawn (no shapes)")
    if len(shapes) > config.max_vertices:
        raise RegionError(f"{len(shapes)} shapes exceed the limit of {config.max_vertices}")
    specs: list[RegionSpec] = []
    for i, s in enumerate(shapes):
        specs.extend(parse_plotly_shape(s, view=view, index=i, config=config))
    n_vertices = sum(len(s.points) for s in specs if isinstance(s, Polygon))
    if n_vertices > config.max_vertices:
        raise RegionError(f"{n_vertices} vertices in {len(shapes)} shapes exceed the limit of {config.max_vertices}")
    return specs


_SHAPE_KEY = re.compile(r"^shapes\[(\d+)\]\.(\w+)$")


def apply_relayout(shapes: Sequence[Mapping] | None, relayout: Mapping | None) -> list[dict]:
    """The figure's shapes after a plotly `relayoutData` event: a full list ({"shapes": [...]}) replaces them,
    edits ({"shapes[2].path": "M…", "shapes[0].x0": 3}) change one field; other keys (zoom, autosize) are ignored.
    Returns new dicts; the inputs are not modified."""
    out = [dict(s) for s in (shapes or [])]
    if not relayout:
        return out
    if "shapes" in relayout:
        new = relayout["shapes"]
        if not isinstance(new, list):
            raise RegionError(f"relayoutData['shapes'] must be a list, got {type(new).__name__}")
        out = [dict(s) for s in new]
    for key, value in relayout.items():
        m = _SHAPE_KEY.match(key)
        if not m:
            continue
        i = int(m.group(1))
        if i >= len(out):
            raise RegionError(f"relayoutData edits {key!r} but the figure has {len(out)} shapes")
        out[i][m.group(2)] = value
    return out
