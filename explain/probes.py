"""Concept probes: linear probes (logistic regression) per (concept, layer), each fit an mlflow run.

    >>> from explain.probes import ProbeConfig, region_examples, fit_probe
    >>> ex = region_examples(maps, mask, image=0)        # maps (unit, y, x) of one image, mask bool (Y, X) patch px
    >>> ex = ex + mark_examples(pooled[[3, 9]], [True, False], images=[3, 9])
    >>> fit = fit_probe(ex, concept="mass", layer="features.13")
    >>> fit.probe.heatmap(maps, size=(64, 64))           # (y, x) probability of the concept at every position
    >>> fit.metrics                                       # held-out AUROC / AP, cross-validated choice of C

Examples (DESIGN.md §4) — every example is the vector of one layer's unit values, `(unit,)`:
- drawn regions: the region mask (patch pixels) is reduced to the layer's map grid as the *fraction of each map
  cell it covers* (exact area weights, any patch/grid ratio). A cell covered ≥ `inside` (0.5) is a positive, a cell
  covered ≤ `outside` (0: not touched at all) is a negative, the cells on the border in between are ignored.
  A region too small to fill any cell (calcifications on a coarse layer) is measured against its best-covered
  cell instead: positives are the cells covered ≥ `inside` × that cell's coverage.
- images marked as showing / not showing the concept (`mark_position_examples`): examples are map positions, as
  the probe is scored (an image's score is its heatmap's max over positions). An image marked as not showing the
  concept gives every position as a negative (the concept is nowhere on it); one marked as showing it gives one
  positive, the position whose vector is nearest the image's max-pooled vector (where the units peak together —
  "somewhere in the image"). (`mark_examples` keeps the older form: the max-pooled vector itself, which no single
  position reaches, so a probe trained on it scores real positions lower than it was trained to.)
- background: `background` random positions from `background_images` unannotated images are added as negatives,
  as TCAV contrasts a concept with random images: most of any patch is not the concept, and without them a probe
  drawn from a few lesion patches learns "this lesion vs the tissue around it" and fires on normal patches.
  A probe whose annotations give only positives is still refused (background never stands in for a reviewer).
- labeled units: in the top-k images of each unit labeled with the concept, positions where any labeled unit
  reaches its dataset threshold (the Network-Dissection quantile) are positives; positions where none does and
  that do not touch (8-neighbourhood) a positive are negatives.

Fitting: features are standardized (mean / std over the examples); L2 logistic regression with sklearn's objective
(½‖w‖² + C Σ sᵢ ℓᵢ, sᵢ the sample weights) solved by torch L-BFGS, many models at once. C and class balancing
(weights n/(2 n_class) or none) are chosen by grouped cross-validation (an image's positions never straddle a
fold) on the mean validation AUROC; ties (within 0.005) go to balanced and then to the smaller C. Held-out AUROC
and AP come from a model fitted without a held-out group of images; the probe that is kept is then refitted on
every example. The CAV is the unit-norm normal of the decision boundary in raw activation space.

A probe's heatmap is its probability at every position of the layer's map (upsampled bilinearly to the patch on
request, like a unit mask) and an image's score is the max of its heatmap on the map grid (the concept is
present somewhere); `score="mean"` in ProbeConfig takes the mean instead. The store keeps the current version's
scores (image,) and heatmaps at the layer's grid (image, y, x), attrs naming the mlflow run. A concept probed on
several layers also has one map across them (`concept_heatmap`): the geometric mean of the layers' maps at the
patch size (`combine_heatmaps`), which finds the ground truth better than any single layer's map.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .dissection import DEFAULT_LEVEL, patch_size, resolve_image, unit_cell_weights
from .errors import ProbeDataError

__all__ = [
    "ProbeConfig", "Examples", "Probe", "ProbeFit", "PRESENT",
    "cell_coverage", "upsample", "region_examples", "mark_examples", "mark_position_examples", "unit_examples",
    "fit_logistic", "grouped_folds", "held_out_split", "fit_probe", "auroc", "average_precision",
    "session_run", "log_probe", "load_probe", "probe_versions", "PROBE_EXPERIMENT",
    "ProbeAnnotations", "FeatureCache", "collect_examples", "background_examples", "heatmaps_for_store", "write_probe_version",
    "RetrainResult", "retrain", "rollback", "probe_heatmap", "combine_heatmaps", "concept_layers", "concept_heatmap",
]


@dataclass(frozen=True)
class ProbeConfig:
    """How examples are made and how a probe is fitted. Every field is data; nothing is global."""

    Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)  # regularization grid (sklearn's C: larger = weaker)
    balance: tuple[bool, ...] = (True, False)  # class balancing options tried by cross-validation
    folds: int = 3  # grouped CV folds (fewer when there are fewer images)
    held_out: float = 0.25  # fraction of images held out for the reported metrics
    cv_max_examples: int = 4000  # CV runs on at most this many examples (whole images are kept or dropped)
    cv_max_iter: int = 50  # L-BFGS iterations of the CV fits (they only rank settings)
    inside: float = 0.5  # a map cell covered at least this much by a region is a positive
    outside: float = 0.0  # ... at most this much is a negative; in between: ignored
    max_iter: int = 100  # L-BFGS iterations
    tol: float = 1e-4  # L-BFGS gradient tolerance (on the objective divided by C·Σs)
    background: int = 1000  # random positions of unannotated images added as negatives (TCAV's random set); 0: none
    background_images: int = 100  # … drawn from this many images
    score: str = "max"  # image score from its heatmap: "max" or "mean"
    seed: int = 0
    threads: int | None = 1  # torch threads during a fit (restored after); None: leave torch's setting alone

    def __post_init__(self):
        if not self.Cs or min(self.Cs) <= 0:
            raise ProbeDataError(f"ProbeConfig.Cs must be positive numbers, got {self.Cs}")
        if not 0 <= self.outside < self.inside <= 1:
            raise ProbeDataError(f"ProbeConfig needs 0 <= outside < inside <= 1, got {self.outside}, {self.inside}")
        if self.score not in ("max", "mean"):
            raise ProbeDataError(f"ProbeConfig.score must be 'max' or 'mean', got {self.score!r}")
        if not 0 <= self.held_out < 1:
            raise ProbeDataError(f"ProbeConfig.held_out must be in [0, 1), got {self.held_out}")


# -- examples ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Examples:
    """Training vectors of one layer with their label and the image (group) each comes from."""

    vectors: np.ndarray  # (example, unit) float32
    labels: np.ndarray  # (example,) int8, 1 = concept present
    groups: np.ndarray  # (example,) int64 image index (positions of one image never split across folds)
    counts: dict = field(default_factory=dict)  # source → number of annotations that produced these examples

    def __post_init__(self):
        v = np.asarray(self.vectors, dtype=np.float32)
        if v.ndim != 2:
            raise ProbeDataError(f"example vectors must be (example, unit), got shape {v.shape}")
        y = np.asarray(self.labels, dtype=np.int8).reshape(-1)
        g = np.asarray(self.groups, dtype=np.int64).reshape(-1)
        if not (len(v) == len(y) == len(g)):
            raise ProbeDataError(f"{len(v)} vectors, {len(y)} labels and {len(g)} groups do not match")
        object.__setattr__(self, "vectors", v)
        object.__setattr__(self, "labels", y)
        object.__setattr__(self, "groups", g)

    @classmethod
    def empty(cls, n_units: int) -> "Examples":
        return cls(np.zeros((0, n_units), np.float32), np.zeros(0, np.int8), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __add__(self, other: "Examples") -> "Examples":
        if self.vectors.shape[1] != other.vectors.shape[1]:
            raise ProbeDataError(f"cannot join examples of {self.vectors.shape[1]} and {other.vectors.shape[1]} units")
        counts = dict(self.counts)
        for k, n in other.counts.items():
            counts[k] = counts.get(k, 0) + n
        return Examples(np.concatenate([self.vectors, other.vectors]), np.concatenate([self.labels, other.labels]),
                        np.concatenate([self.groups, other.groups]), counts)

    @property
    def n_positive(self) -> int:
        return int(self.labels.sum())

    @property
    def n_negative(self) -> int:
        return int(len(self.labels) - self.labels.sum())

    @property
    def n_annotations(self) -> int:
        """Annotations behind these examples (background samples are not annotations)."""
        return int(sum(n for k, n in self.counts.items() if k != "background"))


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling (half-pixel centres, as unit masks): (..., y, x) → (..., Y, X) float32."""
    maps = np.asarray(maps, dtype=np.float32)
    if tuple(size) == tuple(maps.shape[-2:]):
        return maps
    lead = maps.shape[:-2]
    maps = np.ascontiguousarray(maps) if maps.flags.writeable else maps.copy()  # a stored, read-only map too
    t = torch.from_numpy(maps).reshape(-1, 1, *maps.shape[-2:])
    out = torch.nn.functional.interpolate(t, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *out.shape[-2:]).numpy()


