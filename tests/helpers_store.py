"""Test helpers for the activation store: tiny patch datasets cut from the real CBIS-DDSM mammograms, tiny models.

    >>> manifest = make_patch_manifest(tmp_path / "data", real_dicoms, n=24, size=32)
    >>> net, meta = tiny_model()                # deterministic weights, two traced layers
    (subprocess scripts put tests/ on sys.path and `import helpers_store`)

Nothing here reads ./workspace; everything is written under the directory given.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

TINY_LAYERS = ["features.1", "features.4"]


def make_patch_manifest(root: Path, dicoms: list[Path], *, n: int = 24, size: int = 32, scale: float = 0.06,
                        zero_block: tuple[int, int] | None = None) -> Path:
    """Cut `n` size×size uint8 patches on a grid from the real mammograms' displays; write PNGs and a manifest.

    zero_block=(start, stop): those patches are all black (so a model with zero bias gives all-zero maps there).
    Labels: 1 when the patch is brighter than the median patch (a real, data-dependent rule).
    """
    from PIL import Image

    from store.images import read_image
    from store.manifest import PatchRecord, write_manifest

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    patches, sources = [], []
    for path in dicoms:
        img = read_image(path)
        disp = (img.display(scale=scale) * 255).round().astype(np.uint8)  # (y, x)
        for y in range(0, disp.shape[0] - size + 1, size):
            for x in range(0, disp.shape[1] - size + 1, size):
                patch = disp[y:y + size, x:x + size]
                if patch.mean() > 20:  # tissue, not empty background
                    patches.append((patch, img.id, (x, y, x + size, y + size)))
        if len(patches) >= n:
            break
    if len(patches) < n:
        raise RuntimeError(f"only {len(patches)} tissue patches in {len(dicoms)} mammograms")
    patches = patches[:n]
    if zero_block:
        for i in range(*zero_block):
            patches[i] = (np.zeros((size, size), np.uint8), patches[i][1], patches[i][2])
    median = float(np.median([p.mean() for p, _, _ in patches]))
    records = []
    for i, (patch, source, box) in enumerate(patches):
        pid = f"p{i:04d}"
        file = root / "images" / f"{pid}.png"
        Image.fromarray(patch).save(file)
        records.append(PatchRecord(id=pid, source_id=source, view="", laterality="", box=box,
                                   label=int(patch.mean() > median), concepts=(), split="train", image=file))
    manifest = root / "manifest.csv"
    write_manifest(manifest, records)
    return manifest


class TinyNet(nn.Module):
    """conv(1→4) relu pool conv(4→6) relu → avgpool → linear(6→2); layer names features.1 and features.4."""

    def __init__(self, *, bias: bool = True):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, y, x) → (batch, 2)
        return self.head(self.features(x))


def tiny_model(*, size: int = 32, seed: int = 0, bias: bool = True) -> tuple[nn.Module, dict]:
    """A deterministic TinyNet and the meta dict that training.load_model would give it."""
    torch.manual_seed(seed)
    net = TinyNet(bias=bias).eval()
    meta = {"input_size": [size, size], "transform": {"mean": 0.5, "std": 0.25}, "layers": list(TINY_LAYERS),
            "classes": ["normal", "lesion"], "model_uri": f"models:/tiny/{seed + 1}", "run_id": f"run-tiny-{seed}",
            "name": "tiny", "version": str(seed + 1)}
    return net, meta


def store_arrays(url: str, storage_options: dict | None = None) -> dict[str, np.ndarray]:
    """Every array of a store, read with plain zarr (path → numpy)."""
    import zarr

    if "://" in url:
        from zarr.storage import FsspecStore

        root = zarr.open_group(FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=True),
                               mode="r")
    else:
        root = zarr.open_group(url, mode="r")
    out = {}

    def walk(group, prefix):
        for name, member in group.members():
            if isinstance(member, zarr.Array):
                out[prefix + name] = member[...]
            else:
                walk(member, prefix + name + "/")

    walk(root, "")
    return out


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


class MotoS3:
    """An S3 server on loopback (moto), with a fresh bucket; `.options` are the fsspec storage options to reach it.

        >>> with MotoS3() as s3:
        ...     url = s3.url("x.zarr")                # s3://conceptlens-test-<random>/x.zarr

    moto keeps its buckets in process-wide state, so each server gets its own bucket name.
    """

    def __enter__(self) -> "MotoS3":
        import uuid

        self.bucket = f"conceptlens-test-{uuid.uuid4().hex[:12]}"
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.options = {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.options)
        fs.mkdir(self.bucket)
        return self

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    def __exit__(self, *exc) -> None:
        self.server.stop()
