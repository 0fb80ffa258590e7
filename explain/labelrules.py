"""Alternative labeling rules: the reviewer's evidence accumulated over every drawing of a concept.

CumulativeRule sums intersections and unions over the drawn patches; DatasetRule (at the end of this module) turns
the same sums into an estimate of the unit's dataset-level IoU with the concept — the quantity Network Dissection's
detector criterion thresholds — with the unit's whole mask area from the store and the concept's prevalence from
the manifest, and applies that criterion (0.04) unchanged.

    >>> from explain.labelrules import CumulativeRule
    >>> rule = CumulativeRule(store, "features.23")              # threshold 0.07 (tuned on train/val, see below)
    >>> rule.add("p0012", "mass", mask)                           # one drawing: bool (y, x) of the patch size
    >>> rule.add("p0040", "mass", mask2); rule.add("p0101", "calcification", mask3)
    >>> rule.labels()                                             # {unit: concept}
    >>> rule.iou()                                                # float64 (concept, unit), concepts in rule.concepts
    >>> CumulativeRule.from_session(db, store, "features.23", session=3).labels()   # from stored regions

Why: the published rule (explain.labels.LabelRule) asks one drawing to give a unit an IoU above 0.2. At a deep layer
(8×8 or 16×16 maps upsampled to the patch, thresholded at the 0.99 quantile) a unit mask is a blob of about 1 % of
the patch, so its IoU with one lesion outline rarely clears 0.2, even for units that are Network Dissection
detectors of that lesion (dataset IoU above 0.04). This rule asks the question Network Dissection asks, on the
reviewer's patches only: for each concept c drawn so far,

    IoU_c(u) = Σ_drawings of c |M_u ∩ R| / Σ_drawings of c |M_u ∪ R|

(M_u: the unit's mask on the drawn patch, R: the drawn region), and gives unit u the label c when IoU_c(u) exceeds
`threshold` and c is the concept with the highest cumulative IoU for u among the concepts drawn. The rest of each
drawn patch is the evidence against: a unit that fires outside the drawn regions (or everywhere) grows its union,
not its intersection. Several regions of one concept on one image count once (their union), as one drawing.

The threshold is chosen on drawings of train/val patches only, never the test patches the simulated reviewer of
explain.groundtruth draws on: `explain.groundtruth.tune_cumulative_threshold` (40 seeded reviewer orders of 5
drawings per concept; the threshold among 0.02 … 0.1 that maximizes the mean over concepts with detectors of
min(precision, recall) at k = 5, ties to the smaller). On the demo model of training/configs/demo.yaml (16×16 maps,
auxiliary concept targets) at features.23: 0.07 (score 0.705; 0.05: 0.701, 0.1: 0.683; mass 0.94/0.80,
calcification 0.91/0.92, spiculated 0.66/0.74, circumscribed 0.73/0.77 there). The earlier 8×8 demo model gave 0.05.
Alternatives measured on the same train/val orders and not kept (none better by more than 0.02 on every model):
the union widened by the unit's firing on the other concepts' drawn patches, a fixed unit area per drawing in place
of the measured one (the dataset-level estimate under equal concept prevalence), per-concept normalisation by the
best unit, the mean of per-drawing IoUs, and the union of this rule's labels with the published rule's.
The published rule stays the default of the app (explain.labels.label_region); this rule is a read-only view over
the same drawings and writes nothing.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

from .dissection import DEFAULT_LEVEL, UpsampleGrid, _check_layer, mask_counts, patch_size, resolve_image
from .errors import LabelError, RegionError
from .regions import RegionSpec, rasterize_regions

__all__ = ["CumulativeRule", "DEFAULT_CUMULATIVE_THRESHOLD", "DatasetRule", "DEFAULT_DATASET_THRESHOLD",
           "unit_mask_area", "concept_prevalence"]

DEFAULT_CUMULATIVE_THRESHOLD = 0.07


class CumulativeRule:
    """Cumulative (dataset-style) IoU of every unit with the drawn regions of each concept; `labels()` applies it.

    Created empty, fed with `add(image, concept, region)` (or `add_counts` with precomputed mask counts), read with
    `labels()`. `intersection` and `union` are int64 (concept, unit) in the order of `concepts` (first drawn first).
    """

    def __init__(self, store, layer: str, *, threshold: float = DEFAULT_CUMULATIVE_THRESHOLD,
                 level: float = DEFAULT_LEVEL):
        if not 0.0 <= float(threshold) < 1.0:
            raise LabelError(f"cumulative rule threshold must be in [0, 1), got {threshold!r}")
        self.store = store
        self.layer = _check_layer(store, layer) if store is not None else layer
        self.threshold = float(threshold)
        self.level = float(level)
        if store is not None:
            self.thresholds = np.asarray(store.thresholds(layer, level), dtype=np.float32)  # (unit,)
            self.size = patch_size(store)
            self.grid = UpsampleGrid.build(store.layer_shape(layer)[1:], self.size)
            self.n_units = int(self.thresholds.shape[0])
        self.concepts: list[str] = []
        self.intersection = np.zeros((0, getattr(self, "n_units", 0)), np.int64)  # (concept, unit)
        self.union = np.zeros((0, getattr(self, "n_units", 0)), np.int64)
        self.region_px = np.zeros(0, np.int64)  # (concept,): drawn pixels
        self.drawings: dict[str, int] = {}  # concept → drawings counted

    @classmethod
    def from_counts(cls, n_units: int, **options) -> "CumulativeRule":
        """A rule without a store, fed only with `add_counts` (tests, precomputed counts); `options` as the class's
        keyword arguments (threshold, …)."""
        rule = cls(None, "", **options)
        rule.n_units = int(n_units)
        rule.intersection = np.zeros((0, rule.n_units), np.int64)
        rule.union = np.zeros((0, rule.n_units), np.int64)
        return rule

    @classmethod
    def from_session(cls, db, store, layer: str, *, session: int = 1, author: str | None = None,
                     concepts: Sequence[str] | None = None, **options) -> "CumulativeRule":
        """The rule fed with the stored (not undone) regions of a review session (of one author, of `concepts`);
        `options` as the class's keyword arguments (threshold, level, …)."""
        from .labels import regions_for

        rule = cls(store, layer, **options)
        merged: dict[tuple[str, str], np.ndarray] = {}  # (image id, concept) → union of its regions
        for rec in regions_for(db, session=session, author=author):
            if concepts is not None and rec.concept not in concepts:
                continue
            m = rec.mask()
            if m.shape != rule.size:
                raise RegionError(f"region {rec.id} of image {rec.image_id} was drawn on a {m.shape} patch; the "
                                  f"store {getattr(store, 'url', '')} has {rule.size} patches")
            key = (rec.image_id, rec.concept)
            merged[key] = m if key not in merged else (merged[key] | m)
        for (image_id, concept), m in merged.items():
            if m.any():
                rule.add(image_id, concept, m)
        return rule

    def _row(self, concept: str) -> int:
        if not isinstance(concept, str) or not concept:
            raise LabelError(f"concept must be a non-empty string, got {concept!r}")
        if concept not in self.concepts:
            self.concepts.append(concept)
            self.intersection = np.vstack([self.intersection, np.zeros((1, self.n_units), np.int64)])
            self.union = np.vstack([self.union, np.zeros((1, self.n_units), np.int64)])
            self.region_px = np.r_[self.region_px, np.int64(0)]
            self.drawings[concept] = 0
        return self.concepts.index(concept)

    def add_counts(self, concept: str, area: np.ndarray, inter: np.ndarray, region_px: int) -> None:
        """Count one drawing from its counts: unit mask areas (unit,), overlaps with the region (unit,), and the
        region's pixel count."""
        area = np.asarray(area, dtype=np.int64).reshape(-1)
        inter = np.asarray(inter, dtype=np.int64).reshape(-1)
        if area.shape != (self.n_units,) or inter.shape != (self.n_units,):
            raise LabelError(f"counts must have shape ({self.n_units},), got {area.shape} and {inter.shape}")
        if int(region_px) <= 0:
            raise RegionError(f"a drawing of {concept!r} covers no pixel")
        if (inter > area).any() or (inter > int(region_px)).any() or (inter < 0).any():
            raise LabelError("an overlap exceeds the unit mask area or the region size")
        j = self._row(concept)
        self.intersection[j] += inter
        self.union[j] += area + int(region_px) - inter
        self.region_px[j] += int(region_px)
        self.drawings[concept] += 1

    def add(self, image, concept: str, region: np.ndarray | Sequence[RegionSpec]) -> None:
        """Count one drawing of `concept` on `image` (id or index): a bool (y, x) mask of the patch size or region
        specs in patch coordinates."""
        if self.store is None:
            raise LabelError("this rule has no store: use add_counts")
        index = resolve_image(self.store, image)
        if isinstance(region, np.ndarray) and region.dtype != object:
            mask = np.asarray(region, dtype=bool)
            if mask.shape != self.size:
                raise RegionError(f"region mask of shape {mask.shape} does not match the patch size {self.size}")
        else:
            mask = rasterize_regions(region, self.size)
        n = int(mask.sum())
        if n == 0:
            raise RegionError(f"the region of {concept!r} on image {image!r} covers no pixel")
        area, inter = mask_counts(self.store.maps(self.layer, index), self.thresholds, mask[None], grid=self.grid)
        self.add_counts(concept, area, inter[0], n)

    def iou(self) -> np.ndarray:
        """float64 (concept, unit): Σ intersection / Σ union over each concept's drawings."""
        return self.intersection / np.maximum(self.union, 1)

    def labels(self) -> dict[int, str]:
        """{unit: concept}: units whose best cumulative IoU among the drawn concepts exceeds the threshold."""
        if not self.concepts:
            return {}
        iou = self.iou()
        best = iou.argmax(axis=0)  # ties go to the concept drawn first
        value = iou[best, np.arange(self.n_units)]
        return {int(u): self.concepts[int(best[u])] for u in np.flatnonzero(value > self.threshold)}

    def units_for(self, concept: str) -> list[int]:
        """Units labeled `concept` (sorted)."""
        return sorted(u for u, c in self.labels().items() if c == concept)


