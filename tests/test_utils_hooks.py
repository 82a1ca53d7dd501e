"""skdebias._utils._hooks: recording a layer's output or input, stopping after a layer, the
inputs of a layer over a data set, the call order around a layer, the network input check."""

import numpy as np
import pytest
import torch
from torch import nn

from _nets import ViewNet
from skdebias._utils._hooks import (
    ChannelsLast,
    capture_output,
    check_network_input,
    layer_inputs,
    stop_after,
    trace_layer,
)
from skdebias._utils._modules import get_module
from skdebias.models import SmallCNN


def test_capture_output_removes_hook_even_on_error(cnn):
    layer = cnn.features[6]
    with pytest.raises(RuntimeError):
        with capture_output(layer):
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0
    with capture_output(layer, stop=True) as store, stop_after():
        cnn(torch.zeros(2, 3, 28, 28))
    assert store[0].shape == (2, 64, 7, 7)
    assert len(layer._forward_hooks) == 0


def test_stop_early_skips_later_layers(cnn):
    calls = []
    handle = cnn.classifier.register_forward_hook(lambda *a: calls.append(1))
    with capture_output(cnn.features[2], stop=True), stop_after():
        cnn(torch.zeros(1, 3, 28, 28))
    handle.remove()
    assert calls == []


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_capture_output_records_the_output_or_the_input():
    net, x = _mlp(), torch.randn(5, 3)
    with capture_output(net[0]) as out, capture_output(net[2], capture_input=True) as inp:
        net(x)
        net(x[:2])
    assert [t.shape[0] for t in out] == [5, 2]  # one entry per forward pass
    torch.testing.assert_close(out[0], net[0](x))
    torch.testing.assert_close(inp[0], net[1](net[0](x)))
    assert not out[0].requires_grad  # detached by default
    assert not net[0]._forward_hooks and not net[2]._forward_hooks


def test_capture_output_undetached_survives_an_inplace_op_after_the_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True))
    x = torch.randn(6, 3)
    with capture_output(net[0], detach=False) as store:
        out = net(x)
    a = store[0]
    torch.testing.assert_close(a, net[0](x))  # the negative values are still there
    assert bool((a < 0).any()) and a.requires_grad
    (g,) = torch.autograd.grad(out.sum(), a)
    torch.testing.assert_close(g, (a > 0).float())  # the gradient at the layer's output


def test_capture_output_requires_grad_on_a_frozen_layer():
    net = _mlp()
    for p in net[0].parameters():
        p.requires_grad_(False)
    with capture_output(net[0], detach=False, requires_grad=True) as store:
        out = net(torch.randn(2, 3))
    assert store[0].is_leaf and store[0].requires_grad
    (g,) = torch.autograd.grad(out.sum(), store[0])
    assert g.shape == (2, 4) and bool(g.abs().sum() > 0)


def test_capture_output_with_stop_removes_its_hook_and_stops():
    net = _mlp()
    later = []
    net[2].register_forward_hook(lambda *a: later.append(1))
    with capture_output(net[0], stop=True) as store, stop_after():
        net(torch.randn(2, 3))
    assert len(store) == 1 and later == [] and not net[0]._forward_hooks
    net(torch.randn(2, 3))  # hook gone: nothing recorded, the pass runs to the end
    assert len(store) == 1 and later == [1]


def test_trace_layer_records_the_call_order_and_shapes():
    net = _mlp()
    before, shape, n_out = trace_layer(net, "1", torch.randn(2, 3))
    assert before == ["", "0", "1"] and shape == (4,) and n_out == 2
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(3, 2)
            self.extra = nn.Tanh()  # registered, never called

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="Layer 'extra' is not called in the forward pass"):
        trace_layer(Unused(), "extra", torch.randn(2, 3))


