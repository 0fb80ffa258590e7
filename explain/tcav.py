"""TCAV (Kim et al., 2018) for ConceptLens' spatial concept probes.

    >>> from explain.tcav import class_sensitivities
    >>> sens = class_sensitivities(model.module, x, labels, layer="features.13", classes=["normal", "lesion"])
    >>> sens.scores(probe.cav)                 # {'normal': 0.21, 'lesion': 0.88}

A probe's CAV v (unit,) is a direction in the space of one position's unit values. Moving the layer's activation
A (unit, y, x) along v at every position changes class c's logit f_c at the rate S_c = Σ_{y,x} ∇_A f_c[:, y, x] · v,
so the per-image sensitivity is the position-summed gradient (unit,) dotted with v. The TCAV score of class c is
the fraction of images of class c (ground-truth label) with S_c > 0. This is exactly captum's TCAV with the CAV
tiled over positions (captum flattens the layer output), which tests/test_probes.py checks when captum imports.

Adding the concept at *every* position (including where there is only fat or skin) is not what a reviewer means
by "more of this mass", and at early layers it often lowers the lesion logit of lesion images. So a second,
local score is reported too: S_c = Σ_{y,x} h(y, x) · ∇_A f_c[:, y, x] · v, the concept grown where the probe's
heatmap h says it is (`local_tcav_score`). On the demo model the mass probe's local score is ≈ 1 for the lesion
class at every layer, while the tiled score ranges from 0.2 to 1 depending on the layer.

Caveat: right before global average pooling and a linear head, ∂f_c/∂A is the head's row / (y·x) at every
position of every image, so S_c is the same for all images and the score is 0 or 1: TCAV says more at earlier
layers. The gradients do not depend on the CAV, so they are computed once per layer (`ClassSensitivities`) and every
probe fit gets its TCAV scores from a matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import ProbeDataError
from .hooks import Trace

__all__ = ["layer_gradients", "sensitivities", "tcav_score", "local_tcav_score", "ClassSensitivities",
           "class_sensitivities", "store_sensitivities"]


def class_logits(out: torch.Tensor) -> torch.Tensor:
    """(batch, class) logits; a single-output network (batch,) or (batch, 1) gives (-f, f) for classes 0 and 1."""
    if out.ndim == 1 or (out.ndim == 2 and out.shape[1] == 1):
        f = out.reshape(-1)
        return torch.stack([-f, f], dim=1)
    return out


def layer_gradients(module: nn.Module, x: torch.Tensor, layer: str, *, target: int | Sequence[int]) -> np.ndarray:
    """∂ logit_target / ∂ A for the output A of `layer`: x (n, 1, Y, X) → (n, unit, y, x) float32.

        >>> g = layer_gradients(net, x, "features.13", target=1)
    """
    n = x.shape[0]
    tgt = torch.as_tensor(target).reshape(-1).expand(n) if np.ndim(target) == 0 else torch.as_tensor(target)
    with torch.enable_grad(), Trace(module, layer, retain_grad=True) as t:
        xg = x.detach().clone().requires_grad_(True)  # keeps a graph even when the weights are frozen
        logits = class_logits(module(xg))  # (n, class)
        act = t.output  # (n, unit, y, x), still in the graph
        picked = logits.gather(1, tgt.reshape(-1, 1).to(logits.device)).sum()
        (grad,) = torch.autograd.grad(picked, act)
    return grad.detach().float().cpu().numpy()


def _gradients(module: nn.Module, x: torch.Tensor, layer: str, target, batch_size: int) -> np.ndarray:
    """layer_gradients in batches: (n, unit, y, x) float32."""
    out = []
    tgt = np.broadcast_to(np.asarray(target), (x.shape[0],))
    for i in range(0, x.shape[0], batch_size):
        out.append(layer_gradients(module, x[i:i + batch_size], layer, target=tgt[i:i + batch_size].tolist()))
    if not out:
        raise ProbeDataError(f"TCAV at {layer}: no images")
    return np.concatenate(out).astype(np.float32)


def sensitivities(module: nn.Module, x: torch.Tensor, layer: str, *, target: int | Sequence[int],
                  batch_size: int = 64) -> np.ndarray:
    """Position-summed gradients of the target logit at `layer`: (n, unit) float32 (see the module docstring)."""
    g = _gradients(module, x, layer, target, batch_size)
    return g.sum(axis=(2, 3)) if g.ndim == 4 else g.reshape(g.shape[0], -1)


def tcav_score(sens: np.ndarray, cav: np.ndarray) -> float:
    """Fraction of images whose directional derivative along `cav` is positive: sens (n, unit), cav (unit,)."""
    sens = np.asarray(sens, dtype=np.float64)
    if sens.ndim != 2 or len(sens) == 0:
        return float("nan")
    return float(np.mean(sens @ np.asarray(cav, dtype=np.float64) > 0))


def local_tcav_score(gradients: np.ndarray, cav: np.ndarray, heatmaps: np.ndarray) -> float:
    """Fraction of images whose derivative is positive when the concept grows *where the probe sees it*:
    S = Σ_{y,x} h(y, x) · ∇_A f[:, y, x] · v, with gradients (n, unit, y, x), cav v (unit,), heatmaps h (n, y, x)."""
    g = np.asarray(gradients)
    if g.ndim != 4 or len(g) == 0:
        return float("nan")
    n, u = g.shape[:2]
    # one (n, y·x, unit) @ (unit,) product in the gradients' own precision (float32: no float64 copy of them), the
    # weighted sum over positions in float64
    d = np.matmul(np.asarray(cav, dtype=g.dtype), g.reshape(n, u, -1))  # (n, y·x) directional derivatives
    h = np.asarray(heatmaps).reshape(n, -1)
    return float(np.mean(np.einsum("np,np->n", d.astype(np.float64), h.astype(np.float64)) > 0))


@dataclass(frozen=True)
class ClassSensitivities:
    """Per-class gradients of one layer, computed once and reused by every probe of that layer.

    per_class: class name → position-summed gradients (image, unit); gradients: class name → the full gradients
    (image, unit, y, x); images: class name → the images' indices (in the store, or in the given batch).
    """

    layer: str
    per_class: dict
    gradients: dict = field(default_factory=dict)
    images: dict = field(default_factory=dict)

    def scores(self, cav: np.ndarray) -> dict[str, float]:
        """TCAV score of each class for a CAV (unit,), the CAV applied at every position (= captum's TCAV)."""
        return {c: tcav_score(s, cav) for c, s in self.per_class.items()}

    def local_scores(self, cav: np.ndarray, heatmaps: dict) -> dict[str, float]:
        """Local TCAV score of each class: heatmaps maps class name → the probe's heatmaps (image, y, x) of
        `images[class]`."""
        return {c: local_tcav_score(g, cav, heatmaps[c]) for c, g in self.gradients.items()}


def class_sensitivities(module: nn.Module, x: torch.Tensor, labels: Sequence[int], *, layer: str,
                        classes: Sequence[str], batch_size: int = 64,
                        indices: Sequence[int] | None = None) -> ClassSensitivities:
    """Gradients of each class's logit on the images of that class: x (n, 1, Y, X), labels (n,).

    indices (n,): what to call the images in `.images` (e.g. their store indices; default 0 … n-1).
    """
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != x.shape[0]:
        raise ProbeDataError(f"TCAV at {layer}: {x.shape[0]} images but {len(labels)} labels")
    names = np.arange(len(labels)) if indices is None else np.asarray(indices, np.int64)
    per, grads, images = {}, {}, {}
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            g = _gradients(module, x[torch.from_numpy(idx)], layer, c, batch_size)  # (n, unit, y, x)
            grads[name] = g
            per[name] = g.sum(axis=(2, 3)) if g.ndim == 4 else g.reshape(g.shape[0], -1)
            images[name] = names[idx]
    return ClassSensitivities(layer=layer, per_class=per, gradients=grads, images=images)


def store_sensitivities(store, model, layer: str, *, per_class: int = 64, seed: int = 0,
                        batch_size: int = 64) -> ClassSensitivities:
    """Class sensitivities from a store's patches: `per_class` images of each ground-truth class, chosen with `seed`.

        >>> sens = store_sensitivities(store, load_model(ref, settings=s), "features.13")
    """
    from training.transforms import preprocess

    labels = np.asarray(store.labels()).reshape(-1)
    classes = list(model.meta.get("classes") or ["normal", "lesion"])
    rng = np.random.default_rng(seed)
    idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class]
                                  for c in range(len(classes))]).astype(np.int64))
    if len(idx) == 0:
        raise ProbeDataError(f"TCAV at {layer}: the store has no labeled images")
    images = np.asarray(store.images())[idx]  # (n, Y, X) uint8
    x = preprocess(images, model.transform)
    model.module.eval()
    return class_sensitivities(model.module, x, labels[idx], layer=layer, classes=classes, batch_size=batch_size,
                               indices=idx)
