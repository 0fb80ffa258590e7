"""A concept's probe verdict on an image: the score it rests on, and the score from which it says "present".

    >>> from explain.verdict import calibrate_presence, verdict_scores
    >>> verdict_scores(store, "mass", [0, 1, 2])                 # the image report's verdict score of three images
    >>> cal = calibrate_presence(store, "mass", shows=images_showing(store, manifest)["mass"])
    >>> cal["threshold"], cal["sensitivity"], cal["specificity"]  # None when too few reference images are known

The score (explain.report, DESIGN.md §4): a concept probed on two or more layers (with stored maps) is scored by the
max of its map across them (explain.probes.combine_heatmaps of each layer's map upsampled to the patch: the map
the app overlays as "all layers"); probed on one layer, or without stored maps, by its deepest probe's stored score
(the max of its map at the layer's grid).

The threshold. A probe's scores are probabilities of a logistic fit on drawn cells against background cells,
class-balanced: 0.5 is where the two *training* classes are equally likely, not where an image starts to show the
concept, and the score of an image is the max over hundreds of cells, which pushes images without the concept
upwards. Measured on the demo (the bench's probes/image/*: probes from 5 drawings, 400 held-out test patches per
concept; 2026-11-29, an Intel Xeon VM's model), the verdict at 0.5 kept 91–100 % of the patches showing the
concept but spared only 37 % (spiculated margin) to 87 % of those without it. Where the dataset says which images
show the concept (the manifest's `concepts` column: explain.labelrules.images_showing), the threshold is chosen on
those reference images instead: the cut that maximizes sensitivity + specificity (Youden's J) among the verdict
scores of up to 300 images showing the concept and 300 not showing it. Measured on an AMD EPYC VM's model
(2026-11-29; 3 seeded reviewers × 5 concepts, probes from 5 drawings of test patches, the other test patches
scored), the mean of (sensitivity + specificity) / 2 on the test patches: 0.800 at 0.5, 0.870 calibrated on
train and val patches, 0.883 on val patches alone (0.87 on train patches alone: the cut chosen on patches the
model was fitted on differs from the one on patches it never saw, mass's by 0.08–0.34), so the app calibrates on
the patches outside the training split (explain.probe_eval.split_images), like the new images a report is read
for, and falls back to every patch only where those are too few. Spiculated margin on the Intel model: sensitivity /
specificity 0.99 / 0.42 at 0.5, 0.90 / 0.84 calibrated on train and val. Without enough reference images (fewer
than `min_each` of either kind: a concept the dataset does not annotate, such as "film label") the verdict keeps
0.5 (explain.probes.PRESENT).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .errors import ProbeDataError
from .probes import PRESENT, combine_heatmaps, upsample

__all__ = ["choose_verdict_probes", "verdict_probes", "verdict_layers", "max_across_layers", "verdict_scores",
           "presence_threshold", "calibrate_presence", "MIN_EACH", "MAX_REFERENCE"]

MIN_EACH = 10  # reference images of each kind (showing the concept, not showing it) needed to calibrate
MAX_REFERENCE = 600  # reference images scored to calibrate: at most half of them showing the concept
_CHUNK = 64  # images upsampled at once when scoring the map across layers


def choose_verdict_probes(probes: Mapping[str, object], order: Sequence[str]) -> dict:
    """Of a concept's stored probes ({layer: store.probe(concept, layer)}), those its verdict rests on, in the
    network's `order`: the ones with stored maps when there are two or more (their map across layers), else the
    deepest one."""
    probed = [layer for layer in order if layer in probes]
    mapped = [layer for layer in probed if probes[layer].maps is not None]
    return {layer: probes[layer] for layer in (mapped if len(mapped) >= 2 else probed[-1:])}


def verdict_probes(store, concept: str, layers: Sequence[str] | None = None) -> dict:
    """{layer: stored probe} the concept's verdict rests on (`choose_verdict_probes`), of `layers` (default: every
    layer with a stored probe of the concept; given, each must hold one)."""
    have = {layer for c, layer in store.probes() if c == concept} if layers is None else set(layers)
    chosen = choose_verdict_probes({layer: store.probe(concept, layer) for layer in store.layers if layer in have},
                                   store.layers)
    if not chosen:
        raise ProbeDataError(f"no probe of {concept!r} in {store.url}"
                             + (f" on layers {list(layers)}" if layers is not None else ""))
    return chosen


def verdict_layers(store, concept: str, layers: Sequence[str] | None = None) -> list[str]:
    """The layers whose probes make the concept's verdict, in the network's order (`verdict_probes`)."""
    return list(verdict_probes(store, concept, layers))


def max_across_layers(grids: Callable[[np.ndarray], list[np.ndarray]], images: np.ndarray,
                      size: tuple[int, int]) -> np.ndarray:
    """The max over the patch of the map across layers, per image: `grids(part)` gives each layer's grid map of
    the images `part` [(image, y, x)], upsampled to `size` and combined (combine_heatmaps) a chunk at a time."""
    images = np.asarray(images, np.int64)
    out = np.empty(len(images), np.float64)
    for lo in range(0, len(images), _CHUNK):
        part = images[lo:lo + _CHUNK]
        heat = combine_heatmaps([upsample(g, size) for g in grids(part)])
        out[lo:lo + len(part)] = heat.reshape(len(part), -1).max(axis=1)
    return out


def verdict_scores(store, concept: str, images: Sequence[int], *, layers: Sequence[str] | None = None,
                   size: tuple[int, int] | None = None, chosen: Mapping[str, object] | None = None) -> np.ndarray:
    """The verdict score of each of `images` (store indices): float64, as the image report scores them. chosen:
    `verdict_probes(store, concept, layers)` when the caller has it already."""
    from .dissection import patch_size

    chosen = verdict_probes(store, concept, layers) if chosen is None else chosen
    images = np.asarray(images, np.int64).reshape(-1)
    if images.size and (images.min() < 0 or images.max() >= store.n_images):
        raise ProbeDataError(f"image indices must be in [0, {store.n_images}), got {images.min()}…{images.max()}")
    probes = list(chosen.values())
    if len(probes) == 1:
        return np.asarray(probes[0].scores, np.float64)[images]
    return max_across_layers(lambda part: [p.maps[part] for p in probes], images, size or patch_size(store))


def presence_threshold(scores: np.ndarray, shows: np.ndarray, *, min_each: int = MIN_EACH) -> float | None:
    """The score from which "present" best separates reference images that show the concept (`shows` True) from
    those that do not: the cut maximizing sensitivity + specificity, halfway between the two scores it falls
    between (ties: the cut nearest PRESENT). None when fewer than `min_each` images of either kind."""
    scores, shows = np.asarray(scores, np.float64), np.asarray(shows, bool)
    if scores.shape != shows.shape or scores.ndim != 1:
        raise ProbeDataError(f"calibrating needs one score per image: {scores.shape} scores, {shows.shape} truths")
    if not np.isfinite(scores).all():
        raise ProbeDataError("calibrating needs finite scores")
    pos, neg = np.sort(scores[shows]), np.sort(scores[~shows])
    if min(len(pos), len(neg)) < max(1, int(min_each)):
        return None
    values = np.unique(scores)
    cuts = np.concatenate([[values[0]], (values[1:] + values[:-1]) / 2])  # "present" from each cut up
    j = (len(pos) - np.searchsorted(pos, cuts, "left")) / len(pos) + np.searchsorted(neg, cuts, "left") / len(neg)
    best = np.flatnonzero(j >= j.max() - 1e-12)
    return float(cuts[best[np.argmin(np.abs(cuts[best] - PRESENT))]])


def calibrate_presence(store, concept: str, shows: Sequence[int], *, reference: Sequence[int] | None = None,
                       layers: Sequence[str] | None = None, max_images: int = MAX_REFERENCE,
                       min_each: int = MIN_EACH, seed: int = 0) -> dict | None:
    """The concept's presence threshold chosen on reference images (module docstring).

    shows: store indices of the images known to show the concept; every other image of `reference` (default: the
    whole store) is known not to. At most `max_images` reference images are scored, half showing the concept where
    there are enough, drawn with `seed`. Returns {"threshold", "sensitivity", "specificity" (on the reference
    images, at that threshold), "n_with", "n_without", "layers"}, or None when fewer than `min_each` of either kind.
    """
    pool = np.arange(store.n_images) if reference is None else np.unique(np.asarray(reference, np.int64))
    showing = np.isin(pool, np.asarray(shows, np.int64))
    with_c, without = pool[showing], pool[~showing]
    if min(len(with_c), len(without)) < max(1, int(min_each)):
        return None
    rng = np.random.default_rng(seed)
    n_with = min(len(with_c), max(max_images // 2, max_images - len(without)))
    pick_with = rng.permutation(with_c)[:n_with]
    pick_without = rng.permutation(without)[:max_images - n_with]
    images = np.concatenate([pick_with, pick_without])
    truth = np.arange(len(images)) < len(pick_with)
    chosen = verdict_probes(store, concept, layers)
    scores = verdict_scores(store, concept, images, chosen=chosen)
    t = presence_threshold(scores, truth, min_each=min_each)
    if t is None:
        return None
    said = scores >= t
    return {"threshold": t, "sensitivity": float(said[truth].mean()), "specificity": float((~said[~truth]).mean()),
            "n_with": int(truth.sum()), "n_without": int((~truth).sum()),
            "layers": list(chosen)}
