"""Tiny synthetic patch datasets in the manifest format, for tests that must not depend on ./workspace.

    >>> from helpers_data import make_manifest
    >>> csv = make_manifest(tmp_path / "tiny", counts={"train": 32, "val": 16, "test": 16}, size=32)
    >>> read_manifest(csv).split("train")[0].label

Negatives are smooth noise (a stand-in for breast tissue); positives add one bright Gaussian blob (a stand-in for a
mass) at a random place, so a small CNN learns the task within a few epochs and the deeper units have something to
detect. Labels alternate so every split holds both classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from store.manifest import PatchRecord, write_manifest

__all__ = ["make_patch", "make_manifest"]


def make_patch(rng: np.random.Generator, size: int, lesion: bool, *, contrast: float = 90.0) -> np.ndarray:
    """uint8 (y, x): blurred noise around mid-grey, plus a Gaussian blob of peak `contrast` when `lesion`."""
    noise = rng.normal(0.0, 1.0, (size + 4, size + 4))
    k = np.ones(5) / 5  # box blur both ways: tissue-like texture instead of white noise
    noise = np.apply_along_axis(lambda r: np.convolve(r, k, "valid"), 1, noise)
    noise = np.apply_along_axis(lambda c: np.convolve(c, k, "valid"), 0, noise)
    img = 100.0 + 60.0 * noise
    if lesion:
        cy, cx = rng.uniform(size * 0.25, size * 0.75, 2)
        r = rng.uniform(size * 0.08, size * 0.15)
        yy, xx = np.mgrid[:size, :size]
        img += contrast * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_manifest(root: str | Path, *, counts: dict[str, int] | None = None, size: int = 32, seed: int = 0,
                  contrast: float = 90.0, sizes: dict[str, int] | None = None) -> Path:
    """Write `root/images/*.png` and `root/manifest.csv`; returns the manifest path.

    `sizes` maps a patch id to a different side length (to build a mixed-size dataset on purpose).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    counts = counts or {"train": 32, "val": 16, "test": 16}
    rng = np.random.default_rng(seed)
    records = []
    for split, n in counts.items():
        for i in range(n):
            pid = f"{split}-{i:04d}"
            label = i % 2
            side = (sizes or {}).get(pid, size)
            path = root / "images" / f"{pid}.png"
            Image.fromarray(make_patch(rng, side, bool(label), contrast=contrast)).save(path)
            records.append(PatchRecord(
                id=pid, source_id=f"src-{split}-{i // 4}", view="CC", laterality="L", box=(0, 0, side, side),
                label=label, concepts=("mass",) if label else (), split=split, image=path,
            ))
    path = root / "manifest.csv"
    write_manifest(path, records)
    return path