# -- the dataset-level estimate ----------------------------------------------------------------------------------------
DEFAULT_DATASET_THRESHOLD = 0.04  # Network Dissection's detector criterion: dataset-level IoU above 0.04

_AREA_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()
_AREA_LOCK = threading.Lock()


def _store_identity(store, layer: str, level: float) -> tuple:
    attrs = getattr(store, "attrs", {}) or {}
    return (str(getattr(store, "url", id(store))), json.dumps(attrs.get("model"), sort_keys=True, default=str),
            json.dumps(attrs.get("dataset"), sort_keys=True, default=str), layer, float(level))


def unit_mask_area(store, layer: str, level: float = DEFAULT_LEVEL, *, block: int = 64) -> np.ndarray:
    """int64 (unit,): pixels of each unit's mask (upsampled map above its `level` quantile) summed over every image
    of the store — the "unit" side of every dataset-level union. Computed once per store, layer and level in this
    process (about a second per thousand 64×64 patches of 128 units) and kept."""
    layer = _check_layer(store, layer)
    key = _store_identity(store, layer, level)
    with _AREA_LOCK:
        if key in _AREA_CACHE:
            _AREA_CACHE.move_to_end(key)
            return _AREA_CACHE[key].copy()
    thresholds = np.asarray(store.thresholds(layer, level), dtype=np.float32)
    grid = UpsampleGrid.build(store.layer_shape(layer)[1:], patch_size(store))
    total = np.zeros(thresholds.shape[0], np.int64)
    for start in range(0, store.n_images, block):
        for maps in store.maps_many(layer, np.arange(start, min(start + block, store.n_images))):
            total += mask_counts(maps, thresholds, None, grid=grid)[0]
    with _AREA_LOCK:
        _AREA_CACHE[key] = total
        while len(_AREA_CACHE) > 16:
            _AREA_CACHE.popitem(last=False)
    return total.copy()


