"""Attribution: Grad-CAM for the predicted class, and how much a concept contributes to a prediction.

    >>> from explain.attribution import grad_cam, units_contribution, cav_contribution
    >>> cam = grad_cam(net, x, "features.13", size=(64, 64))       # (n, 64, 64), target = predicted class
    >>> units_contribution(net, x, "features.13", [4, 17], target=1)  # (n,) logit drop when units 4, 17 are zeroed

Grad-CAM (Selvaraju et al.): with A (unit, y, x) the layer's output and G = ∂ logit_c / ∂ A, the map is
ReLU(Σ_k mean_{y,x}(G_k) · A_k) at the layer's resolution, upsampled bilinearly to `size` on request.

A concept's contribution to class c's logit is measured by removing the concept at one layer and running the rest
of the network again (an exact difference, not a first-order estimate):
- labeled units: the units labeled with the concept are set to 0 (`units_contribution`);
- a probe: the component of every position's activation along the CAV v̂ is set to its dataset mean,
  a' = a − ((a − μ)·v̂) v̂, with μ the probe's training mean (`cav_contribution`).
The result is logit_c(original) − logit_c(concept removed): positive when the concept pushes towards c.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
from torch import nn

from .hooks import Trace, resolve_layers
from .tcav import class_logits

__all__ = ["grad_cam", "predicted_class", "edited_output", "units_contribution", "cav_contribution",
           "cav_contributions"]


def predicted_class(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Argmax class of each image, (n,) int64."""
    with torch.no_grad():
        return class_logits(module(x)).argmax(dim=1).cpu().numpy()


def grad_cam(module: nn.Module, x: torch.Tensor, layer: str, *, target: int | Sequence[int] | None = None,
             size: tuple[int, int] | None = None) -> np.ndarray:
    """Grad-CAM maps of class `target` (default: each image's predicted class): x (n, 1, Y, X) → (n, y, x) float32.

        >>> cam = grad_cam(net, x, "features.13", size=x.shape[-2:])     # upsampled to the patch
    """
    n = x.shape[0]
    with torch.enable_grad(), Trace(module, layer, retain_grad=True) as t:
        xg = x.detach().clone().requires_grad_(True)
        logits = class_logits(module(xg))  # (n, class)
        if target is None:
            tgt = logits.argmax(dim=1)
        else:
            tgt = torch.as_tensor(np.broadcast_to(np.asarray(target), (n,)).copy(), device=logits.device)
        act = t.output  # (n, unit, y, x)
        (grad,) = torch.autograd.grad(logits.gather(1, tgt.reshape(-1, 1)).sum(), act)
    with torch.no_grad():
        alpha = grad.mean(dim=(2, 3), keepdim=True)  # (n, unit, 1, 1)
        cam = torch.relu((alpha * act.detach()).sum(dim=1, keepdim=True))  # (n, 1, y, x)
        if size is not None and tuple(size) != tuple(cam.shape[-2:]):
            cam = nn.functional.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)
    return cam[:, 0].float().cpu().numpy()


