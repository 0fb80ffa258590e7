"""TCAV (Kim et al., 2018) for ConceptLens' spatial concept probes.

    >>> from explain.tcav import class_sensitivities
    >>> sens = class_sensitivities(model.module, x, labels, layer="features.13", classes=["normal", "lesion"])
    >>> sens.scores(probe.cav)                 # {'normal': 0.21, 'lesion': 0.88}

A probe's CAV v (unit,) is a direction in the space of one position's unit values. Moving the layer's activation
A (unit, y, x) along v at every position changes class c's logit f_c at the rate S_c = Σ_{y,x} ∇_A f_c[:, y, x] · v,
so the per-image sensitivity is the position-summed gradient (unit,) dotted with v. The TCAV score of class c is
the fraction of images of class c (ground-truth label) with S_c > 0. This is exactly captum's TCAV with the CAV
tiled over positions (captum flattens the layer output), which tests/test_probes.py checks when captum imports.

Caveat: right before global average pooling and a linear head, ∂f_c/∂A is the head's row / (y·x) at every
position of every image, so S_c is the same for all images and the score is 0 or 1: TCAV says more at earlier
layers. The gradients do not depend on the CAV, so they are computed once per layer (`ClassSensitivities`) and every
probe fit gets its TCAV scores from a matrix product.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .errors import ProbeDataError
from .hooks import Trace

__all__ = ["layer_gradients", "sensitivities", "tcav_score", "ClassSensitivities", "class_sensitivities",
           "store_sensitivities"]


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


def sensitivities(module: nn.Module, x: torch.Tensor, layer: str, *, target: int | Sequence[int],
                  batch_size: int = 64) -> np.ndarray:
    """Position-summed gradients of the target logit at `layer`: (n, unit) float32 (see the module docstring)."""
    out = []
    tgt = np.broadcast_to(np.asarray(target), (x.shape[0],))
    for i in range(0, x.shape[0], batch_size):
        g = layer_gradients(module, x[i:i + batch_size], layer, target=tgt[i:i + batch_size].tolist())
        out.append(g.sum(axis=(2, 3)) if g.ndim == 4 else g.reshape(g.shape[0], -1))
    if not out:
        raise ProbeDataError(f"TCAV at {layer}: no images")
    return np.concatenate(out).astype(np.float32)


def tcav_score(sens: np.ndarray, cav: np.ndarray) -> float:
    """Fraction of images whose directional derivative along `cav` is positive: sens (n, unit), cav (unit,)."""
    sens = np.asarray(sens, dtype=np.float64)
    if sens.ndim != 2 or len(sens) == 0:
        return float("nan")
    return float(np.mean(sens @ np.asarray(cav, dtype=np.float64) > 0))


@dataclass(frozen=True)
class ClassSensitivities:
    """Per-class sensitivities of one layer: class name → (image, unit), computed once, reused by every probe."""

    layer: str
    per_class: dict  # class name → (n, unit) float32

    def scores(self, cav: np.ndarray) -> dict[str, float]:
        """TCAV score of each class for a CAV (unit,)."""
        return {c: tcav_score(s, cav) for c, s in self.per_class.items()}


def class_sensitivities(module: nn.Module, x: torch.Tensor, labels: Sequence[int], *, layer: str,
                        classes: Sequence[str], batch_size: int = 64) -> ClassSensitivities:
    """Sensitivities of each class's logit on the images of that class: x (n, 1, Y, X), labels (n,)."""
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != x.shape[0]:
        raise ProbeDataError(f"TCAV at {layer}: {x.shape[0]} images but {len(labels)} labels")
    per = {}
    for c, name in enumerate(classes):
        idx = np.flatnonzero(labels == c)
        if len(idx):
            per[name] = sensitivities(module, x[torch.from_numpy(idx)], layer, target=c, batch_size=batch_size)
    return ClassSensitivities(layer=layer, per_class=per)


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
    return class_sensitivities(model.module, x, labels[idx], layer=layer, classes=classes, batch_size=batch_size)
