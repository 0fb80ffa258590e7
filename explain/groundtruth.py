"""Unit labels measured against ground truth: the demo dataset's exact concept masks.

    >>> from explain.groundtruth import GroundTruthConfig, evaluate_ground_truth, log_ground_truth
    >>> report = evaluate_ground_truth(settings)                 # demo store + demo manifest of the workspace
    >>> report.detectors["features.20"]["mass"]                   # ground-truth detector units
    >>> report.curves["features.20"]["mass"][4]                   # {"k": 5, "precision": …, "recall": …, …}
    >>> report.drawings                                           # [Drawing(k, concept, image_id, mask), …]
    >>> log_ground_truth(report, settings)                        # an mlflow run in "conceptlens-groundtruth"

1. Dataset-level IoU (Network Dissection): every unit thresholded at its quantile (level 0.99), intersections and
   unions with every ground-truth concept summed over the reference images (the train and val splits). A unit is a
   ground-truth detector of concept c when its IoU with c is above 0.04 and c is its best concept among all the
   concepts that have masks (inserted lesions and the anatomy: skin, background, …), as in Network Dissection.
   `detector_margins` tells how little IoU would change that for each unit (a unit within a few hundredths of another
   concept or of the criterion is a detector, or not, by a hair).
2. A simulated reviewer draws the exact ground-truth region of each inserted concept on k patches (k = 1 … 10), one
   new patch per concept per round, in a seeded order, and the labeling rule (explain.labels, published defaults)
   runs after each drawing against a real annotation database (in memory); the alternative rules of
   explain.labelrules are fed the same drawings and measured side by side (`report.alternatives`,
   `report.at(layer, c, k, rule="cumulative" | "dataset" | "assisted")`): CumulativeRule (cumulative IoU over the
   drawings of each concept), DatasetRule (the dataset-level IoU of step 1 estimated from the drawings, the unit
   masks of the whole store and the manifest's list of what each patch shows, with the detector criterion 0.04) and
   ProbeAssistedRule (the same estimate carried over by a probe fitted from the drawings); these two estimate the
   IoU over the reference images of step 1 (`reference_images`), the population the detectors are defined on, with
   the drawn patches as a sample from outside it, and take step 1's IoU of each unit with what the app segments on
   every film itself (film labels, background, skin, pectoral muscle: `segmented_ious`) as rivals no drawn concept's
   estimate may trail. The patches come from the test split:
   never used to train the model, to select it, or to compute the detectors above; only patches where the concept
   covers at least `min_region_px` pixels are drawn (a reviewer does not outline a 3-pixel speck).
3. After each round: precision and recall of the units labeled c against the detectors of c. Precision is undefined
   (None) while no unit carries the label, recall while the model has no detector of c — reported as such, never
   replaced by a looser definition.
4. One reviewer's k patches are a small sample: `report.orders` repeats the alternative rules at k = 5 for 40 other
   seeded reviewers on the deepest layer (mean precision and recall, and the share of reviewers meeting both goals).
5. The same on the deepest layer for a reviewer who draws the same first patch and then, each time, the patch the
   app suggests among the eligible ones (explain.labelrules.next_drawings: the drawn sample kept balanced against
   all images showing the concept): `report.suggested` (rule → concept → rows, `report.rows(..., reviewer=
   "suggested")`) and `report.orders_suggested` (40 such reviewers).

The drawings are kept (`report.drawings`) so the probe evaluation can fit probes from exactly the same regions.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .dissection import (
    DEFAULT_LEVEL,
    ConceptIoU,
    DatasetIoU,
    UpsampleGrid,
    iou_from_counts,
    mask_counts,
    patch_size,
)
from .errors import ExplainError
from .labelrules import (
    DEFAULT_CUMULATIVE_THRESHOLD,
    DEFAULT_DATASET_THRESHOLD,
    DEFAULT_RATIO_PRIOR,
    SEGMENTED_CONCEPTS,
    CumulativeRule,
    DatasetRule,
    ProbeAssistedRule,
    images_showing,
    next_drawings,
    unit_mask_areas,
)
from .labels import LabelRule, apply_ious, units_for
from .probes import FeatureCache
from .regions import MaskRegion

__all__ = [
    "INSERTED_CONCEPTS",
    "GroundTruthConfig",
    "Drawing",
    "GroundTruthReport",
    "DissectReport",
    "load_concept_masks",
    "dataset_concept_iou",
    "find_detectors",
    "detector_margins",
    "segmented_ious",
    "segmented_rivals",
    "choose_drawings",
    "eligible_drawings",
    "reference_images",
    "suggested_order",
    "REVIEWERS",
    "simulate_reviewer",
    "evaluate_ground_truth",
    "dissect_ground_truth",
    "log_ground_truth",
    "tune_cumulative_threshold",
    "reviewer_orders",
    "TuningResult",
    "EXPERIMENT",
    "RULES",
]

RULES = ("published", "cumulative", "dataset", "assisted")  # labeling rules evaluated side by side
# how the simulated reviewer picks each next patch: at random among the eligible ones, or (after a first patch at
# random) the one the app suggests (explain.labelrules.next_drawings; measured on the dissection layer only)
REVIEWERS = ("random", "suggested")
# every concept the demo data inserts with an exact mask (training/synth.py, docs/DATA.md) is measured: a concept the
# model barely detects is reported as such, not left out (architectural distortion was, until 2026-11-26)
INSERTED_CONCEPTS = ("mass", "calcification", "spiculated_margin", "circumscribed_margin", "architectural_distortion")
EXPERIMENT = "conceptlens-groundtruth"


@dataclass(frozen=True)
class GroundTruthConfig:
    level: float = DEFAULT_LEVEL  # unit threshold quantile
    detector_iou: float = 0.04  # Network Dissection: IoU above this with the unit's best concept
    ks: tuple[int, ...] = tuple(range(1, 11))  # drawings per concept
    concepts: tuple[str, ...] = INSERTED_CONCEPTS  # concepts the reviewer draws
    reference_splits: tuple[str, ...] = ("train", "val")  # images of the dataset-level IoU
    review_split: str = "test"  # images the reviewer draws on
    min_region_px: int = 16  # smallest ground-truth region the reviewer draws
    seed: int = 0
    rule: LabelRule = field(default_factory=LabelRule)  # the published rule (explain.labels)
    cumulative_threshold: float = DEFAULT_CUMULATIVE_THRESHOLD  # the alternatives (explain.labelrules)
    dataset_threshold: float = DEFAULT_DATASET_THRESHOLD
    assisted_prior: float = DEFAULT_RATIO_PRIOR  # ProbeAssistedRule's ratio prior, in patches
    goal_k: int = 5
    goal_precision: float = 0.8
    goal_recall: float = 0.8


@dataclass(frozen=True)
class Drawing:
    """One simulated drawing: round k, the concept, the image and the exact region (bool (y, x), patch size)."""

    k: int
    concept: str
    image_id: str
    mask: np.ndarray = field(repr=False)


@dataclass
class GroundTruthReport:
    layers: list[str]
    config: GroundTruthConfig
    concepts: list[str]  # every concept with masks (the columns of the IoU tables)
    iou: dict[str, ConceptIoU]  # layer → dataset-level IoU
    detectors: dict[str, dict[str, list[int]]]  # layer → concept → units
    curves: dict[str, dict[str, list[dict]]]  # layer → concept → [{k, precision, recall, labeled, hits, …}]
    drawings: list[Drawing]
    available: dict[str, int]  # concept → patches of the review split the reviewer could draw on
    n_reference_images: int
    seconds: float
    missing: list[str] = field(default_factory=list)  # requested concepts without any ground-truth mask
    # the alternative rules (explain.labelrules) on the same drawings: rule → layer → concept → rows
    alternatives: dict[str, dict[str, dict[str, list[dict]]]] = field(default_factory=dict)
    # the alternative rules at k = goal_k over many seeded reviewers of the deepest layer (`reviewer_orders`)
    orders: dict[str, dict[str, dict]] = field(default_factory=dict)
    # the reviewer who follows the app's suggestions (REVIEWERS), deepest layer only: rule → concept → rows, and
    # the many reviewers' figures as `orders`
    suggested: dict[str, dict[str, list[dict]]] = field(default_factory=dict)
    orders_suggested: dict[str, dict[str, dict]] = field(default_factory=dict)

    def rows(self, layer: str, concept: str, rule: str = "published", reviewer: str = "random") -> list[dict]:
        """The curve of `rule`: "published" (explain.labels, the app's default), "cumulative", "dataset" or
        "assisted", for the reviewer drawing at random or following the app's suggestions (deepest layer only)."""
        if rule not in RULES:
            raise ExplainError(f"unknown rule {rule!r}; known: {', '.join(RULES)}")
        if reviewer not in REVIEWERS:
            raise ExplainError(f"unknown reviewer {reviewer!r}; known: {', '.join(REVIEWERS)}")
        if reviewer == "suggested":
            if layer != self.layers[-1] or rule not in self.suggested:
                raise ExplainError(f"the suggested reviewer was measured on {self.layers[-1]} with the rules "
                                   f"{', '.join(self.suggested) or 'none'}, not {rule!r} on {layer}")
            return self.suggested[rule][concept]
        if rule == "published":
            return self.curves[layer][concept]
        if rule not in self.alternatives:
            raise ExplainError(f"rule {rule!r} was not measured in this report")
        return self.alternatives[rule][layer][concept]

    def at(self, layer: str, concept: str, k: int, rule: str = "published", reviewer: str = "random") -> dict | None:
        for row in self.rows(layer, concept, rule, reviewer):
            if row["k"] == k:
                return row
        return None

    def k_to_goal(self, layer: str, concept: str, rule: str = "published", reviewer: str = "random") -> int | None:
        """Smallest k at which both precision and recall reach their goals (None: never within the ks drawn)."""
        c = self.config
        for row in self.rows(layer, concept, rule, reviewer):
            p, r = row["precision"], row["recall"]
            if p is not None and r is not None and p >= c.goal_precision and r >= c.goal_recall:
                return row["k"]
        return None

    def summary(self) -> str:
        lines = []
        runs = [(layer, "random", {"published", *self.alternatives}) for layer in self.layers]
        if self.suggested:
            runs.append((self.layers[-1], "suggested", set(self.suggested)))
        for layer, reviewer, measured in runs:
            lines.append(f"{layer}, the reviewer following the app's suggestions after a first patch at random:"
                         if reviewer == "suggested" else f"{layer}: detectors " + ", ".join(
                             f"{c} {len(self.detectors[layer].get(c, []))}" for c in self.config.concepts))
            for c in self.config.concepts:
                for rule in (r for r in RULES if r in measured):
                    row = self.at(layer, c, self.config.goal_k, rule, reviewer)
                    tag = "" if rule == "published" else f" [{rule}]"
                    if row is None:
                        lines.append(f"  {c}{tag}: fewer than {self.config.goal_k} drawings possible")
                        continue
                    lines.append(f"  {c}{tag} @k={row['k']}: precision {_fmt(row['precision'])} recall "
                                 f"{_fmt(row['recall'])} (labeled {row['labeled']}, detectors {row['detectors']}, "
                                 f"hits {row['hits']})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "layers": self.layers, "config": _config_json(self.config), "concepts": self.concepts,
            "detectors": self.detectors, "curves": self.curves, "alternatives": self.alternatives,
            "orders": self.orders, "suggested": self.suggested, "orders_suggested": self.orders_suggested,
            "available": self.available,
            "n_reference_images": self.n_reference_images, "seconds": self.seconds, "missing": self.missing,
            "iou": {layer: res.to_json() for layer, res in self.iou.items()},
            "drawings": [{"k": d.k, "concept": d.concept, "image_id": d.image_id, "area": int(d.mask.sum())}
                         for d in self.drawings],
        }


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _config_json(config: GroundTruthConfig) -> dict:
    d = asdict(config)
    d["rule"] = asdict(config.rule)
    return d


# -- ground-truth masks ------------------------------------------------------------------------------------------------
def load_concept_masks(record, size: tuple[int, int], concepts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """{concept: bool (y, x)} of a manifest record's mask PNGs (nonzero = inside), at the store's patch `size`.

    Masks of another size are resized with nearest-neighbour sampling (the network input may be a resized patch).
    """
    from PIL import Image

    out = {}
    for concept, path in record.masks.items():
        if concepts is not None and concept not in concepts:
            continue
        with Image.open(path) as im:
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.NEAREST)
            m = np.asarray(im)
        if m.ndim == 3:
            m = m[..., 0]
        out[concept] = m > 0
    return out


def _store_records(store, manifest) -> list:
    """Manifest records in store image order; ExplainError when the store was made from another dataset."""
    by_id = manifest.by_id()
    missing = [i for i in store.image_ids if i not in by_id]
    if missing:
        raise ExplainError(f"{store.url}: {len(missing)} store images are not in {manifest.path} "
                           f"(first: {missing[0]!r}); use the manifest the store was extracted from")
    return [by_id[i] for i in store.image_ids]


def _mask_concepts(records) -> list[str]:
    seen: set[str] = set()
    for r in records:
        seen.update(r.masks)
    return sorted(seen)


# -- 1. dataset-level IoU and detectors --------------------------------------------------------------------------------
def dataset_concept_iou(store, manifest, layers: Sequence[str], *,
                        splits: Sequence[str] | None = ("train", "val"), level: float = DEFAULT_LEVEL,
                        concepts: Sequence[str] | None = None, block: int = 32,
                        progress=None) -> dict[str, ConceptIoU]:
    """{layer: ConceptIoU} over the store images of `splits` (None: every image), every concept with masks (or
    `concepts`).

    Each image's masks are read once and counted for every layer.
    """
    records = _store_records(store, manifest)
    concepts = list(concepts) if concepts is not None else _mask_concepts(records)
    size = patch_size(store)
    acc = {layer: DatasetIoU(store, layer, level=level, concepts=concepts) for layer in layers}
    chosen = [i for i, r in enumerate(records) if splits is None or r.split in splits]
    for start in range(0, len(chosen), block):
        idx = chosen[start:start + block]
        stacks = [acc[layers[0]].stack(records[i].id, load_concept_masks(records[i], size, concepts)) for i in idx]
        for layer in layers:
            maps = store.maps_many(layer, idx)  # (image, unit, y, x)
            for m, st in zip(maps, stacks):
                acc[layer].add_maps(m, st)
        if progress:
            progress(min(start + block, len(chosen)), len(chosen))
    return {layer: a.result() for layer, a in acc.items()}


def find_detectors(result: ConceptIoU, *, min_iou: float = 0.04) -> dict[str, list[int]]:
    """{concept: units} whose best concept it is with an IoU above `min_iou` (every concept gets a list)."""
    best, value = result.best()
    out: dict[str, list[int]] = {c: [] for c in result.concepts}
    for unit in np.flatnonzero(value > min_iou).tolist():
        out[result.concepts[int(best[unit])]].append(unit)
    return out


def segmented_ious(result: ConceptIoU) -> dict[str, np.ndarray]:
    """{concept: float64 (unit,)}: each unit's dataset-level IoU with the concepts the app segments on every film by
    itself (explain.labelrules.SEGMENTED_CONCEPTS: film labels, background, skin, pectoral muscle), those of them
    `result` has: the rivals DatasetRule and ProbeAssistedRule give the drawn concepts (a unit that matches a film
    label better than the mass drawn is not a mass detector, by the detector criterion itself)."""
    return {c: np.asarray(result.iou[:, result.concepts.index(c)], np.float64)
            for c in SEGMENTED_CONCEPTS if c in result.concepts}


def segmented_rivals(store, manifest, layer: str, *, level: float = DEFAULT_LEVEL) -> dict[str, np.ndarray]:
    """The app's rivals for its dataset labeling rules on `layer` (explain.labels.label_region's `known`): each unit's
    dataset-level IoU with the concepts the app segments on every film by itself, over every store image (the
    population the app's rules estimate over); only those concepts the manifest has masks of ({} when none)."""
    have = [c for c in SEGMENTED_CONCEPTS if c in _mask_concepts(_store_records(store, manifest))]
    if not have:
        return {}
    return segmented_ious(dataset_concept_iou(store, manifest, [layer], splits=None, level=level, concepts=have)[layer])


def detector_margins(result: ConceptIoU, *, min_iou: float = 0.04) -> np.ndarray:
    """float64 (unit,): how small a change of IoU would change whether, and of which concept, each unit is a detector
    (`find_detectors`): for a detector, the smaller of its lead over its second-best concept and its lead over
    `min_iou`; for any other unit, how far its best IoU stays below `min_iou`. A unit within a few hundredths of
    IoU is a detector (or not) by a hair: the few drawings of a reviewer cannot settle it, whatever the rule."""
    ranked = np.sort(np.asarray(result.iou, np.float64), axis=1)  # (unit, concept), each row ascending
    best = ranked[:, -1]
    lead = best - ranked[:, -2] if ranked.shape[1] > 1 else np.inf  # over the second-best concept
    return np.where(best > min_iou, np.minimum(lead, best - min_iou), min_iou - best)


# -- 2. the simulated reviewer -----------------------------------------------------------------------------------------
def reference_images(store, manifest, config: GroundTruthConfig) -> np.ndarray:
    """int64 store indices of the reference splits' patches: the images the detectors' dataset-level IoU is taken
    over, and so the population whose IoU the dataset rules estimate from the reviewer's drawings (the review split's
    patches are a sample, not part of it)."""
    records = _store_records(store, manifest)
    return np.array([i for i, r in enumerate(records) if r.split in config.reference_splits], np.int64)


def _showing_reference(shown: Mapping[str, Sequence[int]], reference: np.ndarray) -> dict[str, np.ndarray]:
    """`shown` restricted to the reference images; a concept none of them shows is left out."""
    out = {c: np.intersect1d(np.asarray(v, np.int64), reference) for c, v in shown.items()}
    return {c: v for c, v in out.items() if v.size}


def eligible_drawings(store, manifest, config: GroundTruthConfig) -> dict[str, list[int]]:
    """Per concept, the store indices of the review split's patches the reviewer may draw it on (its region covers
    at least `config.min_region_px` pixels)."""
    records = _store_records(store, manifest)
    size = patch_size(store)
    eligible: dict[str, list[int]] = {}
    for concept in config.concepts:
        eligible[concept] = [i for i, r in enumerate(records) if r.split == config.review_split and concept in r.masks
                             and load_concept_masks(r, size, [concept])[concept].sum() >= config.min_region_px]
    return eligible


def choose_drawings(store, manifest, config: GroundTruthConfig, *, eligible: Mapping[str, list[int]] | None = None
                    ) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Per concept, the store image indices the reviewer draws on, in order (seeded), and how many were eligible
    (`eligible`: `eligible_drawings`' answer when already at hand)."""
    rng = np.random.default_rng(config.seed)
    order: dict[str, list[int]] = {}
    available: dict[str, int] = {}
    for concept, eligible in (eligible or eligible_drawings(store, manifest, config)).items():
        available[concept] = len(eligible)
        picked = rng.permutation(len(eligible))[:max(config.ks)]
        order[concept] = [eligible[j] for j in picked]
    return order, available


def suggested_order(features: np.ndarray, population: Sequence[int], eligible: Sequence[int], first: int,
                    k: int) -> list[int]:
    """A reviewer who draws `first` and then, each time, the patch the app suggests (explain.labelrules.next_drawings
    among the `eligible` ones, balanced against the `population` of images showing the concept): k store indices."""
    order = [int(first)]
    while len(order) < k:
        ranked = next_drawings(features, population, order, candidates=eligible)
        if ranked.size == 0:
            break
        order.append(int(ranked[0]))
    return order


def _pr(labeled: set[int], detectors: set[int]) -> tuple[float | None, float | None, int]:
    hits = len(labeled & detectors)
    precision = hits / len(labeled) if labeled else None
    recall = hits / len(detectors) if detectors else None
    return precision, recall, hits


def simulate_reviewer(store, manifest, layer: str, detectors: Mapping[str, Sequence[int]], *,
                      config: GroundTruthConfig = GroundTruthConfig(), order: Mapping[str, list[int]] | None = None,
                      db=None, alternatives: dict | None = None,
                      shown: Mapping[str, Sequence[int]] | None = None,
                      cache=None, known: Mapping[str, np.ndarray] | None = None
                      ) -> tuple[dict[str, list[dict]], list[Drawing]]:
    """Draw, round by round, the ground-truth region of each concept and apply the labeling rule; measure after each
    round. Returns ({concept: [{k, precision, recall, labeled, detectors, hits, drawn}]}, drawings).

    `alternatives`: a dict filled with the same curves of the alternative rules of explain.labelrules, fed with
    exactly the same drawings: "cumulative" (CumulativeRule, threshold `config.cumulative_threshold`) and, given the
    store images that show each concept (`shown`), "dataset" (DatasetRule, `config.dataset_threshold`) and "assisted"
    (ProbeAssistedRule, the same threshold; `cache`: an explain.probes.FeatureCache of the store to share); `known`:
    their rivals, each unit's dataset IoU with the concepts the app segments itself (`segmented_ious`).
    """
    from store.annotations import open_database

    records = _store_records(store, manifest)
    size = patch_size(store)
    if order is None:
        order, _ = choose_drawings(store, manifest, config)
    db = db if db is not None else open_database("sqlite://")
    thresholds = np.asarray(store.thresholds(layer, config.level), dtype=np.float32)
    grid = UpsampleGrid.build(store.layer_shape(layer)[1:], size)
    rules = {"cumulative": CumulativeRule(store, layer, threshold=config.cumulative_threshold, level=config.level)}
    if shown is not None:
        reference = reference_images(store, manifest, config)
        rules["dataset"] = DatasetRule(store, layer, shown=shown, threshold=config.dataset_threshold,
                                       level=config.level, population=reference, known=known)
        rules["assisted"] = ProbeAssistedRule(store, layer, shown=shown, threshold=config.dataset_threshold,
                                              level=config.level, cache=cache, population=reference, known=known,
                                              prior=config.assisted_prior)
    alt_curves: dict[str, dict[str, list[dict]]] = {name: {c: [] for c in config.concepts} for name in rules}
    curves: dict[str, list[dict]] = {c: [] for c in config.concepts}
    drawings: list[Drawing] = []
    drawn = {c: 0 for c in config.concepts}
    for k in range(1, max(config.ks) + 1):
        for concept in config.concepts:
            if k > len(order[concept]):
                continue
            index = order[concept][k - 1]
            mask = load_concept_masks(records[index], size, [concept])[concept]
            area, inter = mask_counts(store.maps(layer, index), thresholds, mask[None], grid=grid)
            n = int(mask.sum())
            ious = iou_from_counts(area, inter[0], n)
            for rule in rules.values():
                rule.add_mask(index, concept, mask, counts=(area, inter[0]))
            apply_ious(db, store, layer=layer, image=index, concept=concept, author="simulated-reviewer",
                       ious=ious, specs=[MaskRegion.from_mask(mask)], mask=mask, rule=config.rule,
                       rule_extra={"level": config.level})
            drawings.append(Drawing(k=k, concept=concept, image_id=records[index].id, mask=mask))
            drawn[concept] += 1
        if k not in config.ks:
            continue
        for concept in config.concepts:
            labeled = set(units_for(db, concept, layer).get(layer, []))
            det = set(int(u) for u in detectors.get(concept, []))
            precision, recall, hits = _pr(labeled, det)
            curves[concept].append({"k": k, "drawn": drawn[concept], "precision": precision, "recall": recall,
                                    "labeled": len(labeled), "detectors": len(det), "hits": hits})
            for name, rule in rules.items():
                alt_labeled = set(rule.units_for(concept))
                precision, recall, hits = _pr(alt_labeled, det)
                alt_curves[name][concept].append({"k": k, "drawn": drawn[concept], "precision": precision,
                                                  "recall": recall, "labeled": len(alt_labeled),
                                                  "detectors": len(det), "hits": hits})
    if alternatives is not None:
        alternatives.update(alt_curves)
    return curves, drawings


# -- tuning the alternative rule on train/val drawings -----------------------------------------------------------------
def _drawable_counts(store, manifest, layer: str, *, splits: Sequence[str], concepts: Sequence[str],
                     min_region_px: int, level: float) -> dict[str, list[tuple]]:
    """{concept: [(store index, unit mask areas, overlaps with the concept's mask, its pixels, the mask)]} of every
    patch of `splits` the reviewer could draw the concept on (as in `choose_drawings`), computed once."""
    records = _store_records(store, manifest)
    size = patch_size(store)
    thresholds = np.asarray(store.thresholds(layer, level), dtype=np.float32)
    grid = UpsampleGrid.build(store.layer_shape(layer)[1:], size)
    counts: dict[str, list[tuple]] = {c: [] for c in concepts}
    for i, r in enumerate(records):
        if r.split not in splits:
            continue
        masks = {c: m for c, m in load_concept_masks(r, size, concepts).items() if m.sum() >= min_region_px}
        if not masks:
            continue
        area, inter = mask_counts(store.maps(layer, i), thresholds, np.stack(list(masks.values())), grid=grid)
        for j, (c, m) in enumerate(masks.items()):
            counts[c].append((i, area, inter[j], int(m.sum()), m))
    return counts


def reviewer_orders(store, manifest, layer: str, detectors: Mapping[str, Sequence[int]], *,
                    config: GroundTruthConfig = GroundTruthConfig(), orders: int = 40, seed: int = 2000,
                    shown: Mapping[str, Sequence[int]] | None = None, cache=None, reviewer: str = "random",
                    drawable: Mapping[str, list[tuple]] | None = None,
                    known: Mapping[str, np.ndarray] | None = None) -> dict[str, dict[str, dict]]:
    """How much the alternative rules' figures at k = config.goal_k depend on which patches the reviewer drew: `orders`
    seeded reviewers, each drawing goal_k eligible patches of the review split per concept — at random, or
    (reviewer="suggested", needs `shown`) the same first patch and then the app's suggestions (`suggested_order`).
    → {rule: {concept: {"precision", "recall" (means; an undefined precision counts 0), "met" (fraction of
    reviewers reaching both goals), "orders"}}} for "cumulative" and, with `shown`, "dataset" and "assisted".
    `drawable`: `_drawable_counts`' answer for the review split, when already at hand; `known` as in
    `simulate_reviewer`."""
    if reviewer not in REVIEWERS:
        raise ExplainError(f"unknown reviewer {reviewer!r}; known: {', '.join(REVIEWERS)}")
    if reviewer == "suggested" and shown is None:
        raise ExplainError("the suggested reviewer needs the images showing each concept (shown=)")
    concepts = list(config.concepts)
    counts = drawable or _drawable_counts(store, manifest, layer, splits=(config.review_split,), concepts=concepts,
                                          min_region_px=config.min_region_px, level=config.level)
    n_units = store.layer_shape(layer)[0]
    make = {"cumulative": lambda: CumulativeRule.from_counts(n_units, threshold=config.cumulative_threshold)}
    reference = reference_images(store, manifest, config)
    if shown is not None:
        area = unit_mask_areas(store, layer, config.level)
        make["dataset"] = lambda: DatasetRule.from_counts(image_area=area, shown=shown, known=known,
                                                          threshold=config.dataset_threshold, population=reference)
        cache = cache if cache is not None else FeatureCache(store)  # one for all the reviewers
        make["assisted"] = lambda: ProbeAssistedRule(store, layer, shown=shown, threshold=config.dataset_threshold,
                                                     level=config.level, cache=cache, population=reference,
                                                     known=known, prior=config.assisted_prior)
    rng = np.random.default_rng(seed)
    sums = {name: {c: np.zeros(3) for c in concepts} for name in make}
    features = store.pooled(layer, "max") if reviewer == "suggested" else None
    if features is not None:  # the suggestions balance the drawn sample against the images whose IoU is estimated
        population = _showing_reference(shown, reference)
    position = {c: {e[0]: j for j, e in enumerate(counts[c])} for c in concepts}  # store index → entry of counts
    for _ in range(orders):
        picks = {c: rng.permutation(len(counts[c]))[:config.goal_k] for c in concepts}
        if features is not None:  # the same first patch as the random reviewer, then the suggestions
            for c in concepts:
                if len(picks[c]) and c in population:
                    first = counts[c][picks[c][0]][0]
                    picks[c] = [position[c][i] for i in suggested_order(features, population[c], list(position[c]),
                                                                         first, config.goal_k)]
        for name, new in make.items():
            rule = new()
            for c in concepts:
                for j in picks[c]:
                    i, area_j, inter, _n, mask = counts[c][j]
                    rule.add_mask(i, c, mask, counts=(area_j, inter))
            labels = rule.labels()
            for c in concepts:
                p, r, _ = _pr({u for u, lc in labels.items() if lc == c}, {int(u) for u in detectors.get(c, [])})
                p, r = (0.0 if p is None else p), (0.0 if r is None else r)
                sums[name][c] += (p, r, p >= config.goal_precision and r >= config.goal_recall)
    return {name: {c: {"precision": float(v[0] / orders), "recall": float(v[1] / orders), "met": float(v[2] / orders),
                       "orders": orders}
                   for c, v in per.items()} for name, per in sums.items()}


@dataclass
class TuningResult:
    """`tune_cumulative_threshold`'s answer: the chosen threshold, the score of every candidate and the evidence."""

    threshold: float
    scores: dict[float, float]  # candidate → mean over concepts with detectors of mean over orders of min(P, R)
    per_concept: dict[float, dict[str, tuple[float, float]]]  # candidate → concept → (mean precision, mean recall)
    images: list[str]  # ids of every patch any simulated order drew on (all of `splits`)
    orders: int
    k: int


def tune_cumulative_threshold(store, manifest, layer: str, detectors: Mapping[str, Sequence[int]], *,
                              splits: Sequence[str] = ("train", "val"), k: int = 5, orders: int = 40,
                              candidates: Sequence[float] = (0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1),
                              concepts: Sequence[str] = INSERTED_CONCEPTS, min_region_px: int = 16,
                              level: float = DEFAULT_LEVEL, seed: int = 1000) -> TuningResult:
    """The CumulativeRule threshold that a simulated reviewer drawing on `splits` (never the review split) does best
    with: `orders` seeded reviewer orders of `k` drawings per concept (eligible patches as in `choose_drawings`);
    score of a threshold = mean over the concepts that have detectors of the mean over orders of min(precision,
    recall) at k (an undefined precision counts 0). Ties go to the smaller threshold."""
    records = _store_records(store, manifest)
    counts = _drawable_counts(store, manifest, layer, splits=splits, concepts=concepts, min_region_px=min_region_px,
                              level=level)
    scored = [c for c in concepts if detectors.get(c) and counts[c]]
    if not scored:
        raise ExplainError(f"{layer}: no concept with detectors has drawable patches in splits {list(splits)}")
    candidates = sorted(float(t) for t in candidates)
    sums = {t: {c: np.zeros(3) for c in scored} for t in candidates}  # precision, recall, min
    rng = np.random.default_rng(seed)
    used: set[int] = set()
    for _ in range(orders):
        rule = CumulativeRule.from_counts(store.layer_shape(layer)[0], threshold=candidates[0])
        for c in concepts:
            if not counts[c]:
                continue
            for j in rng.permutation(len(counts[c]))[:k]:
                i, area, inter, n, _mask = counts[c][j]
                rule.add_counts(c, area, inter, n)
                used.add(i)
        for t in candidates:
            rule.threshold = t
            labels = rule.labels()
            for c in scored:
                p, rec, _ = _pr({u for u, lc in labels.items() if lc == c}, {int(u) for u in detectors[c]})
                p = 0.0 if p is None else p
                sums[t][c] += (p, rec, min(p, rec))
    per_concept = {t: {c: (v[0] / orders, v[1] / orders) for c, v in sums[t].items()} for t in candidates}
    scores = {t: float(np.mean([v[2] / orders for v in sums[t].values()])) for t in candidates}
    best = max(candidates, key=lambda t: (scores[t], -t))
    return TuningResult(threshold=best, scores=scores, per_concept=per_concept,
                        images=[records[i].id for i in sorted(used)], orders=orders, k=k)


# -- the whole evaluation ----------------------------------------------------------------------------------------------
def _open(settings, store, data):
    from store.activations import open_store
    from store.manifest import read_manifest

    s = store if hasattr(store, "maps") else open_store(settings.store_url(store))
    m = data if hasattr(data, "records") else read_manifest(settings.manifest_path(data))
    return s, m


def evaluate_ground_truth(settings, *, store="demo", data="demo", layers: Sequence[str] | None = None,
                          config: GroundTruthConfig = GroundTruthConfig(), progress=None) -> GroundTruthReport:
    """Steps 1–3 of the module docstring on a store and its manifest (names in the workspace, or opened objects)."""
    t0 = time.perf_counter()
    store, manifest = _open(settings, store, data)
    layers = list(layers or store.layers)
    records = _store_records(store, manifest)
    concepts = _mask_concepts(records)
    missing = [c for c in config.concepts if c not in concepts]
    if len(missing) == len(config.concepts):
        raise ExplainError(f"{manifest.path}: no ground-truth masks of {missing} (concepts with masks: {concepts})")
    if missing:  # evaluate the others; the report names the missing ones
        config = replace(config, concepts=tuple(c for c in config.concepts if c not in missing))
    iou = dataset_concept_iou(store, manifest, layers, splits=config.reference_splits, level=config.level,
                              concepts=concepts, progress=progress)
    detectors = {layer: find_detectors(iou[layer], min_iou=config.detector_iou) for layer in layers}
    known = {layer: segmented_ious(iou[layer]) for layer in layers}  # the rules' rivals
    eligible = eligible_drawings(store, manifest, config)
    order, available = choose_drawings(store, manifest, config, eligible=eligible)
    shown = images_showing(store, manifest)
    cache = FeatureCache(store)  # the assisted rule's probes read every layer's maps once
    curves, alternatives, drawings = {}, {}, []
    for layer in layers:
        alt: dict = {}
        curves[layer], drawn = simulate_reviewer(store, manifest, layer, detectors[layer], config=config, order=order,
                                                 alternatives=alt, shown=shown, cache=cache, known=known[layer])
        for name, rows in alt.items():
            alternatives.setdefault(name, {})[layer] = rows
        drawings = drawings or drawn  # the same drawings for every layer
    head = layers[-1]
    # the reviewer who follows the app's suggestions after the same first patch, on the dissection layer
    features = store.pooled(head, "max")
    population = _showing_reference(shown, reference_images(store, manifest, config))
    followed = {c: suggested_order(features, population[c], eligible[c], order[c][0], max(config.ks))
                if order[c] and c in population else order[c] for c in config.concepts}
    alt = {}
    published, _ = simulate_reviewer(store, manifest, head, detectors[head], config=config, order=followed,
                                     alternatives=alt, shown=shown, cache=cache, known=known[head])
    drawable = _drawable_counts(store, manifest, head, splits=(config.review_split,), concepts=config.concepts,
                                min_region_px=config.min_region_px, level=config.level)
    orders = {reviewer: reviewer_orders(store, manifest, head, detectors[head], config=config, shown=shown,
                                        cache=cache, reviewer=reviewer, drawable=drawable, known=known[head])
              for reviewer in REVIEWERS}
    n_ref = sum(r.split in config.reference_splits for r in records)
    return GroundTruthReport(layers=layers, config=config, concepts=concepts, iou=iou, detectors=detectors,
                             curves=curves, drawings=drawings, available=available, n_reference_images=n_ref,
                             seconds=time.perf_counter() - t0, missing=missing, alternatives=alternatives,
                             orders=orders["random"], suggested={"published": published, **alt},
                             orders_suggested=orders["suggested"])


@dataclass
class DissectReport:
    """What `python -m explain dissect` prints: dataset-level IoU and detectors per layer."""

    iou: dict[str, ConceptIoU]
    detectors: dict[str, dict[str, list[int]]]
    config: GroundTruthConfig
    n_images: int

    def summary(self) -> str:
        lines = [f"dataset-level IoU over {self.n_images} images (splits {', '.join(self.config.reference_splits)}),"
                 f" unit thresholds at level {self.config.level}, detectors: IoU > {self.config.detector_iou}"]
        for layer, res in self.iou.items():
            best, value = res.best()
            lines.append(f"\n{layer} ({len(best)} units)")
            for j, c in enumerate(res.concepts):
                units = self.detectors[layer][c]
                top = np.argsort(-res.iou[:, j])[:3]
                tops = ", ".join(f"u{u} {res.iou[u, j]:.3f}" for u in top)
                lines.append(f"  {c:<26} detectors {len(units):>3}  best units: {tops}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"config": _config_json(self.config), "n_images": self.n_images, "detectors": self.detectors,
                "iou": {layer: r.to_json() for layer, r in self.iou.items()}}


def dissect_ground_truth(settings, *, store="demo", data="demo", layer: str | None = None,
                         config: GroundTruthConfig = GroundTruthConfig()) -> DissectReport:
    """Dataset-level IoU of every unit of every layer (or `layer`) with the ground-truth concept masks."""
    store, manifest = _open(settings, store, data)
    layers = [layer] if layer else list(store.layers)
    iou = dataset_concept_iou(store, manifest, layers, splits=config.reference_splits, level=config.level)
    detectors = {lay: find_detectors(iou[lay], min_iou=config.detector_iou) for lay in layers}
    return DissectReport(iou=iou, detectors=detectors, config=config, n_images=iou[layers[0]].n_images)


# -- mlflow ------------------------------------------------------------------------------------------------------------
def log_ground_truth(report: GroundTruthReport, settings, *, run_name: str | None = None,
                     store_attrs: Mapping | None = None) -> str:
    """Log the report as one mlflow run in experiment "conceptlens-groundtruth" → the run id.

    Params: config, layers, model of the store; metrics per layer and concept with step = k
    (`<layer>/precision/<concept>`, `…/recall/…`, `…/labeled/…`; the alternative rule's as
    `<layer>/cumulative/precision/<concept>` …) and the number of detectors; artifacts: the
    report as JSON and the dataset-level IoU tables as .npy (never pickle).
    """
    import tempfile

    from mlflow.entities import Metric, Param, RunTag

    from training.registry import open_tracking

    client, exp_id = open_tracking(settings, EXPERIMENT)  # a client: no process-global mlflow state
    tags = [RunTag("mlflow.runName", run_name or "ground-truth")]
    if store_attrs:
        model = store_attrs.get("model") or {}
        tags += [RunTag("model_uri", str(model.get("model_uri", ""))),
                 RunTag("model_run_id", str(model.get("run_id", ""))),
                 RunTag("dataset_sha256", str((store_attrs.get("dataset") or {}).get("sha256", "")))]
    run = client.create_run(exp_id, run_name=run_name or "ground-truth")
    run_id = run.info.run_id
    try:
        cfg = _config_json(report.config)
        params = {"level": cfg["level"], "detector_iou": cfg["detector_iou"], "seed": cfg["seed"],
                  "rule_threshold": cfg["rule"]["threshold"], "rule_above_current": cfg["rule"]["above_current"],
                  "review_split": cfg["review_split"], "reference_splits": ",".join(cfg["reference_splits"]),
                  "layers": ",".join(report.layers), "min_region_px": cfg["min_region_px"],
                  "n_reference_images": report.n_reference_images,
                  "cumulative_threshold": cfg["cumulative_threshold"],
                  "dataset_threshold": cfg["dataset_threshold"], "assisted_prior": cfg["assisted_prior"]}
        now = int(time.time() * 1000)
        metrics = []
        for layer in report.layers:
            for concept in report.config.concepts:
                metrics.append(Metric(f"{layer}/detectors/{concept}",
                                      len(report.detectors[layer].get(concept, [])), now, 0))
                for row in report.curves[layer][concept]:
                    for key in ("precision", "recall"):
                        v = row[key]
                        metrics.append(Metric(f"{layer}/{key}/{concept}", float("nan") if v is None else float(v),
                                              now, row["k"]))
                    metrics.append(Metric(f"{layer}/labeled/{concept}", row["labeled"], now, row["k"]))
                for rule, curves in report.alternatives.items():  # the alternative rules
                    for row in curves.get(layer, {}).get(concept, []):
                        for key in ("precision", "recall"):
                            v = row[key]
                            metrics.append(Metric(f"{layer}/{rule}/{key}/{concept}",
                                                  float("nan") if v is None else float(v), now, row["k"]))
                        metrics.append(Metric(f"{layer}/{rule}/labeled/{concept}", row["labeled"], now, row["k"]))
        head = report.layers[-1]
        for rule, per in report.suggested.items():  # the reviewer following the app's suggestions
            for concept, rows in per.items():
                for row in rows:
                    for key in ("precision", "recall"):
                        v = row[key]
                        metrics.append(Metric(f"{head}/suggested/{rule}/{key}/{concept}",
                                              float("nan") if v is None else float(v), now, row["k"]))
        for tag, orders in (("orders", report.orders), ("suggested_orders", report.orders_suggested)):
            for rule, per in orders.items():  # many reviewers, deepest layer, k = goal_k
                for concept, v in per.items():
                    for key in ("precision", "recall", "met"):
                        metrics.append(Metric(f"{head}/{rule}/{tag}_{key}/{concept}", float(v[key]), now,
                                              report.config.goal_k))
        for start in range(0, len(metrics), 900):  # mlflow's batch limit is 1000 entries
            client.log_batch(run_id, metrics=metrics[start:start + 900],
                             params=[Param(k, str(v)) for k, v in params.items()] if start == 0 else [],
                             tags=tags if start == 0 else [])
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "groundtruth.json"
            p.write_text(json.dumps(report.to_json(), indent=1, default=_json_default))
            client.log_artifact(run_id, str(p))
            for layer, res in report.iou.items():
                q = Path(tmp) / f"iou_{layer}.npy"
                np.save(q, res.iou, allow_pickle=False)
                client.log_artifact(run_id, str(q), artifact_path="iou")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def _json_default(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return None if math.isnan(v) else float(v)
    return str(v)
