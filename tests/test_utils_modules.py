"""skdebias._utils._modules: the module behind an estimator, layer lookup, copies and
replacements, devices, train/eval flags, class labels and outputs."""

import numpy as np
import pytest
import torch
from torch import nn

from skdebias._utils._modules import (
    check_logits,
    copy_estimator,
    copy_module,
    find_layer,
    get_module,
    last_linear,
    layer_names,
    module_device,
    n_outputs,
    network_classes,
    predict_proba,
    preserve_mode,
    replace_module,
    resolve_linear,
)
from skdebias.models import SmallCNN, make_classifier


def test_find_layer_lists_close_names(cnn):
    assert find_layer(cnn, "features.6") is cnn.features[6]
    with pytest.raises(ValueError, match=r"Unknown layer 'feature.6'.*'features.6'"):
        find_layer(cnn, "feature.6")
    with pytest.raises(ValueError, match="Unknown layer ''"):
        find_layer(cnn, "")


def test_preserve_mode_restores_mixed_flags(cnn):
    cnn.train()
    cnn.features[0].eval()
    with preserve_mode(cnn, train=False):
        assert not any(m.training for m in cnn.modules())
    assert cnn.training and not cnn.features[0].training and cnn.features[3].training


def test_copy_module_is_independent(cnn):
    copy = copy_module(cnn)
    with torch.no_grad():
        copy.features[0].weight.add_(1.0)
    assert not torch.equal(copy.features[0].weight, cnn.features[0].weight)


def test_get_module_does_not_initialise_callers_net():
    net = make_classifier(SmallCNN)
    module = get_module(net)
    assert isinstance(module, SmallCNN)
    assert not getattr(net, "initialized_", False)
    with pytest.raises(TypeError, match="torch.nn.Module or a skorch NeuralNet"):
        get_module("resnet")


def test_find_layer_needs_a_string():
    with pytest.raises(ValueError, match="layer must be a string naming a sub-module, got 3"):
        find_layer(nn.Sequential(nn.ReLU()), 3)


def test_layer_names_leave_out_the_root():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU()))
    assert layer_names(net) == ["0", "1", "1.0"]


def test_replace_module_at_any_depth():
    net = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    new = nn.Tanh()
    old = replace_module(net, "1.1", new)
    assert isinstance(old, nn.ReLU) and net[1][1] is new
    top = nn.Identity()
    assert isinstance(replace_module(net, "0", top), nn.Linear) and net[0] is top
    x = torch.randn(4, 3)
    torch.testing.assert_close(net(x), torch.tanh(net[1][0](x)))
    with pytest.raises(ValueError, match="Unknown layer '1.5'"):
        replace_module(net, "1.5", nn.ReLU())


def test_copy_module_shares_no_tensor():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    copy = copy_module(net)
    pairs = list(zip(net.state_dict().values(), copy.state_dict().values()))
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in pairs)


def test_preserve_mode_restores_the_flags_after_an_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    net.eval()
    net[1].train()
    with pytest.raises(RuntimeError, match="boom"), preserve_mode(net, train=True):
        assert all(m.training for m in net.modules())
        raise RuntimeError("boom")
    assert [m.training for m in net.modules()] == [False, False, True]


def test_last_linear_and_resolve_linear():
    assert last_linear(SmallCNN()) == "classifier.2"
    with pytest.raises(ValueError, match=r"no torch.nn.Linear layer to use by default; pass "
                                         r"head='<name>'"):
        last_linear(nn.Sequential(nn.Conv2d(1, 1, 1)), param="head")
    with pytest.raises(ValueError, match=r"single torch.nn.Linear.*torch.nn.Sequential\(net\)"):
        last_linear(nn.Linear(2, 2))
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    name, lin = resolve_linear(net, None, "Owner")
    assert name == "2" and lin is net[2]
    assert resolve_linear(net, "0", "Owner") == ("0", net[0])
    with pytest.raises(ValueError, match="layer='1' is a ReLU; Owner updates a torch.nn.Linear"):
        resolve_linear(net, "1", "Owner")


def test_module_device():
    assert module_device(nn.Linear(2, 2, device="meta")).type == "meta"
    # no parameter: the first buffer's device; neither: the CPU
    assert module_device(nn.BatchNorm1d(2, affine=False, device="meta")).type == "meta"
    assert module_device(nn.ReLU()) == torch.device("cpu")


def test_copy_estimator_of_a_module_and_of_a_skorch_net():
    net = nn.Linear(2, 2)
    copy, module = copy_estimator(net)
    assert copy is module and module is not net
    assert torch.equal(module.weight, net.weight)
    skorch_net = make_classifier(SmallCNN, device="cpu")
    copy, module = copy_estimator(skorch_net, device=torch.device("cpu"))
    assert copy is not skorch_net and copy.initialized_ and module is copy.module_
    assert copy.device == "cpu"
    assert not getattr(skorch_net, "initialized_", False)  # the caller's net stays as it was


def test_network_classes():
    assert network_classes(nn.Linear(2, 3), 3).tolist() == [0, 1, 2]
    X = np.random.RandomState(0).rand(6, 3, 28, 28).astype(np.float32)
    net = make_classifier(SmallCNN, module__n_classes=2, max_epochs=1, device="cpu", verbose=0,
                          classes=["cat", "dog"]).fit(X, np.arange(6) % 2)
    assert network_classes(net, 2).tolist() == ["cat", "dog"]
    assert network_classes(net, 3).tolist() == [0, 1, 2]  # not one label per output
    assert network_classes(make_classifier(SmallCNN), 10).tolist() == list(range(10))


def test_predict_proba_of_a_module_is_the_softmax_in_eval_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5))
    net.train()
    X = np.random.RandomState(0).rand(5, 2).astype(np.float32)
    proba = predict_proba(net, X, batch_size=2)
    expected = torch.softmax(net[0](torch.as_tensor(X)), dim=1).detach().numpy()
    assert proba.dtype == np.float32 and proba.shape == (5, 3)
    np.testing.assert_allclose(proba, expected, rtol=1e-6)  # no dropout: eval mode
    assert net.training and net[1].training  # flags restored


def test_check_logits_and_n_outputs():
    logits = torch.zeros(2, 3)
    assert check_logits(logits) is logits
    assert check_logits((logits, torch.zeros(2))) is logits  # first element of a tuple
    with pytest.raises(ValueError, match=r"must output logits of shape \(n_samples, n_classes\); "
                                         r"got Tensor of shape \(2, 3, 4\)"):
        check_logits(torch.zeros(2, 3, 4))
    net = nn.Sequential(nn.Linear(2, 5), nn.Dropout())
    net.train()
    assert n_outputs(net, torch.zeros(1, 2)) == 5 and net.training
