"""Grad-CAM, TCAV sensitivities and concept contributions: a hand-set tiny model with exact numbers, and captum's
LayerGradCam / TCAV on a zoo network (when captum imports)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from explain.attribution import (cav_contribution, cav_contributions, edited_output, grad_cam, predicted_class,
                                 units_contribution)
from explain.errors import UnknownLayerError
from explain.tcav import class_sensitivities, layer_gradients, sensitivities, tcav_score

torch.set_num_threads(1)


class Tiny(nn.Module):
    """1×1 conv to 2 units (x and 0.5 − x), ReLU (the traced layer `act`), global mean, linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0]).reshape(2, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, 0.5]))
            self.head.weight.copy_(torch.tensor([[1.0, -2.0], [-1.0, 3.0]]))

    def forward(self, x):
        return self.head(self.pool(self.act(self.conv(x))).flatten(1))


@pytest.fixture
def tiny():
    x = torch.tensor([[1.0, -1.0], [2.0, 0.0]]).reshape(1, 1, 2, 2)
    # A0 = relu(x) = [[1, 0], [2, 0]], A1 = relu(0.5 - x) = [[0, 1.5], [0, 0.5]]; pooled (0.75, 0.5)
    # logits: normal = 0.75 - 1.0 = -0.25, lesion = -0.75 + 1.5 = 0.75 → predicted lesion
    return Tiny().eval(), x


def test_grad_cam_hand_computed(tiny):
    net, x = tiny
    assert predicted_class(net, x).tolist() == [1]
    cam = grad_cam(net, x, "act")  # target defaults to the predicted class (1): alpha = (-1, 3) / 4
    np.testing.assert_allclose(cam[0], [[0.0, 1.125], [0.0, 0.375]], atol=1e-6)
    cam0 = grad_cam(net, x, "act", target=0)  # alpha = (1, -2) / 4 → relu(0.25·A0 − 0.5·A1)
    np.testing.assert_allclose(cam0[0], [[0.25, 0.0], [0.5, 0.0]], atol=1e-6)
    up = grad_cam(net, x, "act", size=(4, 4))
    assert up.shape == (1, 4, 4) and up.max() <= 1.125 + 1e-6 and up.min() >= 0


def test_gradients_and_tcav_hand_computed(tiny):
    net, x = tiny
    g = layer_gradients(net, x, "act", target=1)
    # the lesion logit's gradient at each of the 4 positions is head.weight[1] / 4
    np.testing.assert_allclose(g[0, :, 0, 0], [-0.25, 0.75], atol=1e-7)
    np.testing.assert_allclose(g[0, 0], np.full((2, 2), -0.25), atol=1e-7)
    s = sensitivities(net, x, "act", target=1)
    np.testing.assert_allclose(s, [[-1.0, 3.0]], atol=1e-6)
    assert tcav_score(s, np.array([0.0, 1.0])) == 1.0
    assert tcav_score(s, np.array([1.0, 0.0])) == 0.0
    assert tcav_score(np.array([[1.0, 0], [-1.0, 0], [2.0, 0], [0.5, 0]]), np.array([1.0, 0.0])) == 0.75
    xs = torch.cat([x, -x])  # -x: A0 = [[0,1],[0,0]], A1 = [[1.5,0],[2.5,0.5]] → class-1 logit higher as well
    cs = class_sensitivities(net, xs, [1, 0], layer="act", classes=["normal", "lesion"])
    np.testing.assert_allclose(cs.per_class["lesion"], [[-1.0, 3.0]], atol=1e-6)
    np.testing.assert_allclose(cs.per_class["normal"], [[1.0, -2.0]], atol=1e-6)
    assert cs.scores(np.array([0.0, 1.0])) == {"normal": 0.0, "lesion": 1.0}


def test_local_tcav_weights_positions_by_the_heatmap(tiny):
    from explain.tcav import local_tcav_score

    g = np.zeros((2, 2, 1, 2))  # (image, unit, y, x): the derivative along v = (1, 0) is g[:, 0]
    g[0, 0, 0] = [1.0, -3.0]  # summed: −2 (the tiled score says no) …
    g[1, 0, 0] = [-1.0, 0.5]
    heat = np.array([[[1.0, 0.0]], [[0.2, 0.9]]])  # … but where the concept is, the first image says yes
    v = np.array([1.0, 0.0])
    assert tcav_score(g.sum(axis=(2, 3)), v) == 0.0  # image 0: −2, image 1: −0.5
    assert local_tcav_score(g, v, heat) == 1.0  # image 0: 1·1 = 1, image 1: −0.2 + 0.45 = 0.25
    assert local_tcav_score(g, -v, heat) == 0.0
    net, x = tiny
    cs = class_sensitivities(net, torch.cat([x, -x]), [1, 0], layer="act", classes=["normal", "lesion"],
                             indices=[7, 9])
    assert cs.images == {"lesion": [7], "normal": [9]} and cs.gradients["lesion"].shape == (1, 2, 2, 2)
    np.testing.assert_allclose(cs.gradients["lesion"].sum(axis=(2, 3)), cs.per_class["lesion"])


