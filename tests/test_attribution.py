"""skdebias.attribution: attribution maps (zennit LRP, gradient, gradient x input)."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from _nets import inplace_net
from skdebias.attribution import ATTRIBUTION_METHODS, attribute, resolve_composite
from skdebias.metrics import artifact_relevance


def test_attribution_multiplies_the_original_input(gray_images):
    X = gray_images
    # first layer in-place ReLU: the gradient is zero where the input is negative, and
    # gradient x input must use the unclamped input (so it is zero there too, but positive
    # inputs keep their value); compare with a network without the in-place op
    net_inplace = inplace_net(inplace_first=True)
    net_plain = inplace_net(inplace_first=False)
    R_inplace = attribute(net_inplace, X, target=0, method="gradient_x_input", device="cpu")
    R_plain = attribute(net_plain, X, target=0, method="gradient_x_input", device="cpu")
    np.testing.assert_allclose(R_inplace, R_plain, rtol=1e-5, atol=1e-7)
    R_pred = attribute(net_inplace, X, target=None, method="gradient_x_input", device="cpu")
    R_pred_plain = attribute(net_plain, X, target=None, method="gradient_x_input", device="cpu")
    np.testing.assert_allclose(R_pred, R_pred_plain, rtol=1e-5, atol=1e-7)


def test_attribute_and_artifact_relevance_refuse_empty_input():
    empty = np.zeros((0, 1, 8, 8), dtype="float32")
    with pytest.raises(ValueError, match="X: Found array with 0 sample"):
        attribute(inplace_net(), empty, device="cpu")
    with pytest.raises(ValueError, match="X: Found array with 0 sample"):
        artifact_relevance(inplace_net(), empty, np.zeros((8, 8)), method="gradient", device="cpu")


def _linear_net():
    """Flatten -> Linear(8, 3) with known weights, for (n, 2, 2, 2) input."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        net[1].weight.copy_(torch.arange(24, dtype=torch.float32).reshape(3, 8) - 10.0)
        net[1].bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    return net


def _conv_net(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=bias), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=bias))


@pytest.mark.parametrize("method", ATTRIBUTION_METHODS)
def test_attribution_shapes(method):
    X = np.random.RandomState(0).rand(5, 3, 8, 8).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "lrp" must not fall back
        maps = attribute(_conv_net(), X, method=method, batch_size=2, device="cpu")
        full = attribute(_conv_net(), X, method=method, batch_size=2, device="cpu",
                         reduce_channels=False)
    assert maps.shape == (5, 8, 8) and maps.dtype == np.float32
    assert full.shape == (5, 3, 8, 8) and full.dtype == np.float32
    np.testing.assert_allclose(full.sum(axis=1), maps, rtol=1e-5, atol=1e-6)
    assert np.isfinite(maps).all() and np.abs(maps).sum() > 0


def test_gradient_and_gradient_x_input_by_hand():
    net = _linear_net()
    X = np.random.RandomState(0).randn(3, 2, 2, 2).astype(np.float32)
    target = np.array([0, 2, 1])
    W = net[1].weight.detach().numpy()
    grad = W[target].reshape(3, 2, 2, 2)  # d logit_t / d x of a linear layer
    got = attribute(net, X, target=target, method="gradient", reduce_channels=False, device="cpu")
    np.testing.assert_allclose(got, grad, rtol=1e-6)
    got = attribute(net, X, target=target, method="gradient_x_input", reduce_channels=False,
                    device="cpu")
    np.testing.assert_allclose(got, grad * X, rtol=1e-5, atol=1e-6)
    got = attribute(net, X, target=target, method="gradient_x_input", device="cpu")
    np.testing.assert_allclose(got, (grad * X).sum(axis=1), rtol=1e-5, atol=1e-6)
    # an int target explains that class for every sample; None the predicted class
    got = attribute(net, X, target=1, method="gradient", reduce_channels=False, device="cpu")
    np.testing.assert_allclose(got, np.broadcast_to(W[1].reshape(2, 2, 2), got.shape))
    pred = net(torch.as_tensor(X)).argmax(1).numpy()
    got = attribute(net, X, target=None, method="gradient", reduce_channels=False, device="cpu")
    np.testing.assert_allclose(got, W[pred].reshape(3, 2, 2, 2))


