"""The datamodule: checks, in-memory and lazy loading, torch augmentation, and the one shared input transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_data import make_manifest
from training.datamodule import AugmentConfig, DataConfig, PatchDataModule, PatchDataset, augment_batch, load_patch
from training.errors import ConfigError, DataError
from training.transforms import preprocess

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return make_manifest(tmp_path_factory.mktemp("dm"), counts={"train": 20, "val": 8, "test": 6}, size=16)


def test_check_summarises_the_dataset(manifest):
    dm = PatchDataModule(DataConfig(manifest=str(manifest)), manifest_path=manifest)
    s = dm.check()
    assert s.input_size == (16, 16) and len(s.sha256) == 64
    assert s.counts == {"train": {"normal": 10, "lesion": 10}, "val": {"normal": 4, "lesion": 4},
                        "test": {"normal": 3, "lesion": 3}}


def test_val_batches_are_exactly_preprocess(manifest):
    dm = PatchDataModule(DataConfig(manifest=str(manifest), eval_batch_size=8), manifest_path=manifest)
    dm.setup()
    x, y = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)  # no trainer: eval path
    recs = dm.manifest.split("val")
    raw = np.stack([np.asarray(Image.open(r.image)) for r in recs])  # (image, y, x)
    assert torch.equal(x, preprocess(raw, dm.transform))
    assert y.tolist() == [r.label for r in recs]
    # the transform is measured on the training pixels
    train = np.stack([np.asarray(Image.open(r.image)) for r in dm.manifest.split("train")]) / 255.0
    assert dm.transform["mean"] == pytest.approx(train.mean(), abs=1e-6)
    assert dm.transform["std"] == pytest.approx(train.std(ddof=1), abs=1e-5)


def test_lazy_and_in_memory_give_the_same_batches(manifest):
    eager = PatchDataModule(DataConfig(manifest=str(manifest), in_memory=True), manifest_path=manifest, seed=3)
    lazy = PatchDataModule(DataConfig(manifest=str(manifest), in_memory=False), manifest_path=manifest, seed=3)
    for dm in (eager, lazy):
        dm.setup()
    assert eager.datasets["train"].images is not None and lazy.datasets["train"].images is None
    assert eager.transform == lazy.transform
    for a, b in zip(eager.train_dataloader(), lazy.train_dataloader()):  # same seed: same shuffle order
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert a[0].dtype == torch.uint8 and a[0].shape[1:] == (1, 16, 16)


def test_workers_load_the_same_data(manifest):
    dm0 = PatchDataModule(DataConfig(batch_size=8, num_workers=0), manifest_path=manifest, seed=1)
    dm1 = PatchDataModule(DataConfig(batch_size=8, num_workers=1), manifest_path=manifest, seed=1)
    b0 = [b for b in dm0.train_dataloader()]
    b1 = [b for b in dm1.train_dataloader()]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(b0, b1)) and len(b0) == len(b1) == 3


def test_geometric_augmentation_keeps_pixels_and_covers_all_8_symmetries():
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4).repeat(400, 1, 1, 1) / 15
    torch.manual_seed(0)
    out = augment_batch(x, AugmentConfig(brightness=0, contrast=0))
    assert out.shape == x.shape
    # every output is the same set of pixels, rearranged: flips and quarter turns only
    assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    seen = {tuple(o.flatten().tolist()) for o in out}
    assert len(seen) == 8  # the dihedral group of the square
    same = augment_batch(x, AugmentConfig(flip=False, rot90=False, brightness=0, contrast=0))
    assert torch.equal(same, x)


def test_photometric_jitter_is_bounded_and_per_patch():
    torch.manual_seed(1)
    x = torch.full((64, 1, 8, 8), 0.5)
    x[:, :, :4] = 0.3
    out = augment_batch(x, AugmentConfig(flip=False, rot90=False, brightness=0.1, contrast=0.2))
    shift = out.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3))  # brightness moves the mean
    assert shift.abs().max() <= 0.1 + 1e-6 and shift.std() > 0.02
    spread = (out[:, 0, 5, 0] - out[:, 0, 0, 0]) / 0.2  # contrast scales the difference
    assert spread.min() >= 0.8 - 1e-5 and spread.max() <= 1.2 + 1e-5 and spread.std() > 0.05
    assert out.min() >= 0 and out.max() <= 1


def test_non_square_patches_get_half_turns_only():
    torch.manual_seed(0)
    x = torch.rand(50, 1, 4, 6)
    out = augment_batch(x, AugmentConfig(flip=False, brightness=0, contrast=0))
    for a, b in zip(out, x):
        assert torch.equal(a, b) or torch.equal(a, torch.rot90(b, 2, (-2, -1)))


def test_sixteen_bit_patches_keep_the_top_byte(tmp_path):
    a = np.array([[0, 256], [65535, 1024]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "p.png")
    assert load_patch(tmp_path / "p.png").tolist() == [[0, 1], [255, 4]]
    Image.new("RGB", (4, 4)).save(tmp_path / "rgb.png")
    with pytest.raises(DataError, match="rgb.png: image mode RGB is not grayscale"):
        load_patch(tmp_path / "rgb.png")


def test_data_config_validation():
    with pytest.raises(ConfigError, match="data.batch_size"):
        DataConfig(batch_size=0)
    with pytest.raises(ConfigError, match="data.transform"):
        DataConfig(transform={"mean": 0.5})
    with pytest.raises(ConfigError, match="data.augment"):
        AugmentConfig(contrast=1.5)


def test_digest_follows_the_patch_bytes_not_only_the_manifest(tmp_path):
    a = make_manifest(tmp_path / "a", counts={"train": 4, "val": 2, "test": 2}, size=16, seed=0)
    b = make_manifest(tmp_path / "b", counts={"train": 4, "val": 2, "test": 2}, size=16, seed=1)
    sa = PatchDataModule(DataConfig(), manifest_path=a).check()
    sb = PatchDataModule(DataConfig(), manifest_path=b).check()
    assert sa.sha256 == sb.sha256  # same ids, labels and relative paths …
    assert sa.digest != sb.digest  # … different pixels
    assert PatchDataModule(DataConfig(), manifest_path=a).check().digest == sa.digest


# -- dense concept targets (model.aux_masks): masks travel with their patch -------------------------------------------
@pytest.fixture(scope="module")
def real_demo(tmp_path_factory):
    """A small real demo build (one variant per CBIS-DDSM mammogram): patches with ground-truth concept masks."""
    from store.manifest import read_manifest
    from store.settings import load_settings
    from training.demo import build_demo

    report = build_demo(load_settings(tmp_path_factory.mktemp("demo-ws")).ensure(), variants=1)
    return read_manifest(report.manifest)


def _symmetries(t: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and quarter turns of (…, y, x), in a fixed order."""
    turns = [torch.rot90(t, q, (-2, -1)) for q in range(4)]
    return turns + [u.flip(-1) for u in turns]