@contextmanager
def edited_output(module: nn.Module, layer: str, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Replace `layer`'s output by `edit(output)` inside the block; the hook is always removed on exit.

        >>> with edited_output(net, "features.13", lambda a: a * 0):
        ...     net(x)
    """
    (mod,) = resolve_layers(module, layer).values()
    handle = mod.register_forward_hook(lambda _m, _i, out: edit(out))
    try:
        yield
    finally:
        handle.remove()


def _logit_drop(module: nn.Module, x: torch.Tensor, layer: str, edit, target) -> np.ndarray:
    """logit_target(x) − logit_target(x with `layer`'s output edited): (n,)."""
    with torch.no_grad():
        base = class_logits(module(x))  # (n, class)
        with edited_output(module, layer, edit):
            edited = class_logits(module(x))
    n = edited.shape[0]
    tgt = base.argmax(dim=1) if target is None else torch.as_tensor(np.broadcast_to(np.asarray(target), (n,)).copy())
    idx = tgt.reshape(-1, 1).to(base.device)
    return (base.gather(1, idx) - edited.gather(1, idx)).reshape(-1).float().cpu().numpy()


def units_contribution(module: nn.Module, x: torch.Tensor, layer: str, units: Sequence[int], *,
                       target: int | Sequence[int] | None = None) -> np.ndarray:
    """logit_target(x) − logit_target(x with `units` of `layer` zeroed): (n,) float32; target defaults to the
    predicted class."""
    idx = torch.as_tensor(list(units), dtype=torch.long)

    def zero(a: torch.Tensor) -> torch.Tensor:  # (n, unit, y, x)
        a = a.clone()
        a[:, idx] = 0
        return a

    return _logit_drop(module, x, layer, zero, target)


def _cav_eraser(cavs: np.ndarray, means: np.ndarray) -> Callable[[torch.Tensor], torch.Tensor]:
    """The edit a' = a − ((a − μ)·v̂) v̂ at every position: one (v, μ) row for every batch element, or one row for all."""
    v = torch.as_tensor(np.atleast_2d(np.asarray(cavs, dtype=np.float32)))
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (rows, unit)
    mu = torch.as_tensor(np.atleast_2d(np.asarray(means, dtype=np.float32)))

    def erase(a: torch.Tensor) -> torch.Tensor:  # (n, unit, y, x)
        vv = v.to(a.dtype).to(a.device)[:, :, None, None]
        proj = ((a - mu.to(a.dtype).to(a.device)[:, :, None, None]) * vv).sum(dim=1, keepdim=True)  # (n, 1, y, x)
        return a - proj * vv

    return erase


def cav_contribution(module: nn.Module, x: torch.Tensor, layer: str, cav: np.ndarray, mean: np.ndarray, *,
                     target: int | Sequence[int] | None = None) -> np.ndarray:
    """logit_target(x) − logit_target(x with every position's CAV component set to the probe's mean): (n,)."""
    return _logit_drop(module, x, layer, _cav_eraser(cav, mean), target)


def cav_contributions(module: nn.Module, x: torch.Tensor, erase: Mapping[str, tuple[np.ndarray, np.ndarray]], *,
                      target: int | None = None) -> dict[str, np.ndarray]:
    """`cav_contribution` of several probes, on one or more layers, on one image x (1, 1, Y, X), all in one forward
    pass: erase {layer: (cavs, means) (probe, unit)} → {layer: (probe,)} (the image report erases each of its probes
    in turn). The batch holds the original image once and one copy per probe; each layer's hook edits only its own
    probes' copies, so every copy differs from the original at its own layer alone (the network in eval mode: no
    copy affects another)."""
    groups: dict[str, tuple[slice, Callable]] = {}
    start = 1  # row 0: the original image
    for layer, (cavs, means) in erase.items():
        cavs, means = np.atleast_2d(cavs), np.atleast_2d(means)
        if x.shape[0] != 1 or cavs.shape != means.shape:
            raise ValueError(f"one image and one mean per CAV: x {tuple(x.shape)}, {layer!r}: cavs {cavs.shape}, "
                             f"means {means.shape}")
        groups[layer] = (slice(start, start + len(cavs)), _cav_eraser(cavs, means))
        start += len(cavs)

    def edit_rows(rows: slice, edit: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        def edited(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[rows] = edit(out[rows])
            return out
        return edited

    with torch.no_grad(), ExitStack() as hooks:
        for layer, (rows, edit) in groups.items():
            hooks.enter_context(edited_output(module, layer, edit_rows(rows, edit)))
        logits = class_logits(module(x.expand(start, *x.shape[1:])))  # (1 + probes, class)
    tgt = int(logits[0].argmax()) if target is None else int(target)
    drop = (logits[0, tgt] - logits[:, tgt]).float().cpu().numpy()
    return {layer: drop[rows] for layer, (rows, _) in groups.items()}
