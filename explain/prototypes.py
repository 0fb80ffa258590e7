"""Prototypes: the patches that show what a unit, a probe or a class stands for, and overlays to show them.

    >>> from explain.prototypes import unit_prototypes, probe_prototypes, class_prototypes, render_overlay
    >>> protos = unit_prototypes(store, "features.13", 42, k=8)    # top-k patches with the unit's mask
    >>> png = render_overlay(store.image(protos[0].image), protos[0].mask)        # PNG bytes, mask outlined
    >>> probe_prototypes(store, "mass", "features.13", k=8)         # highest probe scores, with heatmaps
    >>> class_prototypes(store, k=8)["lesion"]                      # most confident correct predictions

- A unit's prototypes are its top-k images from the store (largest max activation), each with the unit's
  Network-Dissection mask on it (explain.dissection.unit_masks: bilinear upsampling, threshold at the unit's
  dataset quantile, level 0.99 by default).
- A probe's prototypes are the images with the highest stored scores of its current version, with the heatmap.
- A class's prototypes are the images of that ground-truth class that the model predicts correctly with the highest
  probability (the model's clearest cases of the class, not only typical images).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .dissection import DEFAULT_LEVEL, patch_size, unit_masks
from .errors import ExplainError, UnknownConceptError, UnknownLayerError, UnknownUnitError

__all__ = ["Prototype", "unit_prototypes", "probe_prototypes", "class_prototypes", "mask_outline", "colorize",
           "render_overlay"]


@dataclass(frozen=True)
class Prototype:
    """One prototypical patch: its index and id in the store, the value that ranked it, and what to overlay."""

    image: int
    image_id: str
    value: float  # unit: max activation; probe: score; class: predicted probability
    mask: np.ndarray | None = None  # bool (Y, X): the unit's mask on this patch
    heatmap: np.ndarray | None = None  # float32 (Y, X) in [0, 1]: the probe's heatmap on this patch


def _check_layer(store, layer: str) -> None:
    if layer not in store.layers:
        raise UnknownLayerError(layer, known=store.layers, where=str(store.url))


def unit_prototypes(store, layer: str, unit: int, *, k: int | None = None,
                    level: float = DEFAULT_LEVEL) -> list[Prototype]:
    """Top-k patches of a unit (best first) with its mask on each; k defaults to all that the store keeps."""
    _check_layer(store, layer)
    n_units = store.layer_shape(layer)[0]
    if not 0 <= int(unit) < n_units:
        raise UnknownUnitError(unit, where=f"layer {layer!r} ({n_units} units)")
    unit = int(unit)
    ids, values = store.topk(layer)  # (unit, k)
    rows = [(int(i), float(v)) for i, v in zip(ids[unit], values[unit]) if i >= 0][:k]
    if not rows:
        return []
    threshold = np.asarray(store.thresholds(layer, level), np.float32)[unit:unit + 1]
    maps = store.maps_many(layer, [i for i, _ in rows])[:, unit:unit + 1]  # (image, 1, y, x)
    size = patch_size(store)
    return [Prototype(image=i, image_id=store.image_ids[i], value=v, mask=unit_masks(m, threshold, size)[0])
            for (i, v), m in zip(rows, maps)]


def probe_prototypes(store, concept: str, layer: str, *, k: int = 8) -> list[Prototype]:
    """Top-k patches by the current probe version's score (best first), each with its heatmap at patch size."""
    from .probes import upsample

    _check_layer(store, layer)
    try:
        stored = store.probe(concept, layer)
    except KeyError:
        raise UnknownConceptError(concept, where=f"the probes of layer {layer!r} in {store.url}",
                                  known=[c for c, l in store.probes() if l == layer]) from None
    order = np.argsort(-np.nan_to_num(stored.scores, nan=-np.inf), kind="stable")[:k]
    size = patch_size(store)
    return [Prototype(image=int(i), image_id=store.image_ids[i], value=float(stored.scores[i]),
                      heatmap=None if stored.maps is None else upsample(stored.maps[i], size)) for i in order]


def class_prototypes(store, *, k: int = 8) -> dict[str, list[Prototype]]:
    """Per class: the correctly predicted images of that class with the highest predicted probability."""
    probs = np.asarray(store.probs())  # (image, class)
    labels = np.asarray(store.labels())
    pred = probs.argmax(axis=1)
    out = {}
    for c, name in enumerate(store.classes or [str(i) for i in range(probs.shape[1])]):
        idx = np.flatnonzero((labels == c) & (pred == c))
        idx = idx[np.argsort(-probs[idx, c], kind="stable")][:k]
        out[name] = [Prototype(image=int(i), image_id=store.image_ids[i], value=float(probs[i, c])) for i in idx]
    return out


# -- rendering (for the app) -------------------------------------------------------------------------------------------
def mask_outline(mask: np.ndarray) -> np.ndarray:
    """bool (Y, X): the mask's pixels that have a 4-neighbour outside it (or lie on the patch border)."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


# a perceptually ordered ramp (dark purple → red → yellow), anchors of a magma-like map
_RAMP = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], np.float64)


def colorize(values: np.ndarray, *, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """float (Y, X) → uint8 RGB (Y, X, 3) on a dark-to-bright ramp; values are clipped to [vmin, vmax]."""
    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    f = (t - lo)[..., None]
    return np.round(_RAMP[lo] * (1 - f) + _RAMP[lo + 1] * f).astype(np.uint8)


def render_overlay(image: np.ndarray, overlay: np.ndarray | None = None, *, color: tuple[int, int, int] = (255, 60, 0),
                   alpha: float = 0.5, outline: bool = True, vmin: float = 0.0, vmax: float | None = None,
                   scale: int = 1) -> bytes:
    """PNG bytes of a grayscale patch with a mask or a heatmap on top.

        >>> render_overlay(patch, unit_mask)                 # bool (Y, X): outlined in `color` (filled if not outline)
        >>> render_overlay(patch, heatmap, alpha=0.6)        # float (Y, X): colour ramp, opacity ∝ value
        >>> render_overlay(patch, scale=4)                   # the patch alone, 4× larger (nearest neighbour)

    image: uint8 (Y, X); overlay: same size. A heatmap is scaled to [vmin, vmax] (vmax: its max when None) and
    blended with opacity alpha × value, so low values leave the tissue visible.
    """
    from PIL import Image

    img = np.asarray(image)
    if img.ndim != 2 or img.dtype != np.uint8:
        raise ExplainError(f"render_overlay: image must be uint8 (y, x), got {img.dtype} {img.shape}")
    rgb = np.repeat(img[..., None], 3, axis=2).astype(np.float64)  # (Y, X, 3)
    if overlay is not None:
        ov = np.asarray(overlay)
        if ov.shape != img.shape:
            raise ExplainError(f"render_overlay: overlay {ov.shape} does not match the image {img.shape}")
        if ov.dtype == bool:
            sel = mask_outline(ov) if outline else ov
            a = 1.0 if outline else alpha
            rgb[sel] = rgb[sel] * (1 - a) + np.asarray(color, np.float64) * a
        else:
            v = np.nan_to_num(ov.astype(np.float64), nan=vmin)
            top = float(v.max()) if vmax is None else float(vmax)
            w = (np.clip((v - vmin) / max(top - vmin, 1e-12), 0, 1) * alpha)[..., None]
            rgb = rgb * (1 - w) + colorize(v, vmin=vmin, vmax=max(top, vmin + 1e-12)).astype(np.float64) * w
    out = np.round(rgb).clip(0, 255).astype(np.uint8)
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG")
    return buf.getvalue()