def test_contributions_hand_computed(tiny):
    net, x = tiny
    # zeroing unit 1: pooled (0.75, 0) → lesion logit −0.75; drop 0.75 − (−0.75) = 1.5
    np.testing.assert_allclose(units_contribution(net, x, "act", [1]), [1.5], atol=1e-6)
    np.testing.assert_allclose(units_contribution(net, x, "act", [0], target=1), [-0.75], atol=1e-6)
    # erasing direction (0, 1) to mean 0.2: A1 → 0.2 everywhere, pooled (0.75, 0.2) → lesion −0.15; drop 0.9
    np.testing.assert_allclose(cav_contribution(net, x, "act", np.array([0.0, 5.0]), np.array([0.0, 0.2])),
                               [0.9], atol=1e-6)
    # several probes of one layer on one image in one batched pass: each as alone
    cavs, means = np.array([[0.0, 5.0], [3.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 0.2], [0.1, 0.0], [0.3, 0.3]])
    alone = [cav_contribution(net, x, "act", c, m)[0] for c, m in zip(cavs, means)]
    np.testing.assert_allclose(cav_contributions(net, x, {"act": (cavs, means)})["act"], alone, atol=1e-6)
    assert abs(alone[0] - 0.9) < 1e-6 and len(set(np.round(alone, 6))) == 3
    np.testing.assert_allclose(cav_contributions(net, x, {"act": (cavs[:1], means[:1])}, target=1)["act"],
                               cav_contribution(net, x, "act", cavs[0], means[0], target=1), atol=1e-6)
    # probes of two layers (the conv's output and the ReLU after it) in the same pass: each copy is edited at its own
    # layer only, so each equals its probe erased alone
    both = cav_contributions(net, x, {"conv": (cavs[1:], means[1:]), "act": (cavs[:2], means[:2])})
    assert list(both) == ["conv", "act"]
    np.testing.assert_allclose(both["conv"], [cav_contribution(net, x, "conv", c, m)[0]
                                              for c, m in zip(cavs[1:], means[1:])], atol=1e-6)
    np.testing.assert_allclose(both["act"], alone[:2], atol=1e-6)
    assert not np.allclose(both["conv"], alone[1:])  # erasing before the ReLU is not erasing after it
    assert cav_contributions(net, x, {}) == {}
    with pytest.raises(ValueError, match="one image and one mean per CAV"):
        cav_contributions(net, torch.cat([x, x]), {"act": (cavs, means)})
    with pytest.raises(ValueError, match="one image and one mean per CAV"):
        cav_contributions(net, x, {"act": (cavs, means[:2])})
    # no hook survives: the model gives the original logits afterwards
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), [[-0.25, 0.75]], atol=1e-6)
    assert not net.act._forward_hooks


def test_edited_output_removes_hook_on_error(tiny):
    net, x = tiny
    with pytest.raises(RuntimeError):
        with edited_output(net, "act", lambda a: a * 0):
            raise RuntimeError("boom")
    assert not net.act._forward_hooks
    with pytest.raises(UnknownLayerError, match="nope"):
        grad_cam(net, x, "nope")


def _zoo_net():
    from training.zoo import VGGConfig, vgg_bn

    torch.manual_seed(0)
    net = vgg_bn(VGGConfig(widths=(4, 8), convs=1)).eval()
    x = torch.randn(6, 1, 16, 16)
    return net, x, net.block_outputs()[-1]


def test_grad_cam_matches_captum():
    captum_attr = pytest.importorskip("captum.attr")
    net, x, layer = _zoo_net()
    pred = predicted_class(net, x)
    ours = grad_cam(net, x, layer)
    lgc = captum_attr.LayerGradCam(net, dict(net.named_modules())[layer])
    theirs = lgc.attribute(x, target=torch.as_tensor(pred), relu_attributions=True).detach().numpy()[:, 0]
    assert ours.shape == theirs.shape == (6, 8, 8)
    assert np.abs(theirs).max() > 0
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_tcav_matches_captum(tmp_path):
    concept_mod = pytest.importorskip("captum.concept")
    from captum.concept._utils.classifier import Classifier

    net, x, _ = _zoo_net()
    # the first block: at the last one a GAP network's summed gradient is the head's row for every image
    layer = net.block_outputs()[0]
    s1 = sensitivities(net, x, layer, target=1)
    m = s1.mean(axis=0)
    # orthogonal to the mean sensitivity: the images' dot products average 0, so some are positive and some not
    cav = (s1[0] - (s1[0] @ m) / (m @ m) * m).astype(np.float32)  # (unit,)
    positions = 16 * 16

    class Fixed(Classifier):
        """A 'classifier' whose weights are our CAV tiled over positions (captum flattens (unit, y, x))."""

        def __init__(self):
            pass

        def train_and_eval(self, dataloader, **kwargs):
            return {"accs": torch.tensor(1.0)}

        def weights(self):
            w = torch.from_numpy(np.repeat(cav, positions))
            return torch.stack([w, -w])

        def classes(self):
            return [0, 1]

    concepts = [concept_mod.Concept(0, "ours", [torch.randn(3, 1, 16, 16)]),
                concept_mod.Concept(1, "other", [torch.randn(3, 1, 16, 16)])]
    tcav = concept_mod.TCAV(net, [layer], classifier=Fixed(), save_path=str(tmp_path / "cav"))
    scores = []
    for target in (0, 1):
        res = tcav.interpret(x, [concepts], target=target)
        theirs = float(res["0-1"][layer]["sign_count"][0])
        ours = tcav_score(sensitivities(net, x, layer, target=target), cav)
        assert ours == pytest.approx(theirs, abs=1e-9)
        scores.append(ours)
    assert 0.0 < scores[1] < 1.0  # not a degenerate all-or-nothing case
