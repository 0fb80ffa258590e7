"""Concept probes measured against ground truth: how well do probes trained from k drawings find the concept?

    >>> from explain.probe_eval import ground_truth_masks, probe_curve
    >>> gt = ground_truth_masks(store, manifest, "mass")                       # {image index: bool (Y, X)}
    >>> curve = probe_curve(store, "mass", "features.13", gt, draw=order["mass"], evaluate=held_out)
    >>> [(p["k"], round(p["pixel_auroc"], 3)) for p in curve]                   # k = 1 … 10
    >>> probe_curve(store, "mass", store.layers, gt, draw=order["mass"], evaluate=held_out)  # every layer, combined

The simulated reviewer (issue 5, "Measured against ground truth") draws the exact ground-truth region of the
concept on k patches that hold it — the same patches, in the same order, as explain.groundtruth's reviewer who
labels units — and the probe is fitted from those k regions (cells inside vs outside, as for any drawn region) plus
background negatives from images that are never evaluated on.
Pixel AUROC: every pixel of the evaluation patches (held-out patches nobody drew on; at most `max_eval` of them,
those holding the concept first up to half of them, then others), the probe's heatmap upsampled to the patch as
the app shows it, against the concept's ground-truth mask (empty on patches without the concept). Given several
layers, a probe is fitted on each from the same drawings and the heatmaps are their geometric mean
(explain.probes.combine_heatmaps), as the app's "all layers" map shows them.
Image level (`image_figures`): the same evaluation patches, each scored as the image report scores it — a single
probe by its stored score (the max of its map at the layer's grid), the map across layers by its max at the patch
size — against whether the patch shows the concept at all: AUROC, and the sensitivity and specificity of the
report's "present" (score ≥ 0.5), which do not depend on how many evaluation patches show the concept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import ProbeDataError
from .probes import (PRESENT, FeatureCache, Probe, ProbeAnnotations, ProbeConfig, auroc, collect_examples,
                     combine_heatmaps, fit_probe, upsample)

__all__ = ["ground_truth_masks", "split_images", "eval_images", "probe_curve", "pixel_auroc", "image_figures",
           "drawing_cv_auroc"]


def ground_truth_masks(store, manifest, concept: str) -> dict[int, np.ndarray]:
    """{store image index: bool (Y, X)} of every store image whose manifest record has a mask of `concept`."""
    from PIL import Image

    by_id = manifest.by_id()
    out = {}
    for i, image_id in enumerate(store.image_ids):
        rec = by_id.get(image_id)
        if rec is None or concept not in rec.masks:
            continue
        with Image.open(rec.masks[concept]) as im:
            m = np.asarray(im) > 0
        if m.ndim == 3:
            m = m.any(axis=2)
        if m.any():
            out[i] = m
    return out


def split_images(store, manifest, split: str) -> np.ndarray:
    """Store indices of the images in a manifest split, ascending."""
    by_id = manifest.by_id()
    return np.array([i for i, image_id in enumerate(store.image_ids)
                     if image_id in by_id and by_id[image_id].split == split], np.int64)


def eval_images(candidates: np.ndarray, masks: Mapping[int, np.ndarray], *, max_eval: int = 400,
                seed: int = 0) -> np.ndarray:
    """Up to `max_eval` images: those with the concept first (at most half), then others, chosen with `seed`."""
    rng = np.random.default_rng(seed)
    with_c = np.array([i for i in candidates if i in masks], np.int64)
    without = np.array([i for i in candidates if i not in masks], np.int64)
    n_with = min(len(with_c), max_eval // 2)
    pick = list(rng.permutation(with_c)[:n_with]) + list(rng.permutation(without)[:max_eval - n_with])
    return np.sort(np.array(pick, np.int64))


def _grid_heatmaps(probes, images: np.ndarray, cache: FeatureCache) -> list[np.ndarray]:
    """Each probe's heatmaps on `images` at its layer's grid, as stored: [(image, y, x)]."""
    return [p.heatmap(cache.image_maps(p.layer, images)) for p in probes]


def _to_patch(store, grids: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Grid heatmaps upsampled to the patch as the app shows them: [(image, Y, X)]."""
    from .dissection import patch_size

    size = patch_size(store)
    return [upsample(g, size) for g in grids]


