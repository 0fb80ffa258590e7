"""Reading the outputs of named layers during a forward pass, with hooks that never outlive their `with` block.

    >>> from explain.hooks import Trace
    >>> with Trace(model, ["features.3", "features.9"]) as t:
    ...     logits = model(x)                            # x: float32 (batch, 1, y, x)
    >>> t.outputs["features.3"].shape                    # (batch, unit, y, x), detached copies
    >>> with Trace(model, "features.9") as t:            # one layer: t.output
    ...     model(x)

A layer is named by its dotted module name (`dict(model.named_modules())` keys: `features.3`, `layer4.1.conv2`), the
same name used in the zarr store, the database and the UI. Hooks are removed when the block exits, also when the
forward pass raises, so a model is never left with a stale hook.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch
from torch import nn

from explain.errors import UnknownLayerError

__all__ = ["Trace", "resolve_layers"]


def resolve_layers(model: nn.Module, layers: str | Iterable[str]) -> dict[str, nn.Module]:
    """Map each dotted layer name to its module, in the order given; UnknownLayerError names a missing one."""
    names = [layers] if isinstance(layers, str) else list(layers)
    if not names:
        raise ValueError("Trace needs at least one layer name")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names in {names}")
    modules = dict(model.named_modules())
    found = {}
    for name in names:
        if name not in modules or name == "":
            raise UnknownLayerError(name, known=[n for n in modules if n], where=type(model).__name__)
        found[name] = modules[name]
    return found


class Trace:
    """Context manager that keeps the output of each named layer of `model` from the forward passes inside it.

        >>> with Trace(net, ["features.3"], retain_grad=True) as t:
        ...     net(x)[:, 1].sum().backward()
        >>> t.outputs["features.3"].grad                 # (batch, unit, y, x) gradient, e.g. for Grad-CAM

    Options (keyword-only):
        clone        keep a copy (default), so an in-place op after the layer (ReLU(inplace=True)) cannot change it
        retain_grad  keep the graph and call `retain_grad()` on the output (no clone, no detach): for attribution
        per_thread   `outputs` holds the outputs of the calling thread's forward passes: several threads may run
                     the model at once inside one block (extraction's workers), each reading its own outputs.
                     Hooks are registered once, on entry: never enter a Trace while another thread runs the model
    A module that returns a tuple contributes its first tensor. A module called several times per forward pass
    keeps the output of its last call. Outputs are replaced by each new forward pass.
    """

    def __init__(self, model: nn.Module, layers: str | Iterable[str], *, clone: bool = True,
                 retain_grad: bool = False, per_thread: bool = False):
        self.model = model
        self.modules = resolve_layers(model, layers)
        self.clone = clone
        self.retain_grad = retain_grad
        self._local = threading.local() if per_thread else None
        self._outputs: dict[str, torch.Tensor] = {}
        self._handles: list = []

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """layer → output of the last forward pass (of the calling thread's, with per_thread)."""
        if self._local is None:
            return self._outputs
        if not hasattr(self._local, "outputs"):
            self._local.outputs = {}
        return self._local.outputs

    @property
    def layers(self) -> list[str]:
        return list(self.modules)

    @property
    def output(self) -> torch.Tensor:
        """The output of the only traced layer (ValueError when several are traced)."""
        if len(self.modules) != 1:
            raise ValueError(f"Trace.output needs exactly one layer; this trace has {self.layers}: use .outputs[name]")
        name = next(iter(self.modules))
        if name not in self.outputs:
            raise KeyError(f"layer {name!r} produced no output yet: run the model inside the `with` block")
        return self.outputs[name]

    def _hook(self, name: str):
        def keep(_module, _inputs, out):
            t = out
            if isinstance(t, (tuple, list)):
                t = next((o for o in t if isinstance(o, torch.Tensor)), None)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(out).__name__}, not a tensor")
            if self.retain_grad:
                if t.requires_grad:
                    t.retain_grad()
            else:
                t = t.detach()
                if self.clone:
                    t = t.clone()
            self.outputs[name] = t
        return keep

    def __enter__(self) -> "Trace":
        if self._handles:
            raise RuntimeError("this Trace is already active; create a new Trace for a nested block")
        self._outputs = {}
        if self._local is not None:
            self._local = threading.local()
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every hook of this trace (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def __exit__(self, *exc) -> None:
        self.close()
