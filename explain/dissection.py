"""Network Dissection: unit masks and the IoU of drawn regions (or ground-truth masks) with every unit of a layer.

    >>> from explain.dissection import UnitIoU, DatasetIoU, region_iou
    >>> iou = UnitIoU(store, "features.9").compute("p0012", region_mask)      # float32 (unit,)
    >>> iou = UnitIoU(store, "features.9").compute(12, [Polygon([...])])      # image index, drawn region specs
    >>> res = DatasetIoU(store, "features.9").compute(masks_by_image)         # res.iou: float32 (unit, concept)
    >>> region_iou(maps, thresholds, region_mask)                             # the pure function on arrays

Unit mask (DESIGN.md §4): a unit's map (y, x) is upsampled bilinearly to the patch size — exactly what
`torch.nn.functional.interpolate(mode="bilinear", align_corners=False)` computes — and thresholded at the unit's
activation quantile over the dataset (level 0.99 by default): a pixel belongs to the mask when its upsampled value is
strictly greater than the threshold. IoU = |mask ∩ region| / |mask ∪ region|.

How the fast path avoids upsampling 512 maps to 512×512 (134 M values) — and stays equal to the plain per-unit
reference (`reference_unit_iou`, a Python loop over units with F.interpolate):

- Output rows (and columns) fall into segments that share the same two source rows and are not clamped; inside a
  segment × segment cell every upsampled value is a convex combination of the cell's four corner values.
  One comparison per map value leaves the few windows (source rows i, i+1 × columns j, j+1: one to four cells)
  that may reach the threshold. A window whose smallest corner is above the threshold (plus a float margin) is
  inside the mask entirely: its area and region overlap come from window sums, no pixel is evaluated.
- In the remaining (boundary) cells, each output column is a linear function of the row weight λ, so the rows above
  the threshold form one run whose ends are counted from λ with one float32 multiply-add (all columns of all
  boundary cells at once). A cell without region pixels adds nothing to the overlap and a cell inside the region
  adds its area; only the cells across the region's edge take each run's region pixels from a column prefix sum.
  Rows whose value is within the float margin of the threshold are evaluated exactly with torch's own arithmetic
  (float32 with fused multiply-add, as its CPU kernel does on patches of more than 4096 pixels), so the counts
  equal the reference pixel for pixel on this machine; elsewhere they can differ only at values within one
  rounding of the threshold.
Everything is vectorized over units and cells (numpy); nothing loops over units in Python.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ExplainError, RegionError, UnknownImageError, UnknownLayerError
from .regions import RegionSpec, rasterize_regions

__all__ = [
    "DEFAULT_LEVEL",
    "UpsampleGrid",
    "upsample_maps",
    "unit_masks",
    "interpolation_matrix",
    "unit_cell_weights",
    "mask_counts",
    "region_iou",
    "iou_from_counts",
    "reference_unit_iou",
    "UnitIoU",
    "DatasetIoU",
    "ConceptIoU",
    "resolve_image",
    "patch_size",
    "main",
]

DEFAULT_LEVEL = 0.99
_F32 = np.float32
# Relative float margin: values of a bilinear cell can leave [min corner, max corner] only by a few float32
# roundings (≈ 3 · 2⁻²⁴ of the largest magnitude); 1e-6 covers that with room to spare.
_MARGIN = 1e-6


def _fma32(x, y, z) -> np.ndarray:
    """float32 fused multiply-add x·y + z rounded once (float32 products are exact in float64)."""
    return (np.asarray(x, np.float64) * np.asarray(y, np.float64) + np.asarray(z, np.float64)).astype(_F32)


# -- geometry of one upsampling ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Axis:
    """Bilinear weights along one axis (n_in → n_out, align_corners=False) and their grouping into segments.

    A segment is a run of output indices with the same two source indices (clamped ones apart): inside it the
    weight l1 grows by a constant step, so the number of rows with l1 <= λ is ⌊λ·rate + offset⌋ clipped to
    [0, length] (float32, one multiply-add); `slack` bounds the deviation of the float32 weights from that line
    and the rounding of that count, in units of λ, and is added to every classification margin.
    """

    n_in: int
    n_out: int
    l0: np.ndarray  # float32 (out,): weight of the lower source index
    l1: np.ndarray  # float32 (out,): weight of the upper source index
    start: np.ndarray  # int64 (segment,): first output index
    length: np.ndarray  # int64 (segment,)
    i0: np.ndarray  # int64 (segment,): lower source index
    i1: np.ndarray  # int64 (segment,): upper source index (= i0 at the last one)
    rate: np.ndarray  # float32 (segment,): indices per unit of l1 (1 / step; 1e30 where clamped, i.e. constant)
    offset: np.ndarray  # float32 (segment,): 1 − rate · (l1 of the first index)
    slack: float
    width: int  # longest segment
    # a window gathers the outputs whose lower source index is i (one or two segments: clamped ones apart)
    win_start: np.ndarray  # int64 (in,): first output index of window i
    win_length: np.ndarray  # int64 (in,): its number of outputs (0 when downsampling skips i)
    win_seg: np.ndarray  # int64 (in,): its first segment
    win_nseg: np.ndarray  # int64 (in,): its number of segments

    @classmethod
    def build(cls, n_in: int, n_out: int) -> "_Axis":
        # torch's CPU kernel: scale = in/out in float32, src = fma(scale, dst + 0.5, -0.5), clamped at 0
        scale = _F32(n_in) / _F32(n_out)
        dst = np.arange(n_out, dtype=_F32)
        raw = _fma32(scale, dst + _F32(0.5), _F32(-0.5))
        clamped = raw < 0
        src = np.maximum(raw, _F32(0))
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        l1 = (src - i0.astype(_F32)).astype(_F32)
        l0 = (_F32(1) - l1).astype(_F32)
        seg_key = i0 * 2 + clamped
        start = np.flatnonzero(np.r_[True, seg_key[1:] != seg_key[:-1]])
        length = np.diff(np.r_[start, n_out])
        first = l1[start].astype(np.float64)
        seg_of = np.repeat(np.arange(len(start)), length)
        index = np.arange(n_out) - start[seg_of]
        line = first[seg_of] + np.where(clamped, 0.0, index * float(scale))
        # clamped runs have constant weights l1 = 0: a rate of 1e30 turns "l1 <= λ" into "λ >= 0" (at exactly 0 it
        # counts one index, not all: that λ is a band end ± slack, and rows that far from the band count right
        # whether they are taken as surely above/below or evaluated exactly)
        rate = np.where(clamped[start], 1e30, 1 / float(scale))
        offset = 1 - rate * np.where(clamped[start], 0.0, first)
        # + float32 λ arithmetic (1e-6) + float32 rounding of λ·rate + offset (a few ulps of length + 1 indices,
        # i.e. under 1e-6 · (1 + step) in λ)
        slack = float(np.abs(l1.astype(np.float64) - line).max()) * 2 + 2e-6 + 1e-6 * float(scale)
        src_idx = np.arange(n_in)
        return cls(n_in=n_in, n_out=n_out, l0=l0, l1=l1, start=start, length=length, i0=i0[start],
                   i1=np.minimum(i0[start] + 1, n_in - 1), rate=rate.astype(_F32), offset=offset.astype(_F32),
                   slack=slack,
                   width=int(length.max()),
                   win_start=np.searchsorted(i0, src_idx, side="left"),
                   win_length=np.searchsorted(i0, src_idx, side="right") - np.searchsorted(i0, src_idx, side="left"),
                   win_seg=np.searchsorted(i0[start], src_idx, side="left"),
                   win_nseg=np.searchsorted(i0[start], src_idx, side="right")
                   - np.searchsorted(i0[start], src_idx, side="left"))

    @property
    def n_segments(self) -> int:
        return len(self.start)


@dataclass(frozen=True)
class UpsampleGrid:
    """Bilinear geometry from (h, w) maps to an (H, W) patch, built once per shape pair and reused.

        >>> grid = UpsampleGrid.build((32, 32), (512, 512))
        >>> region_iou(maps, thresholds, mask, grid=grid)
    """

    map_shape: tuple[int, int]
    size: tuple[int, int]
    y: _Axis = field(repr=False)
    x: _Axis = field(repr=False)
    # per column of a cell, columns first (the layout of _boundary_counts)
    cols: np.ndarray = field(repr=False)  # int64 (width, x-segment): output column (clipped to the segment)
    col_l0: np.ndarray = field(repr=False)  # float32 (width, x-segment): column weights
    col_l1: np.ndarray = field(repr=False)
    cell_rows: np.ndarray = field(repr=False)  # float32 (width, y-segment · x-segment): rows of the cell column
    cell_area: np.ndarray = field(repr=False)  # int64 (y-segment, x-segment): output pixels of each cell
    win_area: np.ndarray = field(repr=False)  # int64 (y, x): output pixels of each source window

    @classmethod
    def build(cls, map_shape: Sequence[int], size: Sequence[int]) -> "UpsampleGrid":
        h, w = (int(v) for v in map_shape)
        H, W = (int(v) for v in size)
        if min(h, w, H, W) <= 0:
            raise ValueError(f"UpsampleGrid: map shape {tuple(map_shape)} and size {tuple(size)} must be positive")
        ay, ax = _Axis.build(h, H), _Axis.build(w, W)
        j = np.arange(ax.width)[:, None]
        valid = j < ax.length[None, :]  # (width, x-segment)
        cols = np.where(valid, ax.start[None, :] + j, ax.start[None, :])
        return cls(map_shape=(h, w), size=(H, W), y=ay, x=ax, cols=cols, col_l0=ax.l0[cols], col_l1=ax.l1[cols],
                   # the y-segment's length, 0 past the end of a shorter x-segment
                   cell_rows=(valid[:, None, :] * ay.length[None, :, None]).astype(_F32).reshape(ax.width, -1),
                   cell_area=ay.length[:, None] * ax.length[None, :],
                   win_area=ay.win_length[:, None] * ax.win_length[None, :])


# -- the plain definitions (also the reference) ------------------------------------------------------------------------
def upsample_maps(maps: np.ndarray | torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """float32 (unit, y, x) maps → float32 (unit, H, W), bilinear, align_corners=False (the unit-mask definition)."""
    # a read-only array (a zarr read, a memory map) is copied: torch cannot wrap it without a warning
    t = torch.as_tensor(np.require(maps, dtype=_F32, requirements=["W"]) if not isinstance(maps, torch.Tensor)
                        else maps.float())
    return F.interpolate(t[None], size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[0]


def unit_masks(maps: np.ndarray, thresholds: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """bool (unit, H, W): each unit's Network-Dissection mask (upsampled map > the unit's threshold).

    Materializes unit × H × W booleans: for display of a few units; use region_iou for IoUs.
    """
    up = upsample_maps(maps, size)
    return (up > torch.tensor(np.array(thresholds, dtype=_F32))[:, None, None]).numpy()


def interpolation_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """float32 (n_out, n_in): torch's linear interpolation weights (align_corners=False): upsampling a map bilinearly
    is B_y · map · B_xᵀ."""
    eye = torch.eye(int(n_in), dtype=torch.float32)[None]  # channel c: the one-hot map e_c
    return F.interpolate(eye, size=int(n_out), mode="linear", align_corners=False)[0].T.contiguous()


def unit_cell_weights(maps: np.ndarray, thresholds: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """float32 (image, unit, y, x): each unit's mask (`unit_masks`) pulled back to the map grid through the bilinear
    upsampling, K = B_yᵀ · M_u · B_x, so that for any map p (y, x) upsampled to the patch,
    Σ_pixels M_u · upsample(p) = Σ_cells K_u · p (up to float rounding); Σ_cells K_u is the mask's area.

        >>> k = unit_cell_weights(maps, thresholds, (64, 64))      # maps (image, unit, y, x)
    """
    maps = torch.as_tensor(np.require(maps, dtype=_F32, requirements=["W"]))
    if maps.ndim != 4:
        raise ValueError(f"maps must be (image, unit, y, x), got shape {tuple(maps.shape)}")
    (n, u, h, w), (H, W) = maps.shape, (int(v) for v in size)
    t = torch.tensor(np.asarray(thresholds, dtype=_F32).reshape(-1)).expand(n, u).reshape(-1)
    flat = maps.reshape(n * u, 1, h, w)
    # a bilinear upsampling never exceeds its largest cell: a map whose cells all lie at or below the threshold has an
    # empty mask and zero weights. At the 0.99 quantile most units are silent on most images, so only the others are
    # upsampled (the same values: each map is upsampled on its own either way)
    active = torch.nonzero(flat.amax(dim=(1, 2, 3)) > t).reshape(-1)
    out = torch.zeros(n * u, h, w)
    if len(active):
        m = len(active)
        # 1.0 where the upsampled map exceeds the threshold, else 0.0, in place (x − t > 0 exactly when x > t):
        # a comparison's bool array turned into floats took ten times as long
        up = F.interpolate(flat[active], size=(H, W), mode="bilinear", align_corners=False)
        masks = up.sub_(t[active].reshape(-1, 1, 1, 1)).clamp_(min=0).sign_()
        # two plain matrix products (a batch of small ones is several times slower): columns, then rows
        cols = (masks.reshape(-1, W) @ interpolation_matrix(w, W)).reshape(m, H, w)
        rows = cols.transpose(1, 2).reshape(-1, H) @ interpolation_matrix(h, H)  # (m·w, h)
        out[active] = rows.reshape(m, w, h).transpose(1, 2)
    return out.reshape(n, u, h, w).numpy()


def reference_unit_iou(maps: np.ndarray, thresholds: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The plain per-unit loop (for tests and the benchmark): float32 (unit,) IoU of `region` with each unit mask."""
    maps = np.asarray(maps, dtype=_F32)
    reg = torch.from_numpy(np.ascontiguousarray(region, dtype=bool))
    out = np.zeros(len(maps), _F32)
    for u in range(len(maps)):
        up = F.interpolate(torch.from_numpy(maps[u])[None, None], size=reg.shape, mode="bilinear",
                           align_corners=False)[0, 0]
        mask = up > float(thresholds[u])
        inter = int((mask & reg).sum())
        union = int((mask | reg).sum())
        out[u] = inter / union if union else 0.0
    return out


