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
  A cell whose smallest corner is above the threshold (plus a float margin) is inside the mask entirely, one whose
  largest corner is below is outside: their areas and region overlaps come from cell sums, no pixel is evaluated.
- In the remaining (boundary) cells, each output column is a linear function of the row weight λ, so the rows above
  the threshold form one run found by a binary search over the cell's row weights; region pixels in that run come
  from a column prefix sum of the region. Rows whose value is within the float margin of the threshold are
  evaluated exactly with torch's own arithmetic (float32 with fused multiply-add, as its CPU kernel does), so the
  counts equal the reference pixel for pixel on this machine; elsewhere they can differ only at values within one
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
    "mask_counts",
    "region_iou",
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
    weight l1 grows by a constant step, so the number of rows with l1 <= λ is one division (`count_le`); `slack`
    is the largest deviation of the float32 weights from that line, added to every classification margin.
    """

    n_in: int
    n_out: int
    l0: np.ndarray  # float32 (out,): weight of the lower source index
    l1: np.ndarray  # float32 (out,): weight of the upper source index
    start: np.ndarray  # int64 (segment,): first output index
    length: np.ndarray  # int64 (segment,)
    i0: np.ndarray  # int64 (segment,): lower source index
    i1: np.ndarray  # int64 (segment,): upper source index (= i0 at the last one)
    first: np.ndarray  # float64 (segment,): l1 of the first index
    step: np.ndarray  # float64 (segment,): l1 increment per index (1e-300 where clamped, i.e. constant)
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
        # clamped runs have constant weights: a step of 1e-300 turns "l1 <= λ" into "λ >= first" in count_le
        step = np.where(clamped[start], 1e-300, float(scale))
        first = l1[start].astype(np.float64)
        seg_of = np.repeat(np.arange(len(start)), length)
        offset = np.arange(n_out) - start[seg_of]
        line = first[seg_of] + np.where(clamped, 0.0, offset * float(scale))
        slack = float(np.abs(l1.astype(np.float64) - line).max()) * 2 + 1e-6  # + float32 λ arithmetic
        src_idx = np.arange(n_in)
        return cls(n_in=n_in, n_out=n_out, l0=l0, l1=l1, start=start, length=length, i0=i0[start],
                   i1=np.minimum(i0[start] + 1, n_in - 1), first=first, step=step, slack=slack,
                   width=int(length.max()),
                   win_start=np.searchsorted(i0, src_idx, side="left"),
                   win_length=np.searchsorted(i0, src_idx, side="right") - np.searchsorted(i0, src_idx, side="left"),
                   win_seg=np.searchsorted(i0[start], src_idx, side="left"),
                   win_nseg=np.searchsorted(i0[start], src_idx, side="right")
                   - np.searchsorted(i0[start], src_idx, side="left"))

    @property
    def n_segments(self) -> int:
        return len(self.start)

    def count_le(self, seg: np.ndarray, lam: np.ndarray) -> np.ndarray:
        """How many indices of segment `seg` have l1 <= lam — exact wherever lam is `slack` away from every l1."""
        with np.errstate(over="ignore", invalid="ignore"):
            k = np.floor((lam - self.first[seg]) / self.step[seg])
        k += 1
        return np.clip(k, 0, self.length[seg], out=k).astype(np.int64)  # ±inf → 0 or length


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
    cols: np.ndarray = field(repr=False)  # int64 (x-segment, width): output column of each cell column (clipped)
    col_valid: np.ndarray = field(repr=False)  # bool (x-segment, width)
    col_l0: np.ndarray = field(repr=False)  # float32 (x-segment, width): column weights
    col_l1: np.ndarray = field(repr=False)
    win_area: np.ndarray = field(repr=False)  # int64 (y, x): output pixels of each source window

    @classmethod
    def build(cls, map_shape: Sequence[int], size: Sequence[int]) -> "UpsampleGrid":
        h, w = (int(v) for v in map_shape)
        H, W = (int(v) for v in size)
        if min(h, w, H, W) <= 0:
            raise ValueError(f"UpsampleGrid: map shape {tuple(map_shape)} and size {tuple(size)} must be positive")
        ay, ax = _Axis.build(h, H), _Axis.build(w, W)
        j = np.arange(ax.width)
        valid = j[None, :] < ax.length[:, None]
        cols = np.where(valid, ax.start[:, None] + j[None, :], ax.start[:, None])
        return cls(map_shape=(h, w), size=(H, W), y=ay, x=ax, cols=cols, col_valid=valid,
                   col_l0=ax.l0[cols], col_l1=ax.l1[cols],
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
    # smallest and largest of those four map values
    wmax = _pair_reduce(maps, np.maximum)  # (unit, y, x)
    nonnegative = bool(maps.min() >= 0)  # after a ReLU: the window's magnitude is its maximum
    wmin = None if nonnegative else _pair_reduce(maps, np.minimum)
    # float margin relative to the window's own magnitude: an all-zero window of a dead unit stays exactly zero
    margin = wmax * _F32(_MARGIN) if nonnegative else np.maximum(wmax, -wmin) * _F32(_MARGIN)
    t = thresholds[:, None, None]
    uc, yc, xc = np.nonzero(wmax > t - margin)  # windows with any pixel possibly above the threshold
    mc, tc = margin[uc, yc, xc], thresholds[uc]
    if nonnegative:
        xc1, yc1 = np.minimum(xc + 1, w - 1), np.minimum(yc + 1, h - 1)
        cmin = np.minimum(np.minimum(maps[uc, yc, xc], maps[uc, yc, xc1]),
                          np.minimum(maps[uc, yc1, xc], maps[uc, yc1, xc1]))
    else:
        cmin = wmin[uc, yc, xc]
    full = cmin > tc + mc  # every pixel above
    uf, yf, xf = uc[full], yc[full], xc[full]
    ub, yb, xb, mb = uc[~full], yc[~full], xc[~full], mc[~full]  # boundary windows

    # region sums: per window, and column prefix sums for runs of rows
    colcum = np.zeros((n_reg, H + 1, W), np.int32)  # (region, row + 1, x): region pixels in rows < row
    np.cumsum(regions, axis=1, out=colcum[:, 1:])
    ry = np.r_[gy.start, H]
    block_rows = colcum[:, ry[1:]] - colcum[:, ry[:-1]]  # (region, y-seg, x): region pixels per segment column
    wy0 = gy.win_start
    win_rows = colcum[:, wy0 + gy.win_length] - colcum[:, wy0]  # (region, y-window, x)
    win_reg = np.add.reduceat(np.concatenate([win_rows, np.zeros((n_reg, len(wy0), 1), np.int32)], axis=2),
                              np.minimum(gx.win_start, W), axis=2)[:, :, :len(gx.win_start)]
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
        i0y, i1y, i0x, i1x = gy.i0[sy], gy.i1[sy], gx.i0[sx], gx.i1[sx]
        corners = np.stack([maps[u, i0y, i0x], maps[u, i0y, i1x], maps[u, i1y, i0x], maps[u, i1y, i1x]], axis=1)
        _boundary_counts(thresholds, grid, colcum, block_rows, regions, u, sy, sx, corners,
                         mb[rep], area, inter)
    if known_area is not None:
        area = np.asarray(known_area, dtype=np.int64).reshape(n_units).copy()
    return area, inter


def _count_le(lam: np.ndarray, first: np.ndarray, step: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Rows of a segment (first weight, step, length) whose weight l1 is <= lam; ±inf → all or none."""
    with np.errstate(over="ignore", invalid="ignore"):
        k = np.floor((lam - first) / step)
    k += 1
    return np.clip(k, 0, length, out=k).astype(np.int64)