def test_lrp_conserves_the_explained_output():
    # without biases, the relevance of the explained logit (1, the one-hot) is conserved
    X = np.random.RandomState(0).rand(4, 3, 8, 8).astype(np.float32)
    maps = attribute(_conv_net(bias=False), X, target=0, method="lrp", device="cpu")
    np.testing.assert_allclose(maps.reshape(4, -1).sum(axis=1), np.ones(4), rtol=2e-3)


def test_attribute_leaves_the_network_alone():
    net = _conv_net()
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    attribute(net, np.random.RandomState(0).rand(2, 3, 8, 8).astype(np.float32), device="cpu")
    assert net.training and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())


def test_resolve_composite():
    from zennit.composites import EpsilonPlusFlat

    assert isinstance(resolve_composite("EpsilonPlusFlat"), EpsilonPlusFlat)
    assert isinstance(resolve_composite("epsilon_plus_flat"), EpsilonPlusFlat)
    assert isinstance(resolve_composite(EpsilonPlusFlat), EpsilonPlusFlat)
    comp = EpsilonPlusFlat()
    assert resolve_composite(comp) is comp
    with pytest.raises(ValueError, match="Unknown zennit composite 'Nope'; choose one of"):
        resolve_composite("Nope")
    with pytest.raises(ValueError, match="composite must be a name, a zennit Composite class"):
        resolve_composite(3)


def test_resolve_composite_with_bounds():
    from zennit.composites import EpsilonGammaBox

    with pytest.raises(ValueError, match=r"EpsilonGammaBox needs the lowest and highest input "
                                         r"values .* pass bounds=\(low, high\)"):
        resolve_composite("EpsilonGammaBox")
    comp = resolve_composite("epsilon_gamma_box", bounds=(0.0, 1.0))
    assert isinstance(comp, EpsilonGammaBox)


