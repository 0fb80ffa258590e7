"""Training on the real demo data: a small build from the CBIS-DDSM mammograms, a few batches, a loadable model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_trains_on_a_small_real_build(workspace):
    from store.manifest import read_manifest
    from training.demo import build_demo
    from training.fit import fit, load_config
    from training.registry import load_model
    from training.transforms import preprocess

    torch.set_num_threads(1)
    report = build_demo(workspace, variants=1)
    assert report.patches > 100
    # the repository's demo config, only shortened: same data section, network and layers
    cfg = load_config(ROOT / "training" / "configs" / "demo.yaml", overrides=[
        "trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.enable_progress_bar=false",
        "trainer.accelerator=cpu"])
    r = fit(cfg, settings=workspace)
    assert r.model_uri == "models:/conceptlens-demo/1" and r.champion
    m = load_model("models:/conceptlens-demo@champion", settings=workspace)
    assert m.meta["input_size"] == [64, 64]
    assert m.meta["layers"] == ["features.9", "features.16", "features.23"]
    shapes = {}
    hooks = [m.module.get_submodule(n).register_forward_hook(
        lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape))) for n in m.layers]
    recs = read_manifest(report.manifest).split("test")[:4]
    from PIL import Image

    x = preprocess(np.stack([np.asarray(Image.open(r.image)) for r in recs]), m.transform)
    with torch.no_grad():
        probs = m.module(x).softmax(1)  # (image, class)
    for h in hooks:
        h.remove()
    assert probs.shape == (4, 2) and torch.allclose(probs.sum(1), torch.ones(4))
    assert shapes["features.23"][-2:] == (16, 16)  # pool_before_last: false: the deepest maps stay 16×16
    # unchanged data and config: reused
    assert fit(cfg, settings=workspace).reused


@pytest.mark.parametrize("head", ["avg", "max", "avgmax"])
def test_every_pooling_head_maps_patches_to_two_logits(head):
    from training.zoo import ModelSpec, build_model

    net = build_model(ModelSpec(zoo="vgg_bn", config={"widths": [4, 8], "convs": [1, 1], "head": head}))
    x = torch.rand(3, 1, 16, 16)
    assert net(x).shape == (3, 2)
    if head == "avgmax":  # the head sees each unit twice: its mean and its max over the map
        feats = net.features(x)
        pooled = net.pool(feats).flatten(1)
        torch.testing.assert_close(pooled, torch.cat([feats.mean(dim=(2, 3)), feats.amax(dim=(2, 3))], dim=1))


def test_unknown_head_is_refused():
    from training.errors import ConfigError
    from training.zoo import ModelSpec, build_model

    with pytest.raises(ConfigError, match="head 'sum'"):
        build_model(ModelSpec(zoo="vgg_bn", config={"head": "sum"}))


def test_pool_before_last_false_keeps_the_deepest_block_at_the_finer_resolution():
    from torch import nn

    from training.zoo import ModelSpec, build_model, default_layers

    cfg = {"widths": [4, 8, 8, 16], "convs": [1, 2, 2, 2], "head": "avgmax"}
    coarse = build_model(ModelSpec(zoo="vgg_bn", config=cfg))
    fine = build_model(ModelSpec(zoo="vgg_bn", config={**cfg, "pool_before_last": False}))
    # the same layer names (the pool becomes an identity), the same parameters, a 16×16 instead of an 8×8 map
    assert default_layers(fine, (64, 64)) == default_layers(coarse, (64, 64)) == [
        "features.9", "features.16", "features.23"]
    assert isinstance(fine.features[17], nn.Identity) and isinstance(coarse.features[17], nn.MaxPool2d)
    assert [k for k in fine.state_dict()] == [k for k in coarse.state_dict()]
    x = torch.rand(2, 1, 64, 64)
    assert fine.features(x).shape == (2, 16, 16, 16) and coarse.features(x).shape == (2, 16, 8, 8)
    assert fine(x).shape == (2, 2)