def _pair_reduce(maps: np.ndarray, op) -> np.ndarray:
    """(unit, y, x) → op over each 2×2 window (i, min(i+1, y-1)) × (j, min(j+1, x-1)), same shape."""
    out = np.empty_like(maps)
    rows = op(maps[:, :-1], maps[:, 1:])  # (unit, y-1, x)
    op(rows[:, :, :-1], rows[:, :, 1:], out=out[:, :-1, :-1])
    out[:, :-1, -1] = rows[:, :, -1]
    last = maps[:, -1]  # the last row pairs with itself
    op(last[:, :-1], last[:, 1:], out=out[:, -1, :-1])
    out[:, -1, -1] = last[:, -1]
    return out


def _boundary_counts(thresholds, grid, colcum, block_rows, regions, u, sy, sx, corners, margin, area, inter) -> None:
    """Add the counts of boundary cells (unit u, segments sy, sx) to area (unit,) and inter (region, unit).

    Per column of a cell the value runs linearly from `top` (λ = 0) to `bot` (λ = 1) with the row weight λ: columns
    entirely above or below are counted (or skipped) whole; in the others, the rows surely above form one run found
    from λ, and the rows within the margin of the threshold are evaluated exactly.
    """
    gy = grid.y
    n_units, n_reg = thresholds.shape[0], colcum.shape[0]
    A, B, C, D = corners.T  # float32 (cell,): rows i0/i1 × columns i0/i1
    l0x, l1x = grid.col_l0[sx], grid.col_l1[sx]  # (cell, col)
    # float32 column values at the two source rows: within a rounding of torch's, which the margin covers
    top = l0x * A[:, None] + l1x * B[:, None]  # (cell, col)
    bot = l0x * C[:, None] + l1x * D[:, None]
    t = thresholds[u][:, None]
    mg = margin[:, None]
    hi_v, lo_v = np.maximum(top, bot), np.minimum(top, bot)
    valid = grid.col_valid[sx]
    whole = (lo_v > t + mg) & valid  # every row of the column above
    crossing = (hi_v > t - mg) & valid & ~whole

    # whole columns: the segment's length, and the region's pixels in that column of the segment
    per_cell = whole.sum(axis=1) * gy.length[sy]
    area += np.bincount(u, per_cell, minlength=n_units).astype(np.int64)
    c_w, j_w = np.nonzero(whole)
    x_w = grid.cols[sx[c_w], j_w]
    for r in range(n_reg):
        inter[r] += np.bincount(u[c_w], block_rows[r, sy[c_w], x_w], minlength=n_units).astype(np.int64)

    # crossing columns, flattened: down the column value = top + λ·(bot − top); solve for value = t ± margin
    c_i, j_i = np.nonzero(crossing)
    if c_i.size == 0:
        return
    owner, seg = u[c_i], sy[c_i]
    tp, bt = top[c_i, j_i], bot[c_i, j_i]  # float32: λ below is accurate to ~1e-7, inside the λ slack
    g0 = tp - thresholds[owner]
    slope = bt - tp
    falling = slope < 0
    m = margin[c_i]
    m = np.where(falling, -m, m)
    slope[slope == 0] = np.finfo(np.float32).tiny  # flat: λ bounds become ±inf (all above, all near or all below)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        lam_a = (-m - g0) / slope  # the band's low end in λ
        lam_b = (m - g0) / slope  # its high end
    first, step, length = gy.first[seg], gy.step[seg], gy.length[seg]
    k_a = _count_le(lam_a - gy.slack, first, step, length)  # rows [k_a, k_b) near the threshold: evaluated exactly
    k_b = _count_le(lam_b + gy.slack, first, step, length)
    lo = np.where(falling, 0, k_b)  # rows surely above: after the band when rising, before it when falling
    hi = np.where(falling, k_a, length)
    area += np.bincount(owner, hi - lo, minlength=n_units).astype(np.int64)
    y0 = gy.start[seg]
    x = grid.cols[sx[c_i], j_i]
    for r in range(n_reg):
        inter[r] += np.bincount(owner, colcum[r, y0 + hi, x] - colcum[r, y0 + lo, x],
                                minlength=n_units).astype(np.int64)

    # the rows near the threshold, with torch's exact arithmetic
    k = k_b - k_a
    total = int(k.sum())
    if total == 0:
        return
    rep = np.repeat(np.arange(k.size), k)
    row = y0[rep] + k_a[rep] + (np.arange(total) - np.repeat(np.cumsum(k) - k, k))
    cc, jj = c_i[rep], j_i[rep]
    lx0, lx1 = grid.col_l0[sx[cc], jj], grid.col_l1[sx[cc], jj]
    top_x = _fma32(lx0, A[cc], (lx1 * B[cc]).astype(_F32))
    bot_x = _fma32(lx0, C[cc], (lx1 * D[cc]).astype(_F32))
    val = _fma32(gy.l0[row], top_x, (gy.l1[row] * bot_x).astype(_F32))
    who = owner[rep]
    above = val > thresholds[who]
    area += np.bincount(who, above, minlength=n_units).astype(np.int64)
    xs = x[rep]
    for r in range(n_reg):
        inter[r] += np.bincount(who, above & regions[r, row, xs], minlength=n_units).astype(np.int64)


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
    inter = inter[0]
    return (inter / (area + n - inter)).astype(_F32)


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
        n = int(mask.sum())
        return (inter[0] / (area + n - inter[0])).astype(_F32)


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