def test_attribute_box_composite_takes_the_data_bounds():
    """A box composite by name gets each input channel's range over X, as an instance would."""
    from zennit.composites import EpsilonGammaBox

    net = _conv_net()
    X = np.random.RandomState(0).rand(5, 3, 8, 8).astype(np.float32)
    X[:, 1] = X[:, 1] * 4 - 2  # another range in one channel
    low = torch.as_tensor(X.min(axis=(0, 2, 3))).reshape(1, 3, 1, 1)
    high = torch.as_tensor(X.max(axis=(0, 2, 3))).reshape(1, 3, 1, 1)
    R = attribute(net, X, target=0, composite="EpsilonGammaBox", batch_size=2, device="cpu",
                  canonizers=None)
    ref = attribute(net, X, target=0, composite=EpsilonGammaBox(low=low, high=high),
                    device="cpu", canonizers=None)
    wrong = attribute(net, X, target=0, composite=EpsilonGammaBox(low=-5.0, high=5.0),
                      device="cpu", canonizers=None)
    assert np.isfinite(R).all()
    np.testing.assert_allclose(R, ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(R, wrong, rtol=1e-3, atol=1e-5)


def test_attribute_method_error():
    with pytest.raises(ValueError, match=r"method='saliency' is not valid; choose one of "
                                         r"\('lrp', 'gradient_x_input', 'gradient'\)"):
        attribute(_linear_net(), np.zeros((1, 2, 2, 2), np.float32), method="saliency")


def _randomise_batch_norms(net, seed=1):
    """Non-trivial BatchNorm statistics (at init BatchNorm is the identity: merging is a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.25)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return net.eval()


def _zennit_lrp(net, X, canonizers):
    """zennit's own EpsilonPlusFlat LRP of the predicted class, as its authors use it."""
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat

    x = torch.as_tensor(X)
    with torch.no_grad():
        out = net(x)
    onehot = torch.eye(out.shape[1])[out.argmax(1)]
    with Gradient(model=net, composite=EpsilonPlusFlat(canonizers=canonizers)) as attributor:
        _, R = attributor(x.clone().requires_grad_(True), onehot)
    return R.sum(dim=1).detach().numpy()


def _bn_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def _resnet18():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


def _vgg16_bn():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg16_bn(weights=None)


@pytest.mark.parametrize("make_net, canonizer, size", [
    (_resnet18, "ResNetCanonizer", 64),
    (_vgg16_bn, "VGGCanonizer", 32),
    (_bn_cnn, "SequentialMergeBatchNorm", 16),
])
def test_lrp_on_batch_norm_networks_matches_zennit_with_its_canonizer(make_net, canonizer, size):
    # measured without canonizers: max |difference| 394x (resnet18), 0.79x (vgg16_bn) and
    # 0.41x (this CNN) of zennit's max |relevance|; sums 256 vs 0.84, 1.0 vs 0.54, 6.5 vs 4.7
    import zennit.canonizers
    import zennit.torchvision

    net = _randomise_batch_norms(make_net())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    X = np.random.RandomState(0).rand(2, 3, size, size).astype(np.float32)
    R = attribute(net, X, device="cpu")
    cls = getattr(zennit.torchvision, canonizer, None) or getattr(zennit.canonizers, canonizer)
    Z = _zennit_lrp(net, X, [cls()])
    for r, z in zip(R, Z):
        assert np.corrcoef(r.ravel(), z.ravel())[0, 1] > 0.99
        assert abs(r.sum() - z.sum()) <= 0.1 * abs(z.sum())
        assert np.abs(r - z).max() <= 0.01 * np.abs(z).max()
    # the canonizers ran on attribute's copy and were removed from it; the network is untouched
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert all("forward" not in vars(m) and not m._forward_hooks for m in net.modules())


def test_canonizers_make_resnet_relevance_sum_to_the_explained_output():
    # the relevance starts as the one-hot (1 on the explained logit) and LRP conserves it;
    # on a random resnet18 it summed to ~0.77 with ResNetCanonizer and ~190-200 without
    net = _resnet18().eval()
    X = np.random.RandomState(0).rand(2, 3, 64, 64).astype(np.float32)
    auto = attribute(net, X, device="cpu").reshape(2, -1).sum(axis=1)
    bare = attribute(net, X, device="cpu", canonizers=None).reshape(2, -1).sum(axis=1)
    assert np.all((auto > 1 / 3) & (auto < 3))
    assert np.all(np.abs(bare) > 10)


def test_canonizers_argument():
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import EpsilonPlusFlat

    net = _randomise_batch_norms(_bn_cnn())
    X = np.random.RandomState(0).rand(2, 3, 8, 8).astype(np.float32)
    auto = attribute(net, X, device="cpu")
    given = attribute(net, X, device="cpu", canonizers=[SequentialMergeBatchNorm()])
    np.testing.assert_allclose(auto, given, rtol=1e-5, atol=1e-7)
    # a composite instance is used as it is: here without canonizers, like canonizers=None
    bare = attribute(net, X, device="cpu", canonizers=None)
    instance = attribute(net, X, device="cpu", composite=EpsilonPlusFlat())
    np.testing.assert_allclose(bare, instance, rtol=1e-5, atol=1e-7)
    assert np.abs(bare - auto).max() > 0.05 * np.abs(auto).max()
    # no BatchNorm: nothing to canonize
    np.testing.assert_allclose(attribute(_conv_net(), X, device="cpu"),
                               attribute(_conv_net(), X, device="cpu", canonizers=None))
    with pytest.raises(ValueError, match="canonizers must be 'auto', None or a list of zennit"):
        attribute(net, X, device="cpu", canonizers="merge")
    with pytest.raises(ValueError, match="canonizers cannot be combined with a composite instance"):
        attribute(net, X, device="cpu", composite=EpsilonPlusFlat(),
                  canonizers=[SequentialMergeBatchNorm()])


def test_attribute_explains_a_fitted_correctors_network():
    from skdebias import GradientPenaltyCorrector

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(2 * 4 * 4, 2))
    rng = np.random.RandomState(0)
    X = rng.rand(40, 1, 6, 6).astype("float32")
    rr = GradientPenaltyCorrector(net, "1", max_epochs=1, device="cpu", random_state=0).fit(
        X, rng.randint(0, 2, 40), concept_labels=rng.randint(0, 2, 40))
    maps = attribute(rr, X[:4], target=0, method="gradient", device="cpu")
    expected = attribute(rr.module_, X[:4], target=0, method="gradient", device="cpu")
    np.testing.assert_allclose(maps, expected)
    assert np.abs(maps).sum() > 0
