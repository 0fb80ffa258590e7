"""Patch datasets from any manifest, checked before training, with augmentation written in torch.

    >>> from training.datamodule import DataConfig, PatchDataModule
    >>> dm = PatchDataModule(DataConfig(manifest="demo"), manifest_path=settings.manifest_path("demo"))
    >>> summary = dm.check()           # DataError now (missing files, one class, empty split, mixed sizes…)
    >>> summary.input_size, summary.counts["train"]

The dataloaders yield uint8 patches `(batch, 1, y, x)`; `on_after_batch_transfer` turns them into the network input
on the training device: geometric and photometric augmentation while training, then `training.transforms` —
the same numbers extraction and the app compute with `preprocess`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from store.errors import ManifestError
from store.manifest import Manifest, PatchRecord, read_manifest

from .errors import ConfigError, DataError
from .transforms import check_transform, normalize, to_unit

__all__ = ["AugmentConfig", "DataConfig", "DatasetSummary", "PatchDataset", "PatchDataModule", "augment_batch",
           "load_patch", "LABELS"]

LABELS = {0: "normal", 1: "lesion"}
GRAY_MODES = ("L", "I;16", "I;16B", "I;16L", "I")


@dataclass(frozen=True)
class AugmentConfig:
    """Label-preserving changes applied per patch while training (a lesion is a lesion in any orientation)."""

    flip: bool = True  # horizontal and vertical flips
    rot90: bool = True  # quarter turns (half turns only for non-square patches)
    brightness: float = 0.1  # additive shift, uniform in ±brightness (intensity units of [0, 1])
    contrast: float = 0.1  # multiplicative factor around the patch mean, uniform in 1 ± contrast

    def __post_init__(self):
        if not (0 <= self.brightness <= 1 and 0 <= self.contrast < 1):
            raise ConfigError(f"data.augment: brightness {self.brightness} must be in [0, 1], contrast "
                              f"{self.contrast} in [0, 1)")


@dataclass(frozen=True)
class DataConfig:
    manifest: str = "demo"  # a dataset name in the workspace, or a path to a manifest CSV
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0  # 2-core machine: loading happens in the main process by default
    in_memory: bool | None = None  # None: in memory when the uint8 patches take at most memory_limit_mb
    memory_limit_mb: int = 1024
    transform: dict | None = None  # fixed {mean, std}; None: measured on the training patches
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        for name in ("batch_size", "eval_batch_size", "memory_limit_mb"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"data.{name}: {getattr(self, name)} must be ≥ 1")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: {self.num_workers} must be ≥ 0")
        if self.transform is not None:
            try:
                check_transform(self.transform)
            except ValueError as e:
                raise ConfigError(f"data.transform: {e}") from None


@dataclass(frozen=True)
class DatasetSummary:
    manifest: Path
    sha256: str  # of the manifest file
    digest: str  # of the manifest and every patch file's bytes: two datasets with equal digests are the same data
    input_size: tuple[int, int]  # (y, x)
    counts: dict[str, dict[str, int]]  # split → {"normal": n, "lesion": n}


def load_patch(path: Path) -> np.ndarray:
    """uint8 (y, x) of a grayscale patch; 16-bit patches keep their top 8 bits."""
    try:
        with Image.open(path) as im:
            if im.mode not in GRAY_MODES:
                raise DataError(f"{path}: image mode {im.mode} is not grayscale")
            a = np.asarray(im)
    except (OSError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None
    if a.dtype == np.uint8:
        return a
    return (a.astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8) if a.max() > 255 else a.astype(np.uint8)


class PatchDataset(Dataset):
    """(uint8 (1, y, x) tensor, label) per record; patches are read once into memory or lazily per item."""

    def __init__(self, records: list[PatchRecord], *, images: torch.Tensor | None = None):
        self.records = records
        self.labels = torch.tensor([r.label for r in records], dtype=torch.long)  # (image,)
        self.images = images  # uint8 (image, y, x) or None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        img = self.images[i] if self.images is not None else torch.from_numpy(load_patch(self.records[i].image))
        return img.unsqueeze(0), self.labels[i]  # (1, y, x), ()

    @staticmethod
    def read_all(records: list[PatchRecord]) -> torch.Tensor:
        return torch.from_numpy(np.stack([load_patch(r.image) for r in records]))  # uint8 (image, y, x)


def augment_batch(x: torch.Tensor, config: AugmentConfig, *, generator: torch.Generator | None = None,
                  masks: torch.Tensor | None = None):
    """float (batch, 1, y, x) in [0, 1] → augmented copy; one independent draw per patch.

    `masks`, float (batch, concept, my, mx) on a grid of the patch's aspect (the dense concept targets of
    `training.module`), are flipped and turned with their patch and left out of the photometric jitter; then the
    result is the pair (x, masks).
    """
    b = x.shape[0]
    dev = x.device
    both = [x] if masks is None else [x, masks]

    def coin(p=0.5):  # (batch, 1, 1, 1) booleans
        return (torch.rand(b, 1, 1, 1, generator=generator) < p).to(dev)

    def where(cond, op):  # the same draw for the patch and its masks
        return [torch.where(cond, op(t), t) for t in both]

    if config.flip:
        both = where(coin(), lambda t: t.flip(-1))
        both = where(coin(), lambda t: t.flip(-2))
    if config.rot90:
        if x.shape[-1] == x.shape[-2]:
            k = torch.randint(0, 4, (b, 1, 1, 1), generator=generator).to(dev)
            for q in (1, 2, 3):
                both = where(k == q, lambda t, q=q: torch.rot90(t, q, (-2, -1)))
        else:
            both = where(coin(), lambda t: torch.rot90(t, 2, (-2, -1)))
    x = both[0]
    if config.contrast or config.brightness:
        c = 1 + (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1).to(dev) * config.contrast
        s = (torch.rand(b, 1, 1, 1, generator=generator) * 2 - 1).to(dev) * config.brightness
        mean = x.mean(dim=(-2, -1), keepdim=True)
        x = ((x - mean) * c + mean + s).clamp_(0, 1)
    return x if masks is None else (x, both[1])


class PatchDataModule(L.LightningDataModule):
    """Train/val/test dataloaders over one manifest; `check()` validates the data before any training starts."""

    def __init__(self, config: DataConfig, *, manifest_path: str | Path, seed: int = 0):
        super().__init__()
        self.config = config
        self.manifest_path = Path(manifest_path)
        self.seed = seed
        self.manifest: Manifest | None = None
        self.summary: DatasetSummary | None = None
        self.transform: dict | None = None
        self.datasets: dict[str, PatchDataset] = {}

    # -- checks ------------------------------------------------------------------------------------------------------
    def check(self) -> DatasetSummary:
        """Read and validate the manifest and every patch header; raise DataError naming what is wrong."""
        if self.summary is not None:
            return self.summary
        try:
            manifest = read_manifest(self.manifest_path, check_files=True)
        except ManifestError as e:
            raise DataError(str(e)) from None
        where = str(manifest.path)
        counts = {s: {"normal": 0, "lesion": 0} for s in ("train", "val", "test")}
        for r in manifest.records:
            counts[r.split][LABELS[r.label]] += 1
        tally = ", ".join(f"{s} {sum(c.values())}" for s, c in counts.items())
        for split, c in counts.items():
            n = sum(c.values())
            if n == 0:
                raise DataError(f"{where}: split {split!r} is empty ({tally}); train, val and test all need patches")
            only = [name for name, k in c.items() if k == n]
            if only:
                raise DataError(f"{where}: split {split!r} has only {only[0]!r} patches ({n}); training and its "
                                f"metrics need both normal (label 0) and lesion (label 1) patches in every split")
        sizes: dict[tuple[int, int], str] = {}
        digest = hashlib.sha256(manifest.sha256.encode())
        for r in manifest.records:
            try:
                digest.update(r.image.read_bytes())
                with Image.open(r.image) as im:
                    if im.mode not in GRAY_MODES:
                        raise DataError(f"{r.image}: image mode {im.mode} is not grayscale (patch {r.id!r})")
                    size = (im.height, im.width)
            except (OSError, SyntaxError) as e:
                raise DataError(f"{r.image}: unreadable image for patch {r.id!r} ({e})") from None
            sizes.setdefault(size, r.id)
            if len(sizes) > 1:
                shown = "; ".join(f"{h}×{w} (e.g. {pid!r})" for (h, w), pid in sizes.items())
                raise DataError(f"{where}: patches have mixed sizes: {shown}; a classifier batch needs one size")
        self.manifest = manifest
        self.summary = DatasetSummary(manifest=manifest.path, sha256=manifest.sha256, digest=digest.hexdigest(),
                                      input_size=next(iter(sizes)), counts=counts)
        return self.summary

    # -- Lightning hooks ---------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        summary = self.check()
        y, x = summary.input_size
        in_memory = self.config.in_memory
        if in_memory is None:
            in_memory = len(self.manifest) * y * x <= self.config.memory_limit_mb * 2**20
        for split in ("train", "val", "test"):
            records = self.manifest.split(split)
            images = PatchDataset.read_all(records) if in_memory else None
            self.datasets[split] = PatchDataset(records, images=images)
        self.transform = check_transform(self.config.transform) if self.config.transform else self._measure()

    def _measure(self) -> dict[str, float]:
        """Mean and std of the training pixels in [0, 1] (at most 1024 patches, evenly spaced: deterministic)."""
        ds = self.datasets["train"]
        idx = np.linspace(0, len(ds) - 1, min(len(ds), 1024)).round().astype(int)
        imgs = ds.images[idx] if ds.images is not None else PatchDataset.read_all([ds.records[i] for i in idx])
        x = imgs.to(torch.float64) / 255  # (image, y, x)
        return {"mean": round(float(x.mean()), 6), "std": round(max(float(x.std()), 1e-3), 6)}

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.datasets[split], batch_size=self.config.batch_size if train else self.config.eval_batch_size,
            shuffle=train, drop_last=False, num_workers=self.config.num_workers, generator=g,
            persistent_workers=self.config.num_workers > 0, pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # uint8 (batch, 1, y, x), long (batch,) or (batch, 1 + concepts), and with dense concept targets
        # (training.module.ConceptTargetDataset) float (batch, concept, my, mx), which follow every flip and turn
        images, labels, *masks = batch
        x = to_unit(images)  # float32 (batch, 1, y, x) in [0, 1]
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            if masks:
                x, masks[0] = augment_batch(x, self.config.augment, masks=masks[0])
            else:
                x = augment_batch(x, self.config.augment)
        return (normalize(x, self.transform), labels, *masks)

    def state_dict(self) -> dict:
        return {"transform": self.transform}

    def label_counts(self) -> dict[str, Counter]:
        return {s: Counter(int(v) for v in ds.labels) for s, ds in self.datasets.items()}