def test_dense_targets_are_the_masks_area_fractions_on_the_map_grid(real_demo):
    from training.module import ConceptTargetDataset

    records = [r for r in real_demo.records if "spiculated_margin" in r.masks][:4]
    records += [r for r in real_demo.records if r.label == 0][:2]
    ds = ConceptTargetDataset(PatchDataset(records), ["mass"], mask_concepts=["spiculated_margin", "mass"],
                              grid=(16, 16))
    img, target, masks = ds[0]
    assert img.shape == (1, 64, 64) and target.tolist() == [1, int("mass" in records[0].masks)]
    assert masks.shape == (2, 16, 16) and masks.dtype == torch.float32
    for i, r in enumerate(records):
        for j, c in enumerate(["spiculated_margin", "mass"]):
            if c not in r.masks:  # normal patches (and lesions of another kind): all-zero targets
                assert ds[i][2][j].sum() == 0
                continue
            m = np.asarray(Image.open(r.masks[c])) > 0  # (64, 64)
            cells = m.reshape(16, 4, 16, 4).mean(axis=(1, 3))  # the fraction of each 4×4 cell the mask covers
            assert np.allclose(ds[i][2][j].numpy(), cells) and 0 < ds[i][2][j].max() <= 1


def test_dense_targets_follow_the_flips_and_turns_of_their_real_patch(real_demo):
    from types import SimpleNamespace

    from training.module import ConceptTargetDataset

    records = [r for r in real_demo.split("train") if "spiculated_margin" in r.masks][:8]
    assert len(records) == 8
    ds = ConceptTargetDataset(PatchDataset(records, images=PatchDataset.read_all(records)), ["mass"],
                              mask_concepts=["spiculated_margin"], grid=(16, 16))
    images = torch.stack([ds[i][0] for i in range(8)]).repeat(4, 1, 1, 1)  # uint8 (32, 1, 64, 64)
    labels = torch.stack([ds[i][1] for i in range(8)]).repeat(4, 1)
    masks = torch.stack([ds[i][2] for i in range(8)]).repeat(4, 1, 1, 1)  # (32, 1, 16, 16)
    for t in masks[:8]:  # a real margin is not symmetric: a wrong turn would show
        assert len({tuple(s.flatten().tolist()) for s in _symmetries(t)}) == 8

    dm = PatchDataModule(DataConfig(augment=AugmentConfig(brightness=0, contrast=0)), manifest_path=real_demo.path)
    dm.transform = {"mean": 0.0, "std": 1.0}
    dm.trainer = SimpleNamespace(training=True)  # the hook augments only while training
    torch.manual_seed(3)
    x, y, m = dm.on_after_batch_transfer((images, labels, masks), 0)
    assert torch.equal(y, labels) and m.shape == masks.shape
    used = set()
    for i in range(32):
        original = images[i].float() / 255
        k = [s for s, t in enumerate(_symmetries(original)) if torch.equal(t, x[i])]
        assert len(k) == 1  # the augmented patch is exactly one symmetry of the original …
        assert torch.equal(m[i], _symmetries(masks[i])[k[0]])  # … and its target took the same one
        used.add(k[0])
    assert len(used) >= 6  # flips and turns were drawn, not the identity only

    # the same draws with or without masks (adding targets changes no image), and jitter leaves the masks alone
    cfg = AugmentConfig(brightness=0.1, contrast=0.2)
    xa = augment_batch(images.float() / 255, cfg, generator=torch.Generator().manual_seed(5))
    xb, mb = augment_batch(images.float() / 255, cfg, generator=torch.Generator().manual_seed(5), masks=masks)
    assert torch.equal(xa, xb) and torch.equal(mb.flatten(1).sort(1).values, masks.flatten(1).sort(1).values)

    # outside training the targets pass through untouched
    dm.trainer = SimpleNamespace(training=False)
    _, _, m = dm.on_after_batch_transfer((images, labels, masks), 0)
    assert torch.equal(m, masks)