def _overlap_matrix(n_pixels: int, n_cells: int) -> np.ndarray:
    """(cell, pixel): the fraction of cell i's length that pixel p covers; rows sum to 1."""
    edges = np.arange(n_cells + 1) * (n_pixels / n_cells)
    lo = np.maximum(edges[:-1, None], np.arange(n_pixels)[None, :])
    hi = np.minimum(edges[1:, None], np.arange(1, n_pixels + 1)[None, :])
    return np.clip(hi - lo, 0, None) / (n_pixels / n_cells)


def cell_coverage(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each map cell's area covered by a patch-pixel mask: (Y, X) bool → (y, x) float in [0, 1].

        >>> cell_coverage(np.pad(np.ones((2, 2), bool), ((0, 2), (0, 2))), (2, 2))
        array([[1., 0.], [0., 0.]])

    The map grid tiles the patch evenly (cell i spans [i·Y/y, (i+1)·Y/y) pixels); the weights are exact areas, so
    the result is right for any patch/grid ratio, not only whole multiples.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ProbeDataError(f"a region mask must be (y, x), got shape {m.shape}")
    ry = _overlap_matrix(m.shape[0], grid[0])  # (y, Y)
    rx = _overlap_matrix(m.shape[1], grid[1])  # (x, X)
    return ry @ m.astype(np.float64) @ rx.T  # (y, x)


def region_examples(maps: np.ndarray, mask: np.ndarray, *, image: int, inside: float = 0.5,
                    outside: float = 0.0) -> Examples:
    """Positions of one image inside (positive) and clearly outside (negative) a drawn region.

        >>> ex = region_examples(store.maps("features.13", 7), region_mask, image=7)   # maps (unit, y, x)

    `mask` is bool (Y, X) in patch pixels; cells covered ≥ `inside` × (the best-covered cell's coverage) are
    positives — `inside` itself whenever the region fills a cell —, cells covered ≤ `outside` negatives, the
    border cells in between are left out. An empty mask is an error (nothing to learn from).
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise ProbeDataError(f"image {image}: maps must be (unit, y, x), got shape {maps.shape}")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ProbeDataError(f"image {image}: the region mask is empty")
    cover = cell_coverage(mask, maps.shape[1:])  # (y, x)
    # relative to the best-covered cell, so a region smaller than one cell (a calcification on a coarse layer)
    # still gives positives; for any region that fills a cell this is `inside` itself
    pos = cover >= inside * cover.max()
    neg = cover <= outside
    vectors = maps.reshape(maps.shape[0], -1).T  # (position, unit)
    keep = (pos | neg).reshape(-1)
    labels = pos.reshape(-1)[keep]
    return Examples(vectors[keep], labels, np.full(int(keep.sum()), image), {"regions": 1})


def mark_examples(pooled: np.ndarray, present: Sequence[bool], *, images: Sequence[int]) -> Examples:
    """Images marked as showing (True) or not showing (False) the concept: their max-pooled vectors (image, unit).

        >>> ex = mark_examples(store.pooled("features.13", "max")[idx], [True, False], images=idx)
    """
    pooled = np.asarray(pooled)
    present = np.asarray(present, dtype=bool).reshape(-1)
    images = np.asarray(images, dtype=np.int64).reshape(-1)
    if pooled.ndim != 2 or not (len(pooled) == len(present) == len(images)):
        raise ProbeDataError(f"marks: pooled {pooled.shape}, {len(present)} flags and {len(images)} images differ")
    return Examples(pooled, present, images, {"marks": len(images)})


def mark_position_examples(maps: np.ndarray, present: Sequence[bool], *, images: Sequence[int]) -> Examples:
    """Marked images as position examples, calibrated to per-position scoring (module docstring).

        >>> ex = mark_position_examples(store.maps_many("features.13", idx), [True, False], images=idx)

    `maps` (image, unit, y, x). Not showing: every position is a negative. Showing: one positive, the position
    nearest (Euclidean) to the image's max-pooled vector.
    """
    maps = np.asarray(maps, dtype=np.float32)
    present = np.asarray(present, dtype=bool).reshape(-1)
    images = np.asarray(images, dtype=np.int64).reshape(-1)
    if maps.ndim != 4 or not (len(maps) == len(present) == len(images)):
        raise ProbeDataError(f"marks: maps {maps.shape}, {len(present)} flags and {len(images)} images differ")
    vectors, labels, groups = [], [], []
    for m, shows, image in zip(maps, present, images):
        flat = m.reshape(m.shape[0], -1).T  # (position, unit)
        if shows:
            peak = flat.max(axis=0)
            j = int(np.argmin(((flat - peak) ** 2).sum(axis=1)))
            flat = flat[j:j + 1]
        vectors.append(flat)
        labels.append(np.full(len(flat), int(shows), np.int8))
        groups.append(np.full(len(flat), image, np.int64))
    return Examples(np.concatenate(vectors), np.concatenate(labels), np.concatenate(groups), {"marks": len(images)})


def unit_examples(maps: np.ndarray, units: Sequence[int], thresholds: np.ndarray, *,
                  images: Sequence[int]) -> Examples:
    """Positions where the concept's labeled units fire (positives) and positions far from any firing (negatives).

        >>> ids, _ = store.topk(layer); idx = np.unique(ids[units])
        >>> ex = unit_examples(store.maps_many(layer, idx), units, store.thresholds(layer), images=idx)

    `maps` (image, unit, y, x); a position is positive when any labeled unit reaches its threshold there, negative
    when none does and no 8-neighbour is positive.
    """
    maps = np.asarray(maps)
    units = np.asarray(units, dtype=np.int64).reshape(-1)
    images = np.asarray(images, dtype=np.int64).reshape(-1)
    if maps.ndim != 4 or len(maps) != len(images):
        raise ProbeDataError(f"unit examples: maps {maps.shape} must be (image, unit, y, x) for {len(images)} images")
    if len(units) == 0:
        raise ProbeDataError("unit examples: no labeled units")
    if units.min() < 0 or units.max() >= maps.shape[1]:
        raise ProbeDataError(f"unit examples: units {units.tolist()} outside 0…{maps.shape[1] - 1}")
    thr = np.asarray(thresholds, dtype=np.float32)[units]
    fire = (maps[:, units] >= thr[None, :, None, None]).any(axis=1)  # (image, y, x)
    # grow the firing area by one cell (8-neighbourhood) so the border is left out of the negatives
    padded = np.pad(fire, ((0, 0), (1, 1), (1, 1)))
    h, w = fire.shape[1:]
    near = np.zeros_like(fire)
    for dy in range(3):
        for dx in range(3):
            near |= padded[:, dy:dy + h, dx:dx + w]
    neg = ~near
    vectors = np.moveaxis(maps, 1, -1)  # (image, y, x, unit)
    keep = fire | neg
    return Examples(vectors[keep], fire[keep], np.broadcast_to(images[:, None, None], fire.shape)[keep],
                    {"units": len(units)})


# -- fitting -----------------------------------------------------------------------------------------------------------
FIT_BLOCK_BYTES = 2 << 20  # rows of x per block in fit_logistic: about this many bytes


def fit_logistic(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, Cs: torch.Tensor, *,
                 init: torch.Tensor | None = None, max_iter: int = 100, tol: float = 1e-4,
                 block_rows: int | None = None) -> torch.Tensor:
    """Fit M L2 logistic regressions at once on the same rows; returns (M, unit + 1) = coefficients, intercept.

        >>> theta = fit_logistic(x, y, weights, torch.tensor([0.1, 1.0]))   # x (n, unit), weights (M, n)

    Model m minimizes sklearn's objective ½‖w‖² + C_m Σᵢ weights[m, i]·ℓ(yᵢ, xᵢ·w + b) (intercept not penalized);
    a zero weight leaves a row out of that model. Each objective is divided by C_m Σᵢ weights[m, i] so the models'
    gradients have one scale; the sum over models is separable, so one L-BFGS run solves every model.

    Each evaluation reads x twice (logits, then the gradient), a block of `block_rows` rows at a time, so that the
    second read finds the block still in the CPU's cache (default: blocks of about FIT_BLOCK_BYTES). A single
    model's fit is a matrix-vector product bound by memory bandwidth: on 20,000 × 512 vectors the blocks made a
    probe fit 10–25 % faster on a 2-core AMD EPYC host (blocks of 2 MiB, 1,024 rows at 512 units: the steadiest
    gain of the 1–8 MiB blocks tried).
    """
    n, d = x.shape
    m = weights.shape[0]
    theta = torch.zeros(m, d + 1, dtype=x.dtype) if init is None else init.detach().clone().to(x.dtype)
    theta.requires_grad_(True)
    wsum = weights.sum(dim=1).clamp_min(1e-12)  # (M,)
    scaled = (weights / wsum[:, None]).T.to(x.dtype).contiguous()  # (n, M)
    ridge = 0.5 / (Cs.to(x.dtype) * wsum)  # (M,)
    yf = y.to(x.dtype)[:, None]  # (n, 1)
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"fit_logistic: block_rows must be at least 1, got {block_rows}")
    rows = block_rows or max(64, FIT_BLOCK_BYTES // max(1, d * x.element_size()))
    blocks = [(x[s:s + rows], yf[s:s + rows], scaled[s:s + rows]) for s in range(0, n, rows)]
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=10, tolerance_grad=tol,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        # loss and gradient by hand (two matrix products per block), cheaper than autograd for this one formula
        with torch.no_grad():
            w, b = theta[:, :d], theta[:, d]
            grad = torch.empty_like(theta)
            grad_w = grad[:, :d]
            torch.mul(w, 2 * ridge[:, None], out=grad_w)
            grad_b = torch.zeros(m, dtype=x.dtype)
            loss = (ridge * (w ** 2).sum(dim=1)).sum()
            for xb, yb, sb in blocks:
                z = torch.addmm(b, xb, w.T)  # (rows, M) logits
                # ℓ = softplus(z) − y·z; dℓ/dz = σ(z) − y
                loss += (sb * (torch.nn.functional.softplus(z) - yb * z)).sum()
                g = sb * (torch.sigmoid(z) - yb)  # (rows, M)
                grad_w.addmm_(g.T, xb)
                grad_b += g.sum(dim=0)
            grad[:, d] = grad_b
            theta.grad = grad
        return loss

    opt.step(closure)
    return theta.detach()


def grouped_folds(groups: np.ndarray, n_folds: int, *, seed: int = 0) -> np.ndarray:
    """Fold index per example with every group (image) in exactly one fold; groups shuffled with `seed`.

    Groups are dealt to folds largest first, each to the fold with the fewest examples so far, so folds are of
    similar size even when images give very different numbers of positions.
    """
    uniq, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-sizes[order], kind="stable")]
    fill = np.zeros(n_folds, np.int64)
    fold_of = np.empty(len(uniq), np.int64)
    for g in order:
        f = int(np.argmin(fill))
        fold_of[g] = f
        fill[f] += sizes[g]
    return fold_of[inverse]


def held_out_split(labels: np.ndarray, groups: np.ndarray, fraction: float, *, seed: int = 0) -> np.ndarray | None:
    """Boolean (example,) mask of a held-out set of whole groups, or None when no split leaves both classes on both
    sides (e.g. a single annotated image). Groups are stratified by whether they hold positives."""
    uniq = np.unique(groups)
    if fraction <= 0 or len(uniq) < 2:
        return None
    # whether each group holds a positive, for every group at once (uniq is sorted, as searchsorted needs)
    has_pos = np.bincount(np.searchsorted(uniq, groups), weights=np.asarray(labels, np.float64) > 0,
                          minlength=len(uniq)) > 0
    rng = np.random.default_rng(seed)
    for _ in range(20):
        chosen: list = []
        for kind in (True, False):
            pool = uniq[has_pos == kind]
            if len(pool) < 2:  # a kind with a single image stays in training
                continue
            k = min(max(1, int(round(fraction * len(pool)))), len(pool) - 1)
            chosen.extend(rng.choice(pool, size=k, replace=False).tolist())
        held = np.isin(groups, chosen)
        if held.any() and (~held).any():
            yh, yt = labels[held], labels[~held]
            if yh.min() != yh.max() and yt.min() != yt.max():
                return held
    return None


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve with ties counted half (Mann-Whitney U); NaN when a class is missing."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    # average ranks over ties
    ranks = np.empty(len(s), np.float64)
    bounds = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(s)]])
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under precision-recall, step-wise as sklearn); NaN without positives."""
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    last = np.concatenate([np.flatnonzero(np.diff(s)), [len(s) - 1]])  # the end of each tie block
    tp = tp[last]
    precision = tp / (last + 1)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


PRESENT = 0.5  # an image score from this up says the concept is present (explain.report)


@dataclass(frozen=True)
class Probe:
    """A fitted probe: logit(a) = weights·a + bias on raw activation vectors a of `layer` (unit,)."""

    concept: str
    layer: str
    weights: np.ndarray  # (unit,) float32, raw activation space
    bias: float
    mean: np.ndarray  # (unit,) the standardization used in fitting (kept for the record)
    scale: np.ndarray  # (unit,)
    score_kind: str = "max"
    run_id: str | None = None

    @property
    def cav(self) -> np.ndarray:
        """The concept activation vector: unit-norm normal of the decision boundary, (unit,)."""
        norm = float(np.linalg.norm(self.weights))
        return (self.weights / norm if norm > 0 else self.weights).astype(np.float32)

    def logits(self, vectors: np.ndarray) -> np.ndarray:
        """(..., unit) → (...) logits."""
        return np.asarray(vectors, dtype=np.float32) @ self.weights + np.float32(self.bias)

    def heatmap(self, maps: np.ndarray, *, size: tuple[int, int] | None = None) -> np.ndarray:
        """Concept probability at every position: maps (..., unit, y, x) → (..., y, x) float32 in [0, 1].

        With `size` the probabilities are upsampled to the patch (`upsample`, bilinear) — the same operation the
        app applies to the stored maps, so what is measured is what is shown.
        """
        maps = np.asarray(maps)
        if maps.ndim < 3 or maps.shape[-3] != len(self.weights):
            raise ProbeDataError(f"probe {self.concept}@{self.layer} has {len(self.weights)} units; maps are {maps.shape}")
        w = torch.from_numpy(np.asarray(self.weights, np.float32))
        logits = torch.tensordot(torch.from_numpy(np.ascontiguousarray(maps)).float(), w, dims=([maps.ndim - 3], [0]))
        probs = torch.sigmoid(logits + float(self.bias)).numpy()  # (..., y, x)
        return probs if size is None else upsample(probs, size)

    def score(self, heatmaps: np.ndarray) -> np.ndarray:
        """Image scores from heatmaps (..., y, x) → (...): their max (or mean, by `score_kind`)."""
        h = np.asarray(heatmaps)
        flat = h.reshape(*h.shape[:-2], -1)
        return (flat.max(axis=-1) if self.score_kind == "max" else flat.mean(axis=-1, dtype=np.float64)).astype(np.float32)


@dataclass(frozen=True)
class ProbeFit:
    """A probe with what its fit measured: held-out metrics, CV choice and example counts."""

    probe: Probe
    params: dict  # C, balanced, folds, …
    metrics: dict  # auroc, ap (held out; NaN without a usable split), cv_auroc, train_auroc
    n_positive: int
    n_negative: int
    n_images: int
    n_annotations: int


def _class_weights(y: np.ndarray, balanced: bool) -> np.ndarray:
    if not balanced:
        return np.ones(len(y), np.float32)
    n_pos = max(int(y.sum()), 1)
    n_neg = max(len(y) - int(y.sum()), 1)
    return np.where(y == 1, len(y) / (2.0 * n_pos), len(y) / (2.0 * n_neg)).astype(np.float32)


def _cv_subset(examples_groups: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Indices of whole groups, shuffled, until `limit` examples."""
    n = len(examples_groups)
    if n <= limit:
        return np.arange(n)
    uniq, inverse, sizes = np.unique(examples_groups, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(uniq))
    take = np.zeros(len(uniq), bool)
    total = 0
    for g in order:
        if total >= limit:
            break
        take[g] = True
        total += sizes[g]
    idx = np.flatnonzero(take[inverse])
    if len(idx) > 2 * limit:  # one huge image: sample positions within it
        idx = np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))
    return idx


def _select(x: torch.Tensor, y: np.ndarray, groups: np.ndarray,
            config: ProbeConfig) -> tuple[float, bool, float, torch.Tensor | None]:
    """Choose (C, balanced) by grouped CV; returns them with the chosen mean validation AUROC (NaN: no CV) and the
    chosen setting's parameters averaged over folds (a warm start for the final fits, None without CV)."""
    default = (1.0 if 1.0 in config.Cs else config.Cs[len(config.Cs) // 2], config.balance[0])
    n_groups = len(np.unique(groups))
    n_folds = min(config.folds, n_groups)
    if n_folds < 2 or (len(config.Cs) == 1 and len(config.balance) == 1):
        return (*default, float("nan"), None)
    idx = _cv_subset(groups, config.cv_max_examples, config.seed)
    xs, ys, gs = x[idx], y[idx], groups[idx]
    folds = grouped_folds(gs, n_folds, seed=config.seed)
    combos = [(c, b) for b in config.balance for c in config.Cs]
    rows, cs = [], []
    for f in range(n_folds):
        train = folds != f
        for c, b in combos:
            w = np.zeros(len(ys), np.float32)
            w[train] = _class_weights(ys[train], b)
            rows.append(w)
            cs.append(c)
    weights = torch.from_numpy(np.stack(rows))
    theta = fit_logistic(xs, torch.from_numpy(ys), weights, torch.tensor(cs), max_iter=config.cv_max_iter,
                         tol=config.tol)
    logits = (xs @ theta[:, :-1].T + theta[:, -1]).numpy()  # (n, M)
    scores = np.full((n_folds, len(combos)), np.nan)
    for f in range(n_folds):
        val = folds == f
        for j in range(len(combos)):
            scores[f, j] = auroc(ys[val], logits[val, f * len(combos) + j])
    if np.isnan(scores).all():
        return (*default, float("nan"), None)
    mean = np.nanmean(scores, axis=0)
    best = np.nanmax(mean)
    # ties → balanced first, then the smallest C (most regularized)
    candidates = [j for j in range(len(combos)) if mean[j] >= best - 0.005]
    j = min(candidates, key=lambda j: (not combos[j][1], combos[j][0]))
    start = theta[[f * len(combos) + j for f in range(n_folds)]].mean(dim=0)
    return combos[j][0], combos[j][1], float(mean[j]), start


@contextmanager
def _torch_threads(n: int | None):
    """Run with `n` torch threads, then restore: small fits are latency-bound and extra threads only contend
    (on a busy 2-core machine two threads made a fit 10× slower). Process-wide while it lasts."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_probe(examples: Examples, *, concept: str, layer: str, config: ProbeConfig | None = None,
              init: Probe | None = None) -> ProbeFit:
    """Fit one probe: CV choice of C and balancing, held-out metrics, final refit on every example.

        >>> fit = fit_probe(region_examples(maps, mask, image=0), concept="mass", layer="features.13")

    Raises ProbeDataError (naming the concept and layer) when the examples hold only one class.
    `init` (a previous version of the same probe) warm-starts the final fits; otherwise they start from the
    cross-validated model of the chosen setting.
    """
    config = config or ProbeConfig()
    with _torch_threads(config.threads):
        return _fit_probe(examples, concept=concept, layer=layer, config=config, init=init)


def _fit_probe(examples: Examples, *, concept: str, layer: str, config: ProbeConfig, init: Probe | None) -> ProbeFit:
    where = f"probe {concept}@{layer}"
    if len(examples) == 0:
        raise ProbeDataError(f"{where}: no examples")
    n_pos, n_neg = examples.n_positive, examples.n_negative
    if n_pos == 0 or n_neg == 0:
        which = "positives" if n_neg == 0 else "negatives"
        raise ProbeDataError(f"{where}: only {which} ({n_pos} positive, {n_neg} negative examples); "
                             "a probe needs both")
    v = examples.vectors
    y = examples.labels.astype(np.float32)
    groups = examples.groups
    mean = v.mean(axis=0, dtype=np.float64)
    std = v.std(axis=0, dtype=np.float64)
    scale = np.where(std > 1e-8, std, 1.0)
    x = torch.from_numpy(((v - mean) / scale).astype(np.float32))  # (example, unit) standardized
    previous = None
    if init is not None and len(init.weights) == v.shape[1]:
        # the previous version in this fit's standardized space: w_z = w·scale, b_z = b + w·mean
        wz = init.weights * scale
        bz = init.bias + float(init.weights @ mean)
        previous = torch.from_numpy(np.concatenate([wz, [bz]]).astype(np.float32))
    C, balanced, cv_auroc, start = _select(x, examples.labels, groups, config)

    held = held_out_split(examples.labels, groups, config.held_out, seed=config.seed)
    rows = [_class_weights(examples.labels, balanced)]
    if held is not None:
        w = np.zeros(len(y), np.float32)
        w[~held] = _class_weights(examples.labels[~held], balanced)
        rows.append(w)
    theta0 = None if start is None else start.repeat(len(rows), 1)
    if previous is not None:
        theta0 = previous.repeat(len(rows), 1)
    # one L-BFGS run per model: jointly, the shared line search lets the slower model hold back the other
    yt, Ct = torch.from_numpy(y), torch.tensor([C])
    thetas = []
    for m in (range(len(rows))[::-1]):  # the held-out model first; it warm-starts the model of every example
        init_m = thetas[-1][None] if thetas else (None if theta0 is None else theta0[m:m + 1])
        thetas.append(fit_logistic(x, yt, torch.from_numpy(rows[m])[None], Ct, init=init_m,
                                   max_iter=config.max_iter, tol=config.tol)[0])
    theta = torch.stack(thetas[::-1])  # (model, unit + 1): row 0 every example, row 1 without the held-out images
    logits = (x @ theta[:, :-1].T + theta[:, -1]).numpy()  # (example, model)
    metrics = {"cv_auroc": cv_auroc, "train_auroc": auroc(examples.labels, logits[:, 0])}
    if held is not None:
        metrics["auroc"] = auroc(examples.labels[held], logits[held, 1])
        metrics["ap"] = average_precision(examples.labels[held], logits[held, 1])
    else:
        metrics["auroc"] = metrics["ap"] = float("nan")
    wz = theta[0, :-1].numpy().astype(np.float64)
    bz = float(theta[0, -1])
    weights = (wz / scale).astype(np.float32)  # back to raw activations: logit = w·a + b
    bias = bz - float((wz * mean / scale).sum())
    probe = Probe(concept=concept, layer=layer, weights=weights, bias=bias, mean=mean.astype(np.float32),
                  scale=scale.astype(np.float32), score_kind=config.score)
    params = {"C": C, "balanced": balanced, "folds": min(config.folds, len(np.unique(groups))),
              "held_out_images": 0 if held is None else int(len(np.unique(groups[held]))),
              "inside": config.inside, "outside": config.outside, "score": config.score, "seed": config.seed,
              "Cs": ",".join(f"{c:g}" for c in config.Cs), "n_units": int(v.shape[1])}
    return ProbeFit(probe=probe, params=params, metrics=metrics, n_positive=n_pos, n_negative=n_neg,
                    n_images=int(len(np.unique(groups))), n_annotations=examples.n_annotations)


# -- tracking: every fit is an mlflow run under the review session's parent run ----------------------------------------
PROBE_EXPERIMENT = "conceptlens-probes"
TAG_KIND = "conceptlens.kind"  # "session" (a review session's parent run) or "probe"
TAG_SESSION = "conceptlens.session"
TAG_CONCEPT = "conceptlens.concept"
TAG_LAYER = "conceptlens.layer"
TAG_STORE = "conceptlens.store"
ARTIFACT_DIR = "probe"  # weights.npy, bias.npy, cav.npy, mean.npy, scale.npy


def _tracking(settings, experiment: str):
    from training.registry import open_tracking

    return open_tracking(settings, experiment)


def _quote(value: str) -> str:
    if "'" in value:
        raise ProbeDataError(f"names used in mlflow searches may not contain a quote: {value!r}")
    return value


def session_run(session: str, *, settings, experiment: str = PROBE_EXPERIMENT, tracking=None) -> str:
    """The run id of review session `session`'s parent run, created on first use.

        >>> parent = session_run("alice-2025-06-01", settings=settings)

    When two processes race to create it, both later use the oldest one (the search is ordered by start time).
    `tracking`: an open (MlflowClient, experiment id) to reuse (retrain opens the tracking store once per call).
    """
    client, exp_id = tracking or _tracking(settings, experiment)
    flt = f"tags.`{TAG_KIND}` = 'session' and tags.`{TAG_SESSION}` = '{_quote(session)}'"
    found = client.search_runs([exp_id], filter_string=flt, order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=f"session {session}", tags={TAG_KIND: "session", TAG_SESSION: session})
    found = client.search_runs([exp_id], filter_string=flt, order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else run.info.run_id


def log_probe(fit: ProbeFit, *, settings, session: str, store: str = "", tcav: dict | None = None,
              experiment: str = PROBE_EXPERIMENT, tags: dict | None = None, tracking=None,
              parent: str | None = None) -> str:
    """Record one fit as an mlflow run nested under the session's run; returns the run id (also set on the probe).

        >>> run_id = log_probe(fit, settings=settings, session="alice", store="demo", tcav={"lesion": 0.83})

    Params: C, balancing, folds, counts. Metrics: held-out auroc / ap, cv_auroc, train_auroc, n_positive,
    n_negative, n_images, n_annotations, tcav/<class> (CAV at every position, = captum's TCAV) and
    tcav/local/<class> (CAV where the probe fires; explain.tcav). Artifacts (numpy .npy, never pickle) under `probe/`.
    `tracking` (an open (MlflowClient, experiment id)) and `parent` (the session's run id) spare the look-ups when
    the caller already has them: four round trips per run (create with every tag, one batch of params and
    metrics, the artifacts in one copy to the run's artifact location, the final status).
    """
    client, exp_id = tracking or _tracking(settings, experiment)
    if parent is None:
        parent = session_run(session, settings=settings, experiment=experiment, tracking=(client, exp_id))
    p = fit.probe
    run = client.create_run(exp_id, run_name=f"{p.concept}@{p.layer}", tags=_probe_tags(fit, session, store, parent,
                                                                                         tags))
    run_id = run.info.run_id
    try:
        _log_probe_data(client, run, fit, tcav)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def _probe_tags(fit: ProbeFit, session: str, store: str, parent: str, extra: dict | None) -> dict:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    p = fit.probe
    return {**dict(extra or {}), TAG_KIND: "probe", TAG_SESSION: session, TAG_CONCEPT: p.concept, TAG_LAYER: p.layer,
            TAG_STORE: store, MLFLOW_PARENT_RUN_ID: parent, "conceptlens.n_annotations": str(fit.n_annotations)}


def _log_probe_data(client, run, fit: ProbeFit, tcav: dict | None) -> None:
    """Params and metrics in one batch, then the numpy artifacts written once into the run's artifact location
    (the repository comes from the run just created, not from another look-up of the run)."""
    import tempfile
    import time
    from pathlib import Path

    from mlflow.entities import Metric, Param
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    p = fit.probe
    params = {**fit.params, "concept": p.concept, "layer": p.layer}
    counts = {"n_positive": fit.n_positive, "n_negative": fit.n_negative, "n_images": fit.n_images,
              "n_annotations": fit.n_annotations}
    metrics = {**fit.metrics, **counts, **{f"tcav/{k}": v for k, v in (tcav or {}).items()}}
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in params.items()])
    with tempfile.TemporaryDirectory(prefix="conceptlens-probe-") as tmp:
        d = Path(tmp) / ARTIFACT_DIR
        d.mkdir()
        for name, arr in (("weights", p.weights), ("bias", np.float32(p.bias)), ("cav", p.cav),
                          ("mean", p.mean), ("scale", p.scale)):
            np.save(d / f"{name}.npy", np.asarray(arr, dtype=np.float32), allow_pickle=False)
        repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=client.tracking_uri)
        repo.log_artifacts(str(d), artifact_path=ARTIFACT_DIR)


def load_probe(run_id: str, *, settings, experiment: str = PROBE_EXPERIMENT) -> Probe:
    """Rebuild a probe version from its run's numpy artifacts (np.load with allow_pickle=False).

        >>> probe = load_probe(run_id, settings=settings)

    A probe version never changes once logged, so each is read from the tracking store once per process (the
    last 256 kept): the image report loads every stored probe for its contributions each time it is drawn, and
    reading one back from mlflow took about 30 ms (a report with 9 probes: 0.27 s, 0.06 s once read).
    """
    return _read_probe(str(run_id), settings, experiment)


@functools.lru_cache(maxsize=256)  # settings is a frozen dataclass: the key is (run id, workspace, experiment)
def _read_probe(run_id: str, settings, experiment: str) -> Probe:
    import tempfile
    from pathlib import Path

    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client, _ = _tracking(settings, experiment)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ProbeDataError(f"no probe run {run_id!r} at the tracking store") from None
    tags = run.data.tags
    if tags.get(TAG_KIND) != "probe":
        raise ProbeDataError(f"run {run_id!r} is not a probe fit (tag {TAG_KIND}={tags.get(TAG_KIND)!r})")
    with tempfile.TemporaryDirectory(prefix="conceptlens-probe-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_DIR, dst_path=tmp,
                                                             tracking_uri=settings.tracking_uri))
            arrays = {n: np.load(local / f"{n}.npy", allow_pickle=False)
                      for n in ("weights", "bias", "mean", "scale")}
        except (MlflowException, OSError, ValueError) as e:
            raise ProbeDataError(f"probe run {run_id!r}: unreadable artifacts ({e})") from None
    return Probe(concept=tags[TAG_CONCEPT], layer=tags[TAG_LAYER], weights=arrays["weights"].astype(np.float32),
                 bias=float(arrays["bias"]), mean=arrays["mean"], scale=arrays["scale"],
                 score_kind=run.data.params.get("score", "max"), run_id=run_id)


def probe_versions(concept: str, layer: str, *, settings, store: str | None = None,
                   experiment: str = PROBE_EXPERIMENT) -> list[dict]:
    """Every fitted version of probe (concept, layer), newest first, with its metrics and annotation count.

        >>> [(v["run_id"], v["auroc"], v["n_annotations"]) for v in probe_versions("mass", "features.13", settings=s)]
    """
    client, exp_id = _tracking(settings, experiment)
    flt = (f"tags.`{TAG_KIND}` = 'probe' and tags.`{TAG_CONCEPT}` = '{_quote(concept)}' "
           f"and tags.`{TAG_LAYER}` = '{_quote(layer)}'")
    if store is not None:
        flt += f" and tags.`{TAG_STORE}` = '{_quote(store)}'"
    runs = client.search_runs([exp_id], filter_string=flt, order_by=["attributes.start_time DESC"],
                              max_results=1000)
    out = []
    for r in runs:
        m = r.data.metrics
        out.append({
            "run_id": r.info.run_id, "start_time": r.info.start_time, "status": r.info.status,
            "session": r.data.tags.get(TAG_SESSION), "store": r.data.tags.get(TAG_STORE),
            "parent_run_id": r.data.tags.get("mlflow.parentRunId"),
            "auroc": m.get("auroc"), "ap": m.get("ap"), "cv_auroc": m.get("cv_auroc"),
            "n_positive": int(m.get("n_positive", 0)), "n_negative": int(m.get("n_negative", 0)),
            "n_images": int(m.get("n_images", 0)), "n_annotations": int(m.get("n_annotations", 0)),
            "C": r.data.params.get("C"), "balanced": r.data.params.get("balanced"),
            "tcav": {k.removeprefix("tcav/"): v for k, v in m.items()
                     if k.startswith("tcav/") and not k.startswith("tcav/local/")},
            "tcav_local": {k.removeprefix("tcav/local/"): v for k, v in m.items() if k.startswith("tcav/local/")},
        })
    return out


# -- bound to the activation store: annotations → probes → stored scores and heatmaps --------------------------------
@dataclass(frozen=True)
class ProbeAnnotations:
    """Everything a reviewer said about one concept, in store terms (images by index or id).

        >>> ann = ProbeAnnotations("mass", regions=[("img-3a", mask)], marks=[(17, False)],
        ...                        units={"features.13": [4, 88]})
    """

    concept: str
    regions: Sequence[tuple] = ()  # (image, bool mask (Y, X) in patch pixels) — the concept drawn on the image
    marks: Sequence[tuple] = ()  # (image, shows the concept: bool)
    units: dict = field(default_factory=dict)  # layer → unit indices labeled with the concept

    @property
    def n_annotations(self) -> int:
        return len(self.regions) + len(self.marks) + sum(len(u) for u in self.units.values())


class FeatureCache:
    """One store's layer maps kept in memory (float16, each image's read on first use) so each retrain reads no
    chunk.

        >>> cache = FeatureCache(store, settings=s)     # or model=loaded; either gives TCAV scores
        >>> retrain(store, ann, settings=s, session="alice", cache=cache)

    Keep one per process (an app worker) and pass it to every call: the first retrain of a layer loads all its maps
    (seconds on the demo store), later ones read none. It also remembers the last probe of each (concept, layer)
    to warm-start the next fit. With `settings` and no `model`, the store's own model (attrs["model"]["model_uri"])
    is loaded on first use to compute TCAV sensitivities; if it cannot be, runs carry the reason in a tag.
    """

    def __init__(self, store, *, model=None, settings=None, tcav_per_class: int = 64):
        self.store = store
        self.model = model
        self.settings = settings  # with it (and no model), the store's own model is loaded for TCAV on first use
        self.tcav_note = ""  # why TCAV scores are missing, when they are
        self.tcav_per_class = tcav_per_class
        self._maps: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # layer → (float16 maps, which rows are loaded)
        self._cells: dict[tuple[str, float], dict[int, np.ndarray]] = {}  # (layer, level) → {image: weights}
        self._sens: dict = {}
        self.last: dict[tuple[str, str], Probe] = {}
        # probes fitted from a set of drawings, by its digest (explain.labelrules.ProbeAssistedRule: a rule rebuilt
        # after each drawing refits only the concept just drawn)
        self.drawing_fits: dict[str, Probe] = {}

    def maps(self, layer: str) -> np.ndarray:
        """float16 (image, unit, y, x) of every image."""
        self.load(layer, np.arange(self.store.n_images))
        return self._maps[layer][0]

    def load(self, layer: str, images: Sequence[int]) -> None:
        """Read the maps of `images` not yet in memory (one read of the store), and keep them: a few hundred images
        are read in a fraction of the seconds that the whole layer takes, and `image_maps` then serves them."""
        if layer not in self._maps:
            units, h, w = self.store.layer_shape(layer)  # unknown layer → the store's error, naming it
            # memory pages are only taken by the rows written; two threads starting together keep the same arrays
            self._maps.setdefault(layer, (np.empty((self.store.n_images, units, h, w), np.float16),
                                          np.zeros(self.store.n_images, dtype=bool)))
        maps, loaded = self._maps[layer]
        idx = np.unique(np.asarray(images, dtype=np.int64).reshape(-1))
        in_range = len(idx) == 0 or (idx[0] >= 0 and idx[-1] < len(loaded))
        todo = idx[~loaded[idx]] if in_range else idx  # out of range: the store's read names the bad index
        if len(todo):
            maps[todo] = self.store.maps_many(layer, todo)
            loaded[todo] = True

    def image_maps(self, layer: str, images: Sequence[int]) -> np.ndarray:
        """float32 (image, unit, y, x) of some images, from the float16 copy kept in memory (`load`ed first when
        missing): what a cache serves does not depend on what it was asked before."""
        idx = np.asarray(images, dtype=np.int64)
        self.load(layer, idx)
        return self._maps[layer][0][idx].astype(np.float32)

    def cell_weights(self, layer: str, images: Sequence[int], level: float = DEFAULT_LEVEL, *,
                     block: int = 64) -> np.ndarray:
        """float32 (image, unit, y, x): explain.dissection.unit_cell_weights of some images at the `level` unit
        thresholds, computed once per image and kept (explain.labelrules.ProbeAssistedRule reads them after each
        drawing; about 2.7 ms an image for the demo's 128 units on 2 cores)."""
        kept = self._cells.setdefault((layer, float(level)), {})
        idx = np.asarray(images, dtype=np.int64).reshape(-1)
        todo = [int(i) for i in dict.fromkeys(idx.tolist()) if int(i) not in kept]
        if todo:
            thresholds = np.asarray(self.store.thresholds(layer, level), dtype=np.float32)
            size = patch_size(self.store)
            for start in range(0, len(todo), block):
                part = todo[start:start + block]
                for i, k in zip(part, unit_cell_weights(self.image_maps(layer, part), thresholds, size)):
                    kept[i] = k
        units, h, w = self.store.layer_shape(layer)
        if len(idx) == 0:
            return np.zeros((0, units, h, w), np.float32)
        return np.stack([kept[int(i)] for i in idx])

    def sensitivities(self, layer: str):
        """TCAV class sensitivities of a layer (None without a model), computed once."""
        if self.model is None and self.settings is not None and not self.tcav_note:
            from training.errors import TrainingError
            from training.registry import load_model

            uri = (self.store.attrs.get("model") or {}).get("model_uri")
            try:
                self.model = load_model(uri, settings=self.settings)
            except (TrainingError, TypeError) as e:
                self.tcav_note = f"model {uri!r} of the store could not be loaded: {e}"
        if self.model is None:
            self.tcav_note = self.tcav_note or "no model given"
            return None
        if layer not in self._sens:
            from .tcav import store_sensitivities

            self._sens[layer] = store_sensitivities(self.store, self.model, layer, per_class=self.tcav_per_class)
        return self._sens[layer]


def _image_index(store, image) -> int:
    """An image id or index → its index (explain.dissection.resolve_image: UnknownImageError otherwise)."""
    return resolve_image(store, image)


def collect_examples(store, layer: str, annotations: ProbeAnnotations, *, config: ProbeConfig | None = None,
                     cache: FeatureCache | None = None, background_pool: Sequence[int] | None = None) -> Examples:
    """The examples of one layer from every kind of annotation, plus background negatives (module docstring: how
    each kind is turned into positives and negatives).

        >>> ex = collect_examples(store, "features.13", ann)

    Raises ProbeDataError (naming concept and layer) when the annotations give only positives or only negatives.
    background_pool: the images background positions may come from (default: every image of the store); the
    annotated images are never used.
    """
    config = config or ProbeConfig()
    cache = cache or FeatureCache(store)
    ex = _annotation_examples(store, layer, annotations, config=config, cache=cache)
    if len(ex) and (ex.n_positive == 0 or ex.n_negative == 0):
        which = "positives" if ex.n_negative == 0 else "negatives"
        raise ProbeDataError(f"probe {annotations.concept}@{layer}: only {which} ({ex.n_positive} positive, "
                             f"{ex.n_negative} negative examples from {annotations.n_annotations} annotations)")
    if len(ex) and config.background > 0:
        pool = np.arange(store.n_images) if background_pool is None else np.asarray(background_pool, np.int64)
        pool = np.setdiff1d(pool, np.unique(ex.groups))
        ex = ex + background_examples(store, layer, pool, n=config.background, images=config.background_images,
                                      seed=config.seed, cache=cache)
    return ex


def background_examples(store, layer: str, pool: np.ndarray, *, n: int, images: int, seed: int = 0,
                        cache: FeatureCache | None = None) -> Examples:
    """`n` random positions (as negatives) from `images` random images of `pool`, chosen with `seed`."""
    cache = cache or FeatureCache(store)
    units_n, gy, gx = store.layer_shape(layer)
    pool = np.asarray(pool, np.int64)
    if len(pool) == 0 or n <= 0:
        return Examples.empty(units_n)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(pool, size=min(images, len(pool)), replace=False))
    maps = cache.image_maps(layer, idx)  # (image, unit, y, x)
    flat = np.moveaxis(maps, 1, -1).reshape(-1, units_n)  # (image·position, unit)
    take = np.sort(rng.choice(len(flat), size=min(n, len(flat)), replace=False))
    groups = np.repeat(idx, gy * gx)[take]
    return Examples(flat[take], np.zeros(len(take), np.int8), groups, {"background": len(take)})


def _annotation_examples(store, layer: str, annotations: ProbeAnnotations, *, config: ProbeConfig,
                         cache: FeatureCache) -> Examples:
    units_n, gy, gx = store.layer_shape(layer)
    ex = Examples.empty(units_n)
    if annotations.regions:
        idx = [_image_index(store, im) for im, _ in annotations.regions]
        maps = cache.image_maps(layer, idx)  # (region, unit, y, x)
        size = tuple(store.attrs.get("input_size") or np.asarray(store.image(idx[0])).shape)
        for (image, mask), i, m in zip(annotations.regions, idx, maps):
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != tuple(size):
                raise ProbeDataError(f"image {image!r}: region mask {mask.shape} is not the patch size {tuple(size)}")
            ex = ex + region_examples(m, mask, image=i, inside=config.inside, outside=config.outside)
    if annotations.marks:
        idx = [_image_index(store, im) for im, _ in annotations.marks]
        ex = ex + mark_position_examples(cache.image_maps(layer, idx), [bool(p) for _, p in annotations.marks],
                                         images=idx)
    units = list(annotations.units.get(layer, ()))
    if units:
        if min(units) < 0 or max(units) >= units_n:
            from .errors import UnknownUnitError

            bad = [u for u in units if not 0 <= u < units_n]
            raise UnknownUnitError(bad[0], where=f"layer {layer!r} of {units_n} units")
        top, _ = store.topk(layer)
        idx = np.unique(top[units].reshape(-1))
        idx = idx[idx >= 0]
        ex = ex + unit_examples(cache.image_maps(layer, idx), units, store.thresholds(layer), images=idx)
    return ex


def heatmaps_for_store(store, probe: Probe, *, cache: FeatureCache | None = None,
                       batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32 (image,), heatmaps float16 (image, y, x)) of a probe over every image of the store."""
    cache = cache or FeatureCache(store)
    maps = cache.maps(probe.layer)  # (image, unit, y, x) float16
    n, u, h, w_ = maps.shape
    w = torch.from_numpy(np.asarray(probe.weights, np.float32))
    out = np.empty((n, h, w_), np.float16)
    # small batches: the float16 → float32 copy stays in cache; (unit,) @ (image, unit, position) is a plain matmul
    for i in range(0, n, batch):
        m = torch.from_numpy(maps[i:i + batch]).reshape(-1, u, h * w_).float()
        out[i:i + batch] = torch.sigmoid(torch.matmul(w, m) + float(probe.bias)).reshape(-1, h, w_).numpy()
    return probe.score(out), out


def write_probe_version(store, probe: Probe, *, run_id: str, cache: FeatureCache | None = None,
                        attrs: dict | None = None) -> np.ndarray:
    """Compute a probe's scores and heatmaps for every image and store them tagged with `run_id`; returns scores."""
    scores, maps = heatmaps_for_store(store, probe, cache=cache)
    _store_probe(store, probe, scores, maps, run_id=run_id, attrs=attrs)
    return scores


def _store_probe(store, probe: Probe, scores: np.ndarray, maps: np.ndarray, *, run_id: str, attrs: dict | None):
    store.write_probe(probe.concept, probe.layer, scores=scores, maps=maps, run_id=run_id,
                      attrs={"score": probe.score_kind, "maps": "probability at the layer's grid",
                             **dict(attrs or {})})


@dataclass(frozen=True)
class RetrainResult:
    """One retrained probe: its fit, its mlflow run and the time each step took (seconds)."""

    concept: str
    layer: str
    run_id: str
    fit: ProbeFit
    scores: np.ndarray  # (image,)
    timings: dict


def retrain(store, annotations: ProbeAnnotations, *, settings, session: str, layers: Sequence[str] | None = None,
            config: ProbeConfig | None = None, cache: FeatureCache | None = None, store_name: str | None = None,
            experiment: str = PROBE_EXPERIMENT) -> list[RetrainResult]:
    """Refit the probes of `annotations.concept` that the annotations touch, log each fit, store their outputs.

        >>> res = retrain(store, ann, settings=s, session="alice", cache=cache)   # after every new annotation
        >>> res[0].run_id, res[0].fit.metrics["auroc"], res[0].timings

    Layers (the affected probes): `layers`; by default the layers where this concept already has a probe or has
    labeled units — and, for a concept's first regions or marks, every layer of the store.
    Every layer's examples are collected and checked first: when any probe would have only positives or only
    negatives, ProbeDataError is raised and nothing (store, mlflow) changes.
    The layers are fitted one after the other on the calling thread; then two helper threads log the mlflow runs
    and write the store outputs of every layer at once (a layer's store write waits for its run); the call returns
    once every layer is logged and stored. `timings` are each step's own seconds, so log and write overlap.
    """
    config = config or ProbeConfig()
    with _torch_threads(config.threads):
        return _retrain(store, annotations, settings=settings, session=session, layers=layers, config=config,
                        cache=cache or FeatureCache(store, settings=settings), store_name=store_name,
                        experiment=experiment)


def _retrain(store, annotations: ProbeAnnotations, *, settings, session: str, layers, config: ProbeConfig,
             cache: FeatureCache, store_name: str | None, experiment: str) -> list[RetrainResult]:
    import time
    from concurrent.futures import ThreadPoolExecutor

    if layers is None:
        existing = {l for c, l in store.probes() if c == annotations.concept}
        with_units = {l for l in store.layers if annotations.units.get(l)}
        if annotations.regions or annotations.marks:
            chosen = (existing | with_units) or set(store.layers)
        else:
            chosen = with_units
        layers = [l for l in store.layers if l in chosen]
    for layer in annotations.units:
        if layer not in store.layers:
            from .errors import UnknownLayerError

            raise UnknownLayerError(layer, known=store.layers, where=str(store.url))
    collected = {}
    for layer in layers:
        t0 = time.perf_counter()
        ex = collect_examples(store, layer, annotations, config=config, cache=cache)  # one class → ProbeDataError
        if len(ex) == 0:
            continue
        collected[layer] = (ex, time.perf_counter() - t0)
    if not collected:
        raise ProbeDataError(f"probe {annotations.concept}: no examples on layers {list(layers)}")
    # everything the helper threads read is loaded here, so they only read memory and only this thread reads the
    # store (the first call of a process loads the layer maps and the model's TCAV gradients)
    sens = {}
    for layer in collected:
        cache.maps(layer)
        sens[layer] = cache.sensitivities(layer)
    tracking = _tracking(settings, experiment)
    name = store_name or _store_name(store)
    concept = annotations.concept
    # The fits run first, alone: an L-BFGS fit is thousands of small torch calls that each need the GIL, and any
    # Python running beside it (mlflow's SQLAlchemy, zarr) slowed the fits more than overlapping saved (measured:
    # three fits 0.23 s alone, 0.5 s beside the logging of the layer before). Only the session's parent run is
    # looked up meanwhile (a query or two). Then two helper threads publish every layer at once:
    #   log:    tcav + run 1 | tcav + run 2 | tcav + run 3
    #   write:  heatmaps 1, (run 1 logged) store 1 | heatmaps 2, (run 2 logged) store 2 | …
    # so the mlflow round trips overlap the heatmaps and store writes. A layer's store write waits for its run, so
    # the store never names a run that is not complete; a failed run leaves the layers before it written and the
    # ones after it unlogged and unwritten, as one by one did; a failed fit leaves every layer untouched.
    with ThreadPoolExecutor(1, thread_name_prefix="conceptlens-probe-log") as log_pool, \
            ThreadPoolExecutor(1, thread_name_prefix="conceptlens-probe-write") as write_pool:
        parent = log_pool.submit(session_run, session, settings=settings, experiment=experiment, tracking=tracking)
        fits = []
        for layer, (ex, t_collect) in collected.items():
            t = {"collect": t_collect}
            t0 = time.perf_counter()
            fit = fit_probe(ex, concept=concept, layer=layer, config=config, init=cache.last.get((concept, layer)))
            t["fit"] = time.perf_counter() - t0
            fits.append((layer, fit, t))
        pending, previous = [], None
        for layer, fit, t in fits:
            logged = log_pool.submit(_tcav_and_log, fit, sens[layer], cache, t, settings=settings, session=session,
                                     store=name, experiment=experiment, tracking=tracking, parent=parent,
                                     previous=previous)
            previous = logged
            written = write_pool.submit(_write_logged, store, fit.probe, logged, cache, t,
                                        attrs={"n_annotations": fit.n_annotations, "session": session})
            pending.append((layer, fit, logged, written, t))
        results = []
        for layer, fit, logged, written, t in pending:
            run_id, scores = logged.result(), written.result()
            probe = replace(fit.probe, run_id=run_id)
            cache.last[(concept, layer)] = probe
            results.append(RetrainResult(concept, layer, run_id, replace(fit, probe=probe), scores, t))
    return results


def _tcav_and_log(fit: ProbeFit, sens, cache: FeatureCache, t: dict, *, settings, session: str, store: str,
                  experiment: str, tracking, parent, previous) -> str:
    """TCAV scores of a fit (None without a model: the run's tag says why), then its mlflow run; returns the run id.

    `previous`: the future of the layer before; when its run failed, this one raises the same error unlogged (and so
    its store write never happens), as the layers after a failure were never reached one by one."""
    import time

    if previous is not None:
        previous.result()
    t0 = time.perf_counter()
    tcav = None
    if sens is not None:
        cav = fit.probe.cav
        heat = {c: fit.probe.heatmap(cache.image_maps(fit.probe.layer, idx)) for c, idx in sens.images.items()}
        tcav = {**sens.scores(cav), **{f"local/{c}": v for c, v in sens.local_scores(cav, heat).items()}}
    t["tcav"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    run_id = log_probe(fit, settings=settings, session=session, store=store, tcav=tcav, experiment=experiment,
                       tags=None if tcav is not None else {"conceptlens.tcav": f"not computed: {cache.tcav_note}"},
                       tracking=tracking, parent=parent.result())
    t["log"] = time.perf_counter() - t0
    return run_id


def _write_logged(store, probe: Probe, logged, cache: FeatureCache, t: dict, *, attrs: dict) -> np.ndarray:
    """A probe's heatmaps are computed while its run is logged; they are stored once the run is complete."""
    import time

    t0 = time.perf_counter()
    scores, maps = heatmaps_for_store(store, probe, cache=cache)
    t_heat = time.perf_counter() - t0
    run_id = logged.result()  # a failed run raises here: nothing is written for it
    t0 = time.perf_counter()
    _store_probe(store, probe, scores, maps, run_id=run_id, attrs=attrs)
    t["write"] = t_heat + time.perf_counter() - t0  # heatmaps + store write, as write_probe_version
    return scores


def _store_name(store) -> str:
    """The store's name for tags: its file name without .zarr (demo), or its URL."""
    url = str(store.url).rstrip("/")
    name = url.rsplit("/", 1)[-1]
    return name[:-5] if name.endswith(".zarr") else url


def rollback(store, concept: str, layer: str, run_id: str, *, settings, cache: FeatureCache | None = None,
             experiment: str = PROBE_EXPERIMENT) -> Probe:
    """Make version `run_id` the current one: rewrite the store's scores and heatmaps from that run's weights.

        >>> rollback(store, "mass", "features.13", versions[1]["run_id"], settings=s)
    """
    probe = load_probe(run_id, settings=settings, experiment=experiment)
    if (probe.concept, probe.layer) != (concept, layer):
        raise ProbeDataError(f"run {run_id!r} is probe {probe.concept}@{probe.layer}, not {concept}@{layer}")
    if len(probe.weights) != store.layer_shape(layer)[0]:
        raise ProbeDataError(f"run {run_id!r} has {len(probe.weights)} units; layer {layer!r} of {store.url} has "
                             f"{store.layer_shape(layer)[0]}")
    try:
        previous = store.probe(concept, layer).run_id
    except KeyError:
        previous = ""
    write_probe_version(store, probe, run_id=run_id, cache=cache, attrs={"rolled_back_from": previous})
    if cache is not None:
        cache.last[(concept, layer)] = probe
    return probe


def probe_heatmap(store, concept: str, layer: str, image, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """The stored heatmap of the current probe version for one image, float32 (Y, X) at the patch size (or `size`).

        >>> hm = probe_heatmap(store, "mass", "features.13", "img-3a")     # for an overlay
    """
    i = _image_index(store, image)
    stored = store.probe(concept, layer)
    if stored.maps is None:
        raise ProbeDataError(f"probe {concept}@{layer} in {store.url} has no stored maps")
    size = size or tuple(store.attrs.get("input_size") or store.image(i).shape)
    return upsample(stored.maps[i], size)


COMBINED_FLOOR = 1e-6  # probabilities are clipped to this before the log: one layer's 0 would veto every other


def combine_heatmaps(heatmaps: Sequence[np.ndarray]) -> np.ndarray:
    """The concept's map from several layers' probes: the geometric mean of their probability maps, each already at
    the same size (the patch: `upsample`) → float32 in [0, 1].

        >>> combine_heatmaps([probe_a.heatmap(maps_a, size=(128, 128)), probe_b.heatmap(maps_b, size=(128, 128))])

    A product of experts: a pixel scores high only where every layer's probe finds the concept, so a shallow
    layer's sharp but noisy map and a deep layer's coarse but specific one correct each other. Measured on the demo
    store (12 simulated reviewers drawing 5 test patches per concept, pixel AUROC on held-out test patches, mean /
    worst): spiculated margin 0.936 / 0.928 against 0.928 / 0.916 for its best single layer (features.23) and
    0.911 / 0.893 for the layer a leave-one-drawing-out AUROC chooses; on average above every single layer for every
    concept (at or above the best one for 52 of the 60 reviewer-concept pairs), and a little above the arithmetic
    mean of the maps (spiculated margin 0.934 / 0.925).
    """
    maps = [np.asarray(h, np.float32) for h in heatmaps]
    if not maps:
        raise ProbeDataError("combining heatmaps needs at least one")
    if any(m.shape != maps[0].shape for m in maps):
        raise ProbeDataError(f"heatmaps to combine must have one shape, got {[m.shape for m in maps]}")
    if any(not np.isfinite(m).all() or m.min() < 0 or m.max() > 1 for m in maps):
        raise ProbeDataError("heatmaps to combine must be probabilities in [0, 1]")
    if len(maps) == 1:
        return maps[0]
    logs = sum(np.log(np.maximum(m, COMBINED_FLOOR), dtype=np.float64) for m in maps)
    return np.exp(logs / len(maps)).astype(np.float32)


def concept_layers(store, concept: str) -> list[str]:
    """The layers (in the store's order) holding a stored probe of `concept`."""
    have = {layer for c, layer in store.probes() if c == concept}
    return [layer for layer in store.layers if layer in have]


def concept_heatmap(store, concept: str, image, *, layers: Sequence[str] | None = None,
                    size: tuple[int, int] | None = None) -> np.ndarray:
    """The concept's map on one image from its stored probes of every layer (or `layers`): each one's stored heatmap
    upsampled to the patch (`probe_heatmap`), then `combine_heatmaps`. float32 (Y, X).

        >>> concept_heatmap(store, "mass", "img-3a")     # the app's "all layers" overlay
    """
    layers = concept_layers(store, concept) if layers is None else list(layers)
    if not layers:
        raise ProbeDataError(f"no probe of {concept!r} in {store.url}")
    return combine_heatmaps([probe_heatmap(store, concept, layer, image, size=size) for layer in layers])
