"""A small real-data activation store for the explain tests: patches of a real CBIS-DDSM mammogram, half of them
with an inserted mass (a bright, soft-edged disc) whose exact mask is kept, run through a small zoo network.

    >>> from helpers_probes import build_lesion_store
    >>> lesion = build_lesion_store(tmp_path / "s.zarr", real_dicoms[0])
    >>> lesion.store.maps("features.6", 0).shape, lesion.masks.shape        # (unit, y, x), (image, Y, X)

The network is a VGG-BN from training.zoo, trained for a few hundred steps to tell lesion patches from normal ones,
so its deeper units respond to the inserted masses the way a demo model's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from explain.hooks import Trace
from store.activations import ActivationStore, StoreLayout, create_store, open_store
from store.images import read_image
from training.transforms import preprocess
from training.zoo import VGGConfig, vgg_bn

TRANSFORM = {"mean": 0.5, "std": 0.25}


@dataclass
class LesionStore:
    store: ActivationStore  # writable
    url: str
    masks: np.ndarray  # bool (image, Y, X): the inserted mass of each lesion patch (all False for normal ones)
    net: torch.nn.Module
    layers: list[str]
    model: object  # a training.registry.LoadedModel-like object: .module, .meta, .transform


class _Loaded:
    def __init__(self, net, layers):
        self.module = net
        self.meta = {"transform": TRANSFORM, "layers": layers, "classes": ["normal", "lesion"],
                     "input_size": [0, 0]}

    @property
    def transform(self):
        return self.meta["transform"]


def _patches(dicom: Path, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n uint8 (size, size) patches from the breast tissue of one real mammogram."""
    img = read_image(dicom)
    scale = min(1.0, 420.0 / max(img.data.shape))
    disp = img.display(scale=scale)  # float32 (y, x) in [0, 1]
    breast = disp > np.quantile(disp, 0.5)
    out = []
    tries = 0
    while len(out) < n:
        tries += 1
        y = rng.integers(0, disp.shape[0] - size)
        x = rng.integers(0, disp.shape[1] - size)
        if breast[y:y + size, x:x + size].mean() > 0.95 or tries > 50 * n:
            out.append(disp[y:y + size, x:x + size])
    return (np.stack(out) * 255).clip(0, 255).astype(np.uint8)


def _insert_masses(patches: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Add a soft disc to every other patch; returns (patches, masks) with mask = the disc's radius."""
    n, size, _ = patches.shape
    yy, xx = np.mgrid[:size, :size] + 0.5
    out = patches.astype(np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(1, n, 2):
        r = rng.uniform(0.15, 0.25) * size
        cy, cx = rng.uniform(r, size - r, 2)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        out[i] += 110.0 / (1.0 + np.exp((d - r) / 1.0))  # a bright, soft-edged disc
        masks[i] = d <= r
    return out.clip(0, 255).astype(np.uint8), masks


def _train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def build_lesion_store(url: str | Path, dicom: Path, *, n_images: int = 96, size: int = 32, block: int = 16,
                       seed: int = 0, steps: int = 150) -> LesionStore:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    patches, masks = _insert_masses(_patches(dicom, n_images, size, rng), rng)
    labels = np.array([i % 2 for i in range(n_images)], np.int64)
    net = vgg_bn(VGGConfig(widths=(8, 16, 32), convs=1))
    layers = net.block_outputs()[1:]  # (16, size/2, size/2) and (32, size/4, size/4)
    x = preprocess(patches, TRANSFORM)
    _train(net, x, torch.from_numpy(labels), steps, seed)
    with torch.no_grad(), Trace(net, layers) as t:
        probs = net(x).softmax(1).numpy().astype(np.float32)
        acts = {name: t.outputs[name].numpy() for name in layers}  # (image, unit, y, x)
    layout = StoreLayout(image_ids=tuple(f"img-{i:03d}" for i in range(n_images)), image_size=(size, size),
                         classes=("normal", "lesion"), layers={k: v.shape[1:] for k, v in acts.items()},
                         block=block, k=8)
    store = create_store(str(url), attrs={"model": {"name": "lesion-test", "version": 1, "run_id": "",
                                                    "model_uri": "test"},
                                          "dataset": {"manifest": "test", "sha256": "0" * 64},
                                          "transform": TRANSFORM}, layout=layout)
    for b in range(layout.n_blocks):
        s, e = b * block, min((b + 1) * block, n_images)
        store.write_block(b, images=patches[s:e], labels=labels[s:e], probs=probs[s:e],
                          layers={k: {"maps": a[s:e].astype(np.float16), "max": a[s:e].max(axis=(2, 3)),
                                      "mean": a[s:e].mean(axis=(2, 3))} for k, a in acts.items()})
    store.finalize()
    store = open_store(str(url), read_only=False)
    return LesionStore(store=store, url=str(url), masks=masks, net=net, layers=layers, model=_Loaded(net, layers))
