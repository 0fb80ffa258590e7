"""explain.hooks.Trace: exact outputs of hand-set layers, hooks always removed, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from explain.errors import UnknownLayerError
from explain.hooks import Trace

torch.set_num_threads(1)


def hand_net() -> nn.Sequential:
    """conv 1→2 (identity kernel, and −identity), in-place ReLU, 2×2 max pool: every output is known by hand."""
    conv = nn.Conv2d(1, 2, 3, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0
        conv.weight[1, 0, 1, 1] = -1.0
        conv.bias[:] = torch.tensor([0.5, 0.0])
    return nn.Sequential(conv, nn.ReLU(inplace=True), nn.MaxPool2d(2)).eval()


def image() -> torch.Tensor:
    return torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.0, 5.0, -6.0, 7.0],
                         [-1.0, 2.0, -3.0, 4.0], [8.0, -9.0, 0.5, 0.0]]).view(1, 1, 4, 4)  # (batch, 1, y, x)


def hooks_left(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def test_exact_outputs_of_named_layers_and_clone_protects_from_inplace_relu():
    net, x = hand_net(), image()
    with Trace(net, ["0", "1", "2"]) as t:
        net(x)
    conv = t.outputs["0"]  # (batch, unit, y, x)
    assert conv.shape == (1, 2, 4, 4)
    # the in-place ReLU ran after the hook: the kept conv output still has its negative values
    torch.testing.assert_close(conv[0, 0], x[0, 0] + 0.5, rtol=0, atol=0)
    torch.testing.assert_close(conv[0, 1], -x[0, 0], rtol=0, atol=0)
    torch.testing.assert_close(t.outputs["1"][0, 1], (-x[0, 0]).clamp(min=0), rtol=0, atol=0)
    pooled = t.outputs["2"][0, 0]  # (y, x): max over 2×2 of relu(x + 0.5)
    assert pooled.tolist() == [[5.5, 7.5], [8.5, 4.5]]
    assert not conv.requires_grad
    assert hooks_left(net) == 0


def test_single_layer_output_and_replacement_by_the_next_forward():
    net = hand_net()
    with Trace(net, "2") as t:
        net(image())
        first = t.output.clone()
        net(image() * 0)
        assert torch.all(t.output[:, 0] == 0.5) and torch.all(t.output[:, 1] == 0)  # relu(0 + 0.5), relu(-0)
    assert first[0, 0, 0, 0].item() == 5.5
    with pytest.raises(ValueError, match="exactly one layer"):
        Trace(net, ["0", "2"]).output


def test_hooks_removed_even_when_the_forward_pass_raises():
    net = hand_net()
    with pytest.raises(RuntimeError):
        with Trace(net, ["0", "2"]):
            assert hooks_left(net) == 2
            net(torch.zeros(1, 3, 4, 4))  # wrong channel count
    assert hooks_left(net) == 0


def test_unknown_layer_is_a_key_error_naming_it_and_the_known_ones():
    net = hand_net()
    with pytest.raises(KeyError) as e:
        Trace(net, ["0", "features.9"])
    assert isinstance(e.value, UnknownLayerError)
    assert "features.9" in str(e.value) and "0, 1, 2" in str(e.value)
    assert hooks_left(net) == 0


def test_retain_grad_keeps_the_graph_for_attribution():
    net = hand_net()
    x = image().requires_grad_(True)
    with Trace(net, "0", retain_grad=True) as t:
        net(x)[:, 0].sum().backward()
    grad = t.output.grad  # (batch, unit, y, x)
    assert grad is not None and grad.shape == (1, 2, 4, 4)
    # one winner per 2×2 window of unit 0 gets gradient 1: the positions of 5, 7, 8 and 4
    assert grad[0, 0].sum().item() == 4.0
    assert grad[0, 0, 1, 1].item() == 1.0 and grad[0, 0, 3, 0].item() == 1.0


def test_tuple_outputs_and_nested_use():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 2, x * 3

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            a, b = self.pair(x)
            return a + b

    net = Net()
    t = Trace(net, "pair")
    with t:
        net(torch.ones(1, 1, 2, 2))
        with pytest.raises(RuntimeError, match="already active"):
            t.__enter__()
    assert torch.all(t.output == 2)
    assert hooks_left(net) == 0


def test_per_thread_outputs_keep_concurrent_forward_passes_apart():
    """Two threads run one model at once inside one per-thread trace: each reads exactly its own inputs' outputs,
    the main thread sees none of them, and the hooks are gone afterwards."""
    import threading

    net = hand_net()
    inputs = [image() * (k + 1) for k in range(2)]
    seen: dict[int, list] = {0: [], 1: []}
    start = threading.Barrier(2)

    def run(k: int) -> None:
        start.wait()
        for _ in range(200):  # many interleaved passes: a shared dict would hand one thread the other's outputs
            net(inputs[k])
            seen[k].append(t.outputs["0"].clone())

    with torch.inference_mode(), Trace(net, ["0"], per_thread=True) as t:
        threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert t.outputs == {}  # this thread ran no forward pass
    for k in range(2):
        expected = net[0](inputs[k])
        assert len(seen[k]) == 200 and all(torch.equal(o, expected) for o in seen[k])
    assert hooks_left(net) == 0