def test_check_network_input_names_the_expected_input():
    check_network_input(nn.Sequential(nn.Linear(4, 2)), torch.zeros(2, 4))  # fits: no error
    with pytest.raises(ValueError, match=r"X has per-sample shape \(5,\), but the network cannot "
                                         r"take it: its first layer '0' .* expects 4 features "
                                         r"per sample \(n_samples, 4\)"):
        check_network_input(nn.Sequential(nn.Linear(4, 2)), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"imgs has per-sample shape \(1, 8, 8\).* expects shape "
                                         r"\(n_samples, 3, H, W\)"):
        check_network_input(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.zeros(2, 1, 8, 8),
                            name="imgs")
    later = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    with pytest.raises(ValueError, match=r"layer '2' .* fails on its input of per-sample shape "
                                         r"\(128,\); the network was probably built for another"):
        check_network_input(later, torch.zeros(2, 1, 10, 10))
    assert all(not m._forward_pre_hooks for m in later.modules())
    lazy = nn.Sequential(nn.LazyLinear(2))
    check_network_input(lazy, torch.zeros(2, 7))  # not run: it would initialise the layer
    assert lazy[0].has_uninitialized_params()


def test_layer_inputs_flattens_and_checks_the_output():
    net = _mlp()
    X = np.random.RandomState(0).rand(7, 3).astype(np.float32)
    feats = layer_inputs(net, "2", X, batch_size=3, device=torch.device("cpu"))
    expected = net[1](net[0](torch.as_tensor(X))).detach()
    assert feats.dtype == torch.float32 and feats.shape == (7, 4)
    torch.testing.assert_close(feats, expected)
    sub = layer_inputs(net, "2", X, batch_size=3, device="cpu", indices=[6, 0])
    torch.testing.assert_close(sub, expected[[6, 0]])
    layer_inputs(net, "2", X, batch_size=3, device="cpu", check_output="use the head")
    with pytest.raises(ValueError, match="The output of layer '0' is not the network's output; "
                                         "use the head"):
        layer_inputs(net, "0", X, batch_size=3, device="cpu", check_output="use the head")


# ------------------------------------------------------------------ layer_inputs memory layout
@pytest.mark.parametrize("make", [SmallCNN, ViewNet])
def test_layer_inputs_same_features_in_either_layout(make):
    torch.manual_seed(0)
    net = make().eval()
    X = np.random.RandomState(0).rand(10, 3, 8, 8).astype(np.float32)
    head = "classifier.2" if isinstance(net, SmallCNN) else "head"
    feats = layer_inputs(net, head, X, batch_size=4, device=torch.device("cpu"))
    # reference: the hooked input of the head, computed by hand in the batch's own layout
    seen = []
    hook = get_module(net).get_submodule(head).register_forward_hook(
        lambda m, inp, out: seen.append(inp[0].reshape(len(inp[0]), -1)))
    with torch.no_grad():
        net(torch.as_tensor(X))
    hook.remove()
    np.testing.assert_allclose(feats.numpy(), seen[0].numpy(), rtol=1e-5, atol=1e-6)
    # the module itself is left in its own layout
    assert all(p.is_contiguous() for p in net.parameters())


def test_channels_last_falls_back_once_then_raises_later_errors():
    layout = ChannelsLast()
    calls = []

    def forward(xb):
        calls.append(xb.is_contiguous())
        if not xb.is_contiguous():  # a network that cannot take channels_last
            raise RuntimeError("view size is not compatible")
        return xb.sum()

    x = torch.ones(2, 3, 4, 4)
    assert layout(forward, x) == 96 and calls == [False, True] and layout.works is False
    assert layout(forward, x) == 96 and calls == [False, True, True]  # no second try
    # 2-D inputs pass through untouched
    ok = ChannelsLast()
    assert ok(lambda xb: xb.is_contiguous(), torch.ones(2, 3)) is True and ok.works is None

    works = ChannelsLast()
    assert works(lambda xb: xb.is_contiguous(memory_format=torch.channels_last), x)
    assert works.works is True

    def broken(xb):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):  # once the layout worked: raised
        works(broken, x)