# -- the fast path -----------------------------------------------------------------------------------------------------
def _check_inputs(maps: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=_F32)
    thresholds = np.asarray(thresholds, dtype=_F32).reshape(-1)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (unit, y, x), got shape {maps.shape}")
    if thresholds.shape[0] != maps.shape[0]:
        raise ValueError(f"{thresholds.shape[0]} thresholds for {maps.shape[0]} units")
    return maps, thresholds


def _region_stack(regions: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    regions = np.asarray(regions, dtype=bool)
    if regions.ndim == 2:
        regions = regions[None]
    if regions.ndim != 3 or regions.shape[1:] != tuple(size):
        raise RegionError(f"region masks of shape {regions.shape} do not match the patch size {tuple(size)}")
    return regions


def mask_counts(maps: np.ndarray, thresholds: np.ndarray, regions: np.ndarray | None = None, *,
                grid: UpsampleGrid | None = None, size: Sequence[int] | None = None,
                known_area: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pixel counts of every unit mask and of its overlap with each region, without materializing the masks.

        >>> area, inter = mask_counts(maps, thresholds, np.stack([mass_mask, calc_mask]))
        >>> area.shape, inter.shape                     # int64 (unit,), int64 (region, unit)

    maps float32 (unit, y, x); thresholds (unit,); regions bool (region, H, W) or (H, W) (or None with `size`).
    known_area (unit,): the unit mask areas of these maps from an earlier call; then only the windows that touch a
    region are examined (a second drawing on the same image costs a fraction of the first).
    """
    maps, thresholds = _check_inputs(maps, thresholds)
    if regions is not None and np.size(regions) == 0 and (size is not None or grid is not None):
        regions = None  # no regions at all (an empty list or stack): only the unit mask areas
    if regions is None:
        if size is None and grid is None:
            raise ValueError("mask_counts: give regions, size or grid")
        size = tuple(grid.size if grid is not None else size)
        regions = np.zeros((0, *size), bool)
    else:
        size = tuple(np.shape(regions)[-2:])
        regions = _region_stack(regions, size)
    if grid is None or grid.map_shape != maps.shape[1:] or grid.size != size:
        grid = UpsampleGrid.build(maps.shape[1:], size)
    gy, gx = grid.y, grid.x
    n_units, n_reg = maps.shape[0], regions.shape[0]
    H, W = size
    h, w = maps.shape[1:]

    # window (i, j) = the output pixels between source rows i, i+1 and columns j, j+1: its values lie between the
    # smallest and largest of those four map values, give or take the float margin
    flat = maps.reshape(-1)
    win = _candidate_windows(maps, thresholds)  # flat (unit, y, x) index of each candidate window's first value
    uc, pos = np.divmod(win, h * w)
    yc, xc = np.divmod(pos, w)
    right = win + (xc < w - 1)  # the last row and column pair with themselves
    down = (yc < h - 1) * w
    a, b, c, d = flat[win], flat[right], flat[win + down], flat[right + down]
    wmax = np.maximum(np.maximum(a, b), np.maximum(c, d))
    wmin = np.minimum(np.minimum(a, b), np.minimum(c, d))
    # float margin relative to the window's own magnitude: an all-zero window of a dead unit stays exactly zero
    mc = np.maximum(wmax, -wmin) * _F32(_MARGIN)
    tc = thresholds[uc]
    any_above = wmax > tc - mc  # windows with any pixel possibly above the threshold
    full = wmin > tc + mc  # every pixel above
    uf, yf, xf = uc[full], yc[full], xc[full]
    boundary = any_above & ~full
    ub, yb, xb, mb = uc[boundary], yc[boundary], xc[boundary], mc[boundary]

    # region sums: column prefix sums for runs of rows, per cell and per window
    colcum = _column_prefix(regions)  # int16 (region, row + 1, x): region pixels in rows < row
    ry = np.r_[gy.start, H]
    cell_reg = np.add.reduceat(colcum[:, ry[1:]] - colcum[:, ry[:-1]], gx.start, axis=2,
                               dtype=np.int64)  # (region, y-seg, x-seg)
    wy0 = gy.win_start
    win_rows = colcum[:, wy0 + gy.win_length] - colcum[:, wy0]  # (region, y-window, x)
    win_reg = np.add.reduceat(np.concatenate([win_rows, np.zeros((n_reg, len(wy0), 1), win_rows.dtype)], axis=2),
                              np.minimum(gx.win_start, W), axis=2, dtype=np.int64)[:, :, :len(gx.win_start)]
    win_reg = np.where(gx.win_length[None, None, :] > 0, win_reg, 0)  # (region, y-window, x-window)

    area = np.bincount(uf, grid.win_area[yf, xf], minlength=n_units).astype(np.int64)  # (unit,)
    inter = np.zeros((n_reg, n_units), np.int64)  # (region, unit)
    for r in range(n_reg):
        inter[r] = np.bincount(uf, win_reg[r, yf, xf], minlength=n_units)

    if known_area is not None:  # only intersections are needed: skip windows without region pixels
        touch = (win_reg[:, yb, xb] > 0).any(axis=0)
        ub, yb, xb, mb = ub[touch], yb[touch], xb[touch], mb[touch]
    if ub.size:  # boundary windows → their (y-segment, x-segment) cells
        ny, nx = gy.win_nseg[yb], gx.win_nseg[xb]
        k = ny * nx  # 0, 1, 2 or 4 cells per window
        rep = np.repeat(np.arange(ub.size), k)
        j = np.arange(rep.size) - np.repeat(np.cumsum(k) - k, k)
        sy = gy.win_seg[yb][rep] + j // nx[rep]
        sx = gx.win_seg[xb][rep] + j % nx[rep]
        u = ub[rep]
        row0, row1 = u * (h * w) + gy.i0[sy] * w, u * (h * w) + gy.i1[sy] * w
        i0x, i1x = gx.i0[sx], gx.i1[sx]
        corners = flat[row0 + i0x], flat[row0 + i1x], flat[row1 + i0x], flat[row1 + i1x]
        _boundary_counts(thresholds, grid, colcum, cell_reg, regions, u, sy, sx, corners, mb[rep], area, inter)
    if known_area is not None:
        area = np.asarray(known_area, dtype=np.int64).reshape(n_units).copy()
    return area, inter


def _candidate_windows(maps: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Flat (unit, y, x) indices of a superset of the windows whose largest value passes w > t − margin(window).

    A window's margin is at most 1e-6 · max(|t|, −(the unit's smallest value)) (plus a rounding), so a window can
    pass only if one of its values is above t − 2e-6 · that bound: one comparison per map value, then or-ing
    each byte with its right and lower neighbours in the flat array (at the last column and row that also takes
    the next row's or unit's first values: a few extra candidates, which the exact test drops).
    """
    h, w = maps.shape[1:]
    bound = np.maximum(np.abs(thresholds), -maps.reshape(len(maps), -1).min(axis=1))
    cut = thresholds - bound * _F32(2 * _MARGIN)
    above = (maps > cut[:, None, None]).reshape(-1)
    near = above.copy()
    near[:-1] |= above[1:]  # the window's right column
    near[:-w] |= near[w:]  # its lower row (overlapping operands: numpy reads before it writes)
    return np.flatnonzero(near)


def _column_prefix(regions: np.ndarray) -> np.ndarray:
    """bool (region, H, W) → int (region, H + 1, W): region pixels above each row in each column (row 0: none).

    Doubling steps (log2 H whole-array adds) instead of np.cumsum along the row axis, whose inner loop runs down
    a strided column and costs several times more.
    """
    n_reg, H, W = regions.shape
    out = np.zeros((n_reg, H + 1, W), np.int16 if H < 2**15 else np.int32)  # int16 halves the memory traffic
    out[:, 1:] = regions
    step = 1
    while step < H:  # after this pass every row holds the sum of the 2·step rows up to it
        out[:, 1 + step:] += out[:, 1:H + 1 - step]  # overlapping operands: numpy reads before it writes
        step *= 2
    return out


def _boundary_counts(thresholds, grid, colcum, cell_reg, regions, u, sy, sx, corners, margin, area, inter) -> None:
    """Add the counts of boundary cells (unit u, segments sy, sx) to area (unit,) and inter (region, unit).

    Per column of a cell the value runs linearly from `top` (λ = 0) to `bot` (λ = 1) with the row weight λ: the
    rows surely above form one run found from λ (all rows of a column above, none of one below, the rows before
    or after the crossing otherwise) and the rows within the margin of the threshold are evaluated exactly.
    Every (column, cell) is computed densely in float32 (row counts are small integers, exact in float32), with
    cells along the contiguous axis so that per-cell values broadcast along it: picking out the crossing
    columns first would cost more than it saves.
    """
    gy = grid.y
    n_units, n_reg, W = thresholds.shape[0], colcum.shape[0], colcum.shape[2]
    A, B, C, D = corners  # float32 (cell,): rows i0/i1 × columns i0/i1
    l0x, l1x = np.take(grid.col_l0, sx, axis=1), np.take(grid.col_l1, sx, axis=1)  # (col, cell)
    # float32 column values at the two source rows: within a rounding of torch's, which the margin covers
    top = l0x * A
    top += l1x * B  # (col, cell)
    slope = l0x * C
    slope += l1x * D
    slope -= top  # bot − top
    np.putmask(slope, slope == 0, np.finfo(_F32).tiny)  # flat: λ bounds become ±inf (all above, near or below)
    t = thresholds[u]
    rising = slope > 0
    rate, offset, slack = gy.rate[sy], gy.offset[sy], _F32(gy.slack)
    rows = np.take(grid.cell_rows, sy * grid.x.n_segments + sx, axis=1)  # float32 (col, cell)
    with np.errstate(over="ignore"):  # a flat column's λ is ±inf
        lam_a = (t - margin) - top
        lam_a /= slope  # λ where the value crosses t − margin
        lam_b = np.subtract(t + margin, top, out=top)
        lam_b /= slope  # … and t + margin
        lam_a, lam_b = np.minimum(lam_a, lam_b), np.maximum(lam_a, lam_b, out=lam_b)  # the band, in λ
        # rows [k_a, k_b) have l1 within the band ± slack: evaluated exactly below
        k_a = _count_rows(lam_a, rate, offset - slack * rate, rows)  # λ − slack
        k_b = _count_rows(lam_b, rate, offset + slack * rate, rows)  # λ + slack
    # rows surely above: after the band when rising (rows − k_b), before it when falling (k_a)
    span = rows - k_b
    span -= k_a
    span *= rising
    span += k_a
    in_mask = span.sum(axis=0)  # float32 (cell,): sums of small integers, exact
    area += np.bincount(u, in_mask, minlength=n_units).astype(np.int64)

    # a cell without region pixels adds no intersection and a cell inside the region adds its area: only the cells
    # across the region's edge need the region's pixels in each run of rows (column prefix sums)
    reg = cell_reg[:, sy, sx]  # (region, cell)
    inside = reg == grid.cell_area[sy, sx]
    across = (reg > 0) & ~inside
    for r in range(n_reg):
        inter[r] += np.bincount(u[inside[r]], in_mask[inside[r]], minlength=n_units).astype(np.int64)
        c = np.flatnonzero(across[r])
        if c.size == 0:
            continue
        up = rising[:, c]
        lo = np.where(up, k_b[:, c], 0).astype(np.intp)
        hi = np.where(up, rows[:, c], k_a[:, c]).astype(np.intp)
        base = gy.start[sy[c]] * W + np.take(grid.cols, sx[c], axis=1)  # (col, cell): flat index of row 0
        cum = colcum[r].reshape(-1)
        inter[r] += np.bincount(u[c], (cum[base + hi * W] - cum[base + lo * W]).sum(axis=0),
                                minlength=n_units).astype(np.int64)

    # the rows near the threshold, with torch's exact arithmetic
    band = k_b - k_a
    near = np.flatnonzero(band > 0)
    if near.size == 0:
        return
    j_i, c_i = np.divmod(near, band.shape[1])
    k = band.reshape(-1)[near].astype(np.intp)
    total = int(k.sum())
    rep = np.repeat(np.arange(k.size), k)
    jj, cc = j_i[rep], c_i[rep]
    row = gy.start[sy[cc]] + k_a[jj, cc].astype(np.intp) + (np.arange(total) - np.repeat(np.cumsum(k) - k, k))
    lx0, lx1 = l0x[jj, cc], l1x[jj, cc]
    top_x = _fma32(lx0, A[cc], (lx1 * B[cc]).astype(_F32))
    bot_x = _fma32(lx0, C[cc], (lx1 * D[cc]).astype(_F32))
    val = _fma32(gy.l0[row], top_x, (gy.l1[row] * bot_x).astype(_F32))
    who = u[cc]
    above = val > thresholds[who]
    area += np.bincount(who, above, minlength=n_units).astype(np.int64)
    xs = grid.cols[jj, sx[cc]]
    for r in range(n_reg):
        inter[r] += np.bincount(who, above & regions[r, row, xs], minlength=n_units).astype(np.int64)


def _count_rows(lam: np.ndarray, rate: np.ndarray, offset: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32: how many rows of the segment have l1 <= lam: ⌊lam·rate + offset⌋ within [0, rows] (±inf: all, none).

    Overwrites lam; call it with float overflow ignored (a huge λ times a clamped segment's rate is inf).
    """
    k = np.multiply(lam, rate, out=lam)
    k += offset
    np.maximum(k, 0, out=k)
    np.minimum(k, rows, out=k)
    return np.floor(k, out=k)


def region_iou(maps: np.ndarray, thresholds: np.ndarray, region: np.ndarray, *,
               grid: UpsampleGrid | None = None) -> np.ndarray:
    """IoU of one region with every unit mask at once → float32 (unit,).

        >>> region_iou(maps, thresholds, mask)          # maps float32 (unit, y, x), thresholds (unit,), mask (H, W)

    Equal to reference_unit_iou (see the module docstring); a region covering no pixel raises RegionError.
    """
    region = np.asarray(region, dtype=bool)
    if region.ndim != 2:
        raise RegionError(f"region must be a (y, x) mask, got shape {region.shape}")
    n = int(region.sum())
    if n == 0:
        raise RegionError(f"the region covers no pixel of the {region.shape[0]}×{region.shape[1]} patch")
    area, inter = mask_counts(maps, thresholds, region[None], grid=grid)
    return iou_from_counts(area, inter[0], n)


def iou_from_counts(area: np.ndarray, inter: np.ndarray, region_px: int) -> np.ndarray:
    """float32 (unit,): IoU of a region of `region_px` pixels with unit masks of `area` pixels overlapping it by
    `inter` (mask_counts' outputs for one region)."""
    return (inter / (area + int(region_px) - inter)).astype(_F32)


# -- store-bound classes -----------------------------------------------------------------------------------------------
def _check_layer(store, layer: str) -> str:
    if layer not in store.layers:
        raise UnknownLayerError(layer, known=store.layers, where=str(getattr(store, "url", "the store")))
    return layer


def resolve_image(store, image) -> int:
    """An image id (str) or index (int) of `store` → its index; UnknownImageError otherwise."""
    if isinstance(image, (int, np.integer)) and not isinstance(image, bool):
        if 0 <= int(image) < store.n_images:
            return int(image)
        raise UnknownImageError(image, where=f"{store.url} (indices 0 … {store.n_images - 1})")
    if isinstance(image, str):
        try:
            return store.index_of(image)
        except KeyError:
            raise UnknownImageError(image, where=str(store.url)) from None
    raise UnknownImageError(image, where=f"{store.url} (expected an image id or index)")


def patch_size(store) -> tuple[int, int]:
    """(y, x) of the store's network-input patches (the coordinate system of regions and unit masks)."""
    size = store.attrs.get("input_size")
    if size:
        return int(size[0]), int(size[1])
    return tuple(int(s) for s in store.image(0).shape)


class UnitIoU:
    """IoU of a drawn region on one image with every unit of a layer.

        >>> iou = UnitIoU(store, "features.9", level=0.99).compute("p0012", mask)    # float32 (unit,)

    `region` is a bool (y, x) mask of the patch size or a list of region specs (explain.regions) in patch
    coordinates. Unknown layers and images raise UnknownLayerError / UnknownImageError (also KeyError).
    """

    def __init__(self, store, layer: str, *, level: float = DEFAULT_LEVEL, cache_images: int = 32):
        self.store = store
        self.layer = _check_layer(store, layer)
        self.level = float(level)
        self.thresholds = np.asarray(store.thresholds(layer, level), dtype=_F32)  # (unit,)
        self.size = patch_size(store)
        self.grid = UpsampleGrid.build(store.layer_shape(layer)[1:], self.size)
        self.cache_images = int(cache_images)
        self._areas: OrderedDict[int, np.ndarray] = OrderedDict()  # image index → int64 (unit,) mask areas
        self._lock = threading.Lock()  # one UnitIoU may serve several request threads

    @property
    def n_units(self) -> int:
        return int(self.thresholds.shape[0])

    def region_mask(self, region) -> np.ndarray:
        """bool (y, x) of the patch size from a mask or region specs; RegionError when empty or mis-sized."""
        if isinstance(region, np.ndarray) and region.dtype != object:
            mask = np.asarray(region, dtype=bool)
            if mask.shape != self.size:
                raise RegionError(f"region mask of shape {mask.shape} does not match the patch size {self.size}")
            if not mask.any():
                raise RegionError("the region covers no pixel of the patch")
            return mask
        return rasterize_regions(region, self.size)

    def compute(self, image, region: np.ndarray | Sequence[RegionSpec]) -> np.ndarray:
        """float32 (unit,): IoU of the region with each unit's mask on that image.

        The unit mask areas of the last `cache_images` images are kept, so further drawings on the same image only
        examine the map windows that the region touches.
        """
        index = resolve_image(self.store, image)
        mask = self.region_mask(region)
        with self._lock:
            known = self._areas.get(index)
            if known is not None:
                self._areas.move_to_end(index)
        maps = self.store.maps(self.layer, index)
        area, inter = mask_counts(maps, self.thresholds, mask[None], grid=self.grid, known_area=known)
        if known is None:
            with self._lock:
                self._areas[index] = area
                while len(self._areas) > self.cache_images:
                    self._areas.popitem(last=False)
        return iou_from_counts(area, inter[0], int(mask.sum()))


@dataclass
class ConceptIoU:
    """Dataset-level IoU of every unit with every concept: `iou` float32 (unit, concept) = Σ inter / Σ union."""

    layer: str
    level: float
    concepts: list[str]
    intersection: np.ndarray  # int64 (unit, concept)
    union: np.ndarray  # int64 (unit, concept)
    n_images: int

    @property
    def iou(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(self.union > 0, self.intersection / np.maximum(self.union, 1), 0.0)
        return out.astype(_F32)

    def best(self) -> tuple[np.ndarray, np.ndarray]:
        """(concept index int64 (unit,), its IoU float32 (unit,)) of each unit's best concept."""
        iou = self.iou
        idx = iou.argmax(axis=1)
        return idx, iou[np.arange(len(idx)), idx]

    def to_json(self) -> dict:
        return {"layer": self.layer, "level": self.level, "concepts": self.concepts, "n_images": self.n_images,
                "iou": self.iou.tolist()}


class DatasetIoU:
    """Dataset-level IoU (Network Dissection): intersections and unions summed over images, per unit and concept.

        >>> res = DatasetIoU(store, "features.9").compute({"p0001": {"mass": m1}, "p0002": {"mass": m2}})
        >>> res.iou.shape                                      # (unit, concept)
        >>> acc = DatasetIoU(store, "features.9", concepts=["mass", "skin"])   # streaming: add, then result
        >>> acc.add_maps(maps, stack); acc.result()            # maps (unit, y, x), stack bool (concept, H, W)

    `masks`: a mapping image id (or index) → {concept: bool (y, x)} or an iterable of such pairs (read lazily, in
    blocks of `block` images whose maps are read together). A concept missing for an image counts as an empty mask
    there, so a unit that fires on images without the concept is penalized through its union, as in Network
    Dissection.
    """

    def __init__(self, store, layer: str, *, level: float = DEFAULT_LEVEL, concepts: Sequence[str] | None = None,
                 block: int = 32):
        self.store = store
        self.layer = _check_layer(store, layer)
        self.level = float(level)
        self.thresholds = np.asarray(store.thresholds(layer, level), dtype=_F32)
        self.size = patch_size(store)
        self.grid = UpsampleGrid.build(store.layer_shape(layer)[1:], self.size)
        self.block = int(block)
        self.reset(concepts or [])

    def reset(self, concepts: Sequence[str]) -> None:
        """Start again, counting the given concepts."""
        self.concepts = list(concepts)
        n_units = self.thresholds.shape[0]
        self.intersection = np.zeros((n_units, len(self.concepts)), np.int64)  # (unit, concept)
        self.union = np.zeros((n_units, len(self.concepts)), np.int64)
        self.n_images = 0

    def stack(self, image, masks: Mapping[str, np.ndarray]) -> np.ndarray:
        """{concept: mask} → bool (concept, y, x) in this object's concept order (absent: empty)."""
        out = np.zeros((len(self.concepts), *self.size), bool)
        for j, c in enumerate(self.concepts):
            m = masks.get(c)
            if m is None:
                continue
            m = np.asarray(m, dtype=bool)
            if m.shape != self.size:
                raise RegionError(f"mask of {c!r} on image {image!r} has shape {m.shape}, expected {self.size}")
            out[j] = m
        return out

    def add_maps(self, maps: np.ndarray, stack: np.ndarray) -> None:
        """Count one image: maps float32 (unit, y, x), stack bool (concept, H, W)."""
        area, cross = mask_counts(maps, self.thresholds, stack, grid=self.grid)  # (unit,), (concept, unit)
        reg = stack.reshape(len(self.concepts), -1).sum(axis=1)  # (concept,)
        self.intersection += cross.T
        self.union += area[:, None] + reg[None, :] - cross.T
        self.n_images += 1

    def add(self, image, masks: Mapping[str, np.ndarray]) -> None:
        """Count one image given by id or index."""
        index = resolve_image(self.store, image)
        self.add_maps(self.store.maps(self.layer, index), self.stack(image, masks))

    def result(self) -> ConceptIoU:
        return ConceptIoU(layer=self.layer, level=self.level, concepts=list(self.concepts),
                          intersection=self.intersection.copy(), union=self.union.copy(), n_images=self.n_images)

    def compute(self, masks: Mapping | Iterable, *, concepts: Sequence[str] | None = None,
                progress=None) -> ConceptIoU:
        """Count every image of `masks` (from zero) → ConceptIoU; concepts default to all those in `masks`."""
        items = masks.items() if isinstance(masks, Mapping) else masks
        if concepts is None:
            items = list(items)
            concepts = sorted({c for _, per in items for c in per})
        self.reset(concepts)
        batch: list[tuple[int, object, Mapping]] = []

        def flush():
            maps = self.store.maps_many(self.layer, [i for i, _, _ in batch])  # (image, unit, y, x)
            for (_, image, per), m in zip(batch, maps):
                self.add_maps(m, self.stack(image, per))
                if progress:
                    progress(self.n_images)
            batch.clear()

        for image, per in items:
            batch.append((resolve_image(self.store, image), image, per))
            if len(batch) >= self.block:
                flush()
        if batch:
            flush()
        return self.result()


# -- python -m explain dissect -----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m explain dissect`: dataset-level IoU of every unit with the demo's ground-truth concept masks."""
    from store.settings import load_settings

    from .groundtruth import GroundTruthConfig, dissect_ground_truth

    p = argparse.ArgumentParser(prog="python -m explain dissect", description=main.__doc__)
    p.add_argument("--workspace", default=None,
                   help="workspace directory (default: CONCEPTLENS_WORKSPACE or ./workspace)")
    p.add_argument("--store", default="demo", help="activation store name or URL (default: demo)")
    p.add_argument("--data", default="demo", help="dataset name or manifest path (default: demo)")
    p.add_argument("--layer", default=None, help="one layer (default: every layer of the store)")
    p.add_argument("--level", type=float, default=DEFAULT_LEVEL, help="unit threshold quantile level (0.99)")
    p.add_argument("--min-iou", type=float, default=0.04, help="IoU above which a unit detects its best concept")
    p.add_argument("--json", default=None, help="also write the IoU table and detectors to this JSON file")
    args = p.parse_args(argv)
    settings = load_settings(args.workspace)
    config = GroundTruthConfig(level=args.level, detector_iou=args.min_iou)
    from store.errors import StoreError

    try:
        result = dissect_ground_truth(settings, store=args.store, data=args.data, layer=args.layer, config=config)
    except (StoreError, ExplainError) as e:  # the command line reports what is wrong, without a traceback
        print(f"python -m explain dissect: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