def _verdict_scores(store, probes, images: np.ndarray, cache: FeatureCache) -> np.ndarray:
    """The image report's verdict score of `images` under fitted probes of one concept (one per layer): a single
    probe's score as stored (its grid map's max), several probes' map across layers' max at the patch size."""
    from .dissection import patch_size
    from .verdict import max_across_layers

    if len(probes) == 1:
        return probes[0].score(_grid_heatmaps(probes, images, cache)[0])
    return max_across_layers(lambda part: _grid_heatmaps(probes, part, cache), images, patch_size(store))


def _truth(store, images: np.ndarray, masks: Mapping[int, np.ndarray]) -> np.ndarray:
    """The ground-truth pixels of `images`, flat (empty masks where an image lacks the concept)."""
    from .dissection import patch_size

    size = patch_size(store)
    return np.stack([masks.get(int(i), np.zeros(size, bool)) for i in images]).reshape(-1)


def image_figures(shows: np.ndarray, scores: np.ndarray, *, threshold: float = PRESENT) -> dict:
    """{"auroc", "sensitivity", "specificity", "threshold"} of image scores against bool `shows` (the image shows
    the concept); sensitivity and specificity of score ≥ `threshold`, the report's "present" (NaN where a class is
    empty)."""
    shows, scores = np.asarray(shows, bool), np.asarray(scores, np.float64)
    if shows.shape != scores.shape or shows.ndim != 1:
        raise ProbeDataError(f"image figures need one score per image: {scores.shape} scores, {shows.shape} truths")
    said = scores >= threshold
    return {"auroc": auroc(shows, scores), "threshold": float(threshold),
            "sensitivity": float(said[shows].mean()) if shows.any() else float("nan"),
            "specificity": float((~said[~shows]).mean()) if (~shows).any() else float("nan")}


def pixel_auroc(probe, store, images: np.ndarray, masks: Mapping[int, np.ndarray], *,
                cache: FeatureCache | None = None) -> float:
    """Pixel AUROC of the probe's patch-size heatmaps on `images` against the ground-truth masks; `probe` may be a
    sequence of probes of several layers, whose maps are combined as the app combines them (`combine_heatmaps`)."""
    probes = [probe] if isinstance(probe, Probe) else list(probe)
    heat = combine_heatmaps(_to_patch(store, _grid_heatmaps(probes, images, cache or FeatureCache(store))))
    return auroc(_truth(store, images, masks), heat.reshape(-1))


