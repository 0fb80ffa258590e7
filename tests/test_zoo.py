"""The model zoo: layer names, shapes, default extraction layers, user factories, pickle-free specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from training.errors import ConfigError, UntrustedModelError
from training.transforms import preprocess, to_unit
from training.zoo import ModelSpec, ResNetConfig, VGGConfig, build_model, default_layers, resnet, vgg_bn

torch.set_num_threads(1)


def _shapes(net, names, size):
    out = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, tuple(o.shape)))
             for n in names]
    with torch.no_grad():
        net.eval()(torch.zeros(2, 1, *size))
    for h in hooks:
        h.remove()
    return out


def test_vgg_names_like_torchvision_and_keeps_8x8_maps():
    net = vgg_bn(VGGConfig(widths=(8, 16, 32, 64), convs=(1, 1, 2, 2)))
    assert isinstance(net.features, nn.Sequential)
    layers = default_layers(net, (64, 64))
    # conv,bn,relu = 0-2, pool 3, 4-6, pool 7, 8-13, pool 14, 15-20: block ends at 2, 6, 13, 20
    assert layers == ["features.6", "features.13", "features.20"]
    assert all(isinstance(net.get_submodule(n), nn.ReLU) for n in layers)
    shapes = _shapes(net, layers, (64, 64))
    assert shapes == {"features.6": (2, 16, 32, 32), "features.13": (2, 32, 16, 16), "features.20": (2, 64, 8, 8)}
    assert net(torch.zeros(3, 1, 64, 64)).shape == (3, 2)


def test_resnet_layer_names_and_strides():
    net = resnet(ResNetConfig(widths=(8, 16, 32), blocks=(1, 2, 2)))
    names = {n for n, _ in net.named_modules()}
    assert {"layer1.0.conv1", "layer2.1.conv2", "layer3.0.downsample.0"} <= names
    layers = default_layers(net, (64, 64), count=2)
    assert layers == ["layer2.1", "layer3.1"]
    assert _shapes(net, layers, (64, 64)) == {"layer2.1": (2, 16, 32, 32), "layer3.1": (2, 32, 16, 16)}
    assert net(torch.zeros(1, 1, 64, 64)).shape == (1, 2)


def test_default_layers_respects_min_size():
    net = vgg_bn(widths=(8, 8, 8, 8, 8), convs=1)  # 64, 32, 16, 8, 4 px
    assert default_layers(net, (64, 64)) == ["features.6", "features.10", "features.14"]  # the 4-px block is dropped


def bad_factory():
    return "not a module"


def tiny_factory(width: int = 4):
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 2))


def test_user_factory_by_import_path_and_traced_layers():
    spec = ModelSpec(zoo=None, factory="test_zoo:tiny_factory", kwargs={"width": 6})
    net = build_model(spec)
    assert net[0].out_channels == 6
    assert default_layers(net, (32, 32)) == ["1", "4"]  # last ReLU of each resolution
    with pytest.raises(UntrustedModelError, match="test_zoo:tiny_factory"):
        build_model(spec, trusted_factories=("other.module",))
    assert build_model(spec, trusted_factories=("test_zoo",)) is not None
    with pytest.raises(ConfigError, match="returned str"):
        build_model(ModelSpec(zoo=None, factory="test_zoo:bad_factory"))
    with pytest.raises(ConfigError, match="cannot import"):
        build_model(ModelSpec(zoo=None, factory="no_such_pkg.mod:fn"))


@pytest.mark.parametrize("kwargs, match", [
    ({"zoo": "alexnet"}, "unknown network 'alexnet'"),
    ({"zoo": "vgg_bn", "config": {"width": [8]}}, r"unknown key\(s\) \['width'\]"),
    ({"zoo": None, "factory": "no_colon"}, "not 'package.module:function'"),
    ({"zoo": None}, "exactly one"),
])
def test_bad_specs_name_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelSpec(**kwargs)


def test_spec_round_trips_through_json():
    import json

    spec = ModelSpec(zoo="resnet", config={"widths": [8, 16], "blocks": 1})
    d = json.loads(json.dumps(spec.to_dict()))
    assert d == {"zoo": "resnet", "config": {"widths": [8, 16], "blocks": [1, 1], "in_channels": 1,
                                             "num_classes": 2, "stem_pool": False, "head": "avg"}}
    a, b = build_model(ModelSpec.from_dict(d)), build_model(spec)
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]


def test_preprocess_numbers_and_shapes():
    imgs = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)
    x = preprocess(imgs, {"mean": 0.2, "std": 0.5})
    assert x.dtype == torch.float32 and x.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(x[0, 0].numpy(), [[-0.4, 1.6], [0.0, 0.4]], atol=1e-6)
    assert torch.equal(preprocess(torch.from_numpy(imgs)[:, None], {"mean": 0.2, "std": 0.5}), x)
    assert torch.equal(to_unit(imgs), torch.from_numpy(imgs)[:, None].float() / 255)
    with pytest.raises(TypeError, match="uint8"):
        preprocess(imgs.astype(np.float32), {"mean": 0, "std": 1})
    with pytest.raises(ValueError, match="std > 0"):
        preprocess(imgs, {"mean": 0, "std": 0})
    with pytest.raises(ValueError, match="shape"):
        preprocess(np.zeros((2, 3, 4, 4), np.uint8), {"mean": 0, "std": 1})