def concept_prevalence(store, manifest) -> dict[str, int]:
    """{concept: number of the store's images whose manifest row lists it} (the `concepts` column: what each patch
    shows, as the dataset's own annotations state it — CBIS-DDSM gives lesion type and mass margin per lesion)."""
    by_id = manifest.by_id()
    counts: dict[str, int] = {}
    for image_id in store.image_ids:
        rec = by_id.get(image_id)
        if rec is None:
            raise LabelError(f"{getattr(store, 'url', 'the store')}: image {image_id!r} is not in "
                             f"{getattr(manifest, 'path', 'the manifest')}; use the manifest the store was extracted "
                             f"from")
        for c in rec.concepts:
            counts[c] = counts.get(c, 0) + 1
    return counts


class DatasetRule(CumulativeRule):
    """Each unit's dataset-level IoU with each drawn concept, estimated from the drawings; Network Dissection's own
    criterion applied to the estimate.

        >>> rule = DatasetRule(store, "features.23", prevalence=concept_prevalence(store, manifest))
        >>> rule.add("p0012", "mass", mask); rule.labels()          # {unit: concept}, as CumulativeRule

    The dataset-level IoU of unit u and concept c over the N images of the store is

        IoU(u, c) = I / (F_u + A_c − I),   I = Σ_images |M_u ∩ G_c|,   A_c = Σ_images |G_c|,   F_u = Σ_images |M_u|

    F_u, the unit's whole mask area, is known exactly from the store (`unit_mask_area`). I and A_c are only known on
    the k_c patches where c was drawn; the patches that show c are the only ones where they grow, so with n_c of them
    in the dataset (`prevalence`, from the manifest's per-patch concept list) they are estimated as the drawn sums
    scaled by s = n_c / k_c (I capped at F_u). A unit is labeled c when its estimated IoU with c exceeds `threshold`
    (0.04, the detector criterion itself: nothing tuned) and c is its best among the drawn concepts.

    Why this beats CumulativeRule: that rule's union only counts the unit's firing on the drawn patches. A unit that
    fires on every mass then looks as good a detector of the margin of the masses that have one (their rim is inside
    the mass) as of mass, because on the margin drawings it fires nowhere else; over the dataset its firing on the
    masses without that margin enlarges the union. Here F_u carries that evidence, and the scaled areas weigh each
    concept by how much of the dataset it covers.
    """

    def __init__(self, store, layer: str, *, prevalence: Mapping[str, float], unit_area: np.ndarray | None = None,
                 threshold: float = DEFAULT_DATASET_THRESHOLD, level: float = DEFAULT_LEVEL):
        super().__init__(store, layer, threshold=threshold, level=level)
        self.prevalence = {}
        for c, n in dict(prevalence).items():
            if not isinstance(n, (int, float, np.integer, np.floating)) or not np.isfinite(n) or n <= 0:
                raise LabelError(f"prevalence of {c!r} must be a positive number of images, got {n!r}")
            self.prevalence[str(c)] = float(n)
        if unit_area is None:
            if store is None:
                raise LabelError("DatasetRule without a store needs unit_area (the units' total mask areas)")
            unit_area = unit_mask_area(store, self.layer, self.level)
        area = np.asarray(unit_area, dtype=np.float64).reshape(-1)
        if not np.isfinite(area).all() or (area < 0).any():
            raise LabelError("unit_area must hold finite, non-negative pixel counts")
        if store is not None and area.shape != (self.n_units,):
            raise LabelError(f"unit_area has {area.shape[0]} units; layer {layer!r} has {self.n_units}")
        self.unit_area = area

    def add_counts(self, concept: str, area: np.ndarray, inter: np.ndarray, region_px: int) -> None:
        if concept not in self.prevalence:
            raise LabelError(f"no prevalence for concept {concept!r}: the manifest lists none of the store's images "
                             f"as showing it (known: {', '.join(sorted(self.prevalence)) or 'none'})")
        if self.unit_area.shape != (self.n_units,):
            raise LabelError(f"unit_area has {self.unit_area.shape[0]} units; the rule has {self.n_units}")
        super().add_counts(concept, area, inter, region_px)

    def iou(self) -> np.ndarray:
        """float64 (concept, unit): the estimated dataset-level IoU (see the class docstring)."""
        if not self.concepts:
            return np.zeros((0, self.n_units))
        k = np.array([self.drawings[c] for c in self.concepts], np.float64)
        n = np.array([self.prevalence[c] for c in self.concepts])
        scale = (np.maximum(n, k) / k)[:, None]  # a concept drawn on k images shows on at least k
        inter = np.minimum(scale * self.intersection, self.unit_area[None, :])
        missed = scale * self.region_px[:, None] - inter  # the concept's pixels outside the unit's mask
        return inter / np.maximum(self.unit_area[None, :] + np.maximum(missed, 0), 1)