def probe_curve(store, concept: str, layer: str | Sequence[str], masks: Mapping[int, np.ndarray], *,
                draw: Sequence[int], evaluate: Sequence[int], ks: Sequence[int] = tuple(range(1, 11)),
                config: ProbeConfig | None = None, cache: FeatureCache | None = None,
                background_pool: Sequence[int] | None = None, reference: Sequence[int] | None = None) -> list[dict]:
    """Pixel AUROC of probes fitted from k ground-truth drawings, for every k in `ks`.

    draw: the images to draw on, in drawing order (those without the concept are skipped) — e.g. the order of
    explain.groundtruth.choose_drawings, so probes and unit labels come from the same drawings; evaluate: the images
    whose pixels are scored; background_pool: where background negatives may come from (default: the `draw`
    candidates — never the evaluated images). `layer`: one layer, or several: a probe is fitted on each from the
    same drawings and their maps are combined (`combine_heatmaps`; the counts are then those of the first layer),
    and each row also holds every layer's own figure, from the same fits, under "layers" ({layer: pixel AUROC}).
    "image" holds `image_figures` of the map (of the combined map with several layers) on the evaluated patches,
    and with several layers "image_layers" those of each layer's probe ({layer: figures}) and "image_any" those of
    the highest of their scores (any probe saying present: the report's verdict until 2026-11-29). With
    `reference` images (never evaluated on; those in `masks` show the concept), "image_calibrated" holds the
    figures of the map's score from the threshold calibrated on them (explain.verdict.presence_threshold; None
    where they are too few of a kind), as the app calibrates its verdict on the images the dataset annotates.
    Returns [{"k", "pixel_auroc", "image", "n_positive", "n_negative", "images"[, "layers", "image_layers",
    "image_any", "image_calibrated"]}].
    """
    from .verdict import presence_threshold

    cache = cache or FeatureCache(store)
    layers = [layer] if isinstance(layer, str) else list(layer)
    order = [int(i) for i in draw if int(i) in masks]
    if not order:
        raise ProbeDataError(f"ground truth for {concept!r}: no patch to draw on among {len(draw)} candidates")
    evaluate = np.asarray(evaluate, np.int64)
    if np.intersect1d(evaluate, np.asarray(order)).size:
        raise ProbeDataError(f"ground truth for {concept!r}: drawn patches must not be evaluated on")
    truth = _truth(store, evaluate, masks)
    shows = np.array([int(i) in masks for i in evaluate])
    if reference is not None:
        reference = np.asarray(reference, np.int64)
        if np.intersect1d(reference, evaluate).size:
            raise ProbeDataError(f"ground truth for {concept!r}: reference patches must not be evaluated on")
    out = []
    for k in ks:
        if k > len(order):
            break
        ann = ProbeAnnotations(concept, regions=[(i, masks[i]) for i in order[:k]])
        pool = np.setdiff1d(np.asarray(draw if background_pool is None else background_pool, np.int64), evaluate)
        fits = [fit_probe(collect_examples(store, name, ann, config=config, cache=cache, background_pool=pool),
                          concept=concept, layer=name, config=config) for name in layers]
        grids = _grid_heatmaps([f.probe for f in fits], evaluate, cache)
        heats = _to_patch(store, grids)
        stored = {f.probe.layer: f.probe.score(g) for f, g in zip(fits, grids)}  # each image's score as stored
        combined = combine_heatmaps(heats)
        scores = combined.reshape(len(evaluate), -1).max(axis=1) if len(layers) > 1 else stored[layers[0]]
        row = {"k": int(k), "pixel_auroc": auroc(truth, combined.reshape(-1)), "image": image_figures(shows, scores),
               "n_positive": fits[0].n_positive, "n_negative": fits[0].n_negative,
               "images": [store.image_ids[i] for i in order[:k]]}
        if len(layers) > 1:
            row["layers"] = {name: auroc(truth, h.reshape(-1)) for name, h in zip(layers, heats)}
            row["image_layers"] = {name: image_figures(shows, stored[name]) for name in layers}
            row["image_any"] = image_figures(shows, np.max(list(stored.values()), axis=0))
        if reference is not None:
            t = presence_threshold(_verdict_scores(store, [f.probe for f in fits], reference, cache),
                                   np.array([int(i) in masks for i in reference]))
            row["image_calibrated"] = None if t is None else image_figures(shows, scores, threshold=t)
        out.append(row)
    return out


def drawing_cv_auroc(store, concept: str, layer: str, drawings: Sequence[tuple[int, np.ndarray]], *,
                     config: ProbeConfig | None = None, cache: FeatureCache | None = None,
                     background_pool: Sequence[int] | None = None) -> float:
    """Leave-one-drawing-out pixel AUROC: for each drawn image, a probe fitted from the other drawings scores that
    image's pixels against the drawn region; the pixels of every left-out image are pooled. NaN below 2 drawings.

        >>> drawing_cv_auroc(store, "mass", "features.13", [(i, mask_i) for i in drawn])

    It uses only what the reviewer drew, and it is measured in patch pixels, so layers of different grids compare
    fairly (a cell-level AUROC favours coarse grids, whose few cells are easier to classify).
    """
    from .dissection import patch_size

    if len(drawings) < 2:
        return float("nan")
    cache = cache or FeatureCache(store)
    size = patch_size(store)
    heat, truth = [], []
    for j, (image, mask) in enumerate(drawings):
        rest = ProbeAnnotations(concept, regions=[d for n, d in enumerate(drawings) if n != j])
        pool = np.arange(store.n_images) if background_pool is None else np.asarray(background_pool, np.int64)
        pool = np.setdiff1d(pool, [image])  # the left-out image never gives background negatives
        fit = fit_probe(collect_examples(store, layer, rest, config=config, cache=cache, background_pool=pool),
                        concept=concept, layer=layer, config=config)
        heat.append(fit.probe.heatmap(cache.image_maps(layer, [image])[0], size=size))
        truth.append(np.asarray(mask, bool))
    return auroc(np.stack(truth).reshape(-1), np.stack(heat).reshape(-1))
