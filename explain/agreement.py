"""Agreement between readers of a review session: Cohen's kappa on unit labels, Dice on drawn regions.

    >>> from explain.agreement import label_kappa, region_dice, agreement
    >>> label_kappa(db, session=3, layer="features.9", a="ana", b="rob", n_units=128)   # float, or None
    >>> region_dice(db, session=3, image="p0012", concept="mass", a="ana", b="rob")    # float, or None
    >>> agreement(db, session=3, layers={"features.9": 128, "features.16": 256})
    {"session": 3, "annotators": ["ana", "rob"], "layers": {...},
     "pairs": [{"a": "ana", "b": "rob", "kappa": {"features.9": 0.41, …}, "dice": 0.72, "n_images": 4,
                "n_regions_compared": 5}]}

Kappa: over every unit 0 … n_units-1 of the layer, each reader's category is their own label's concept or "none";
κ = (p_o − p_e) / (1 − p_e). None when it is undefined (p_e = 1: both readers put every unit in the same single
category, e.g. neither labeled anything) or n_units is 0.
Dice: each reader's regions of the concept on the image (undone drawings left out) are united into one mask;
Dice = 2|A∩B| / (|A| + |B|). None when a reader drew no such region there (or both masks are empty).
`agreement` pairs every two annotators (authors of unit labels or regions in the session, sorted by name): kappa per
layer, and the mean Dice over the (image, concept) pairs both drew (`n_images`: the images behind them).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

from .errors import LabelError
from .labels import annotators as _label_annotators
from .labels import current_labels, regions_for
from .regions import rasterize_regions

__all__ = ["cohen_kappa", "dice", "label_kappa", "region_dice", "agreement"]


def cohen_kappa(a, b) -> float | None:
    """Cohen's kappa of two equally long sequences of categories (None when undefined)."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise LabelError(f"kappa needs two ratings per item: {len(a)} and {len(b)} ratings")
    n = len(a)
    if n == 0:
        return None
    cats = sorted(set(a) | set(b), key=str)
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(cats), len(cats)), np.float64)  # (category of a, category of b)
    np.add.at(table, ([index[x] for x in a], [index[y] for y in b]), 1.0)
    p_o = np.trace(table) / n
    p_e = float((table.sum(axis=1) / n) @ (table.sum(axis=0) / n))
    if p_e >= 1.0 - 1e-12:
        return None
    return float((p_o - p_e) / (1.0 - p_e))


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice of two boolean masks of one shape (None when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape:
        raise LabelError(f"Dice of masks of different shapes {a.shape} and {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _ratings(db, session: int, layer: str, author: str, n_units: int) -> list[str]:
    labels = current_labels(db, layer, session=session, author=author)
    out = ["none"] * n_units
    for unit, concept in labels.items():
        if not 0 <= unit < n_units:
            raise LabelError(f"{author} labeled unit {unit} of {layer!r}, which has only {n_units} units")
        out[unit] = concept
    return out


def label_kappa(db, *, session: int, layer: str, a: str, b: str, n_units: int) -> float | None:
    """Cohen's kappa of readers a and b over all units of `layer` (categories: concept or "none")."""
    if isinstance(n_units, bool) or not isinstance(n_units, (int, np.integer)) or n_units < 0:
        raise LabelError(f"n_units must be a non-negative integer, got {n_units!r}")
    if n_units == 0:
        return None
    return cohen_kappa(_ratings(db, session, layer, a, int(n_units)), _ratings(db, session, layer, b, int(n_units)))


def _union(regions) -> np.ndarray | None:
    mask = None
    for r in regions:
        m = rasterize_regions(r.specs, r.shape)
        if mask is not None and mask.shape != m.shape:
            raise LabelError(f"regions of image {r.image_id} were drawn on patches of different sizes "
                             f"{mask.shape} and {m.shape}")
        mask = m if mask is None else (mask | m)
    return mask


def region_dice(db, *, session: int, image: str, concept: str, a: str, b: str) -> float | None:
    """Dice of the union of a's and of b's regions of `concept` on `image` (None: one of them drew none)."""
    ma = _union(regions_for(db, concept, image=image, session=session, author=a))
    mb = _union(regions_for(db, concept, image=image, session=session, author=b))
    if ma is None or mb is None:
        return None
    return dice(ma, mb)


def agreement(db, *, session: int, layers: dict[str, int]) -> dict:
    """Every pair of annotators of the session: kappa per layer and the mean Dice of their regions."""
    regions = regions_for(db, session=session)
    names = sorted(set(_label_annotators(db, session=session)) | {r.author for r in regions})
    drawn: dict[str, dict[tuple[str, str], list]] = {}
    for r in regions:
        drawn.setdefault(r.author, {}).setdefault((r.image_id, r.concept), []).append(r)
    pairs = []
    for a, b in combinations(names, 2):
        kappa = {layer: label_kappa(db, session=session, layer=layer, a=a, b=b, n_units=n)
                 for layer, n in sorted(layers.items())}
        both = sorted(set(drawn.get(a, {})) & set(drawn.get(b, {})))
        scores = []
        for key in both:
            d = dice(_union(drawn[a][key]), _union(drawn[b][key]))
            if d is not None:
                scores.append(d)
        pairs.append({"a": a, "b": b, "kappa": kappa, "dice": float(np.mean(scores)) if scores else None,
                      "n_images": len({image for image, _ in both}), "n_regions_compared": len(scores)})
    return {"session": session, "annotators": names, "layers": dict(sorted(layers.items())), "pairs": pairs}
