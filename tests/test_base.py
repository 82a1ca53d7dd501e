"""The skorch side of skdebias.base: LayerCapture, HookedLossMixin, DictInputClassifier,
and the label / sample checks they use."""

import copy
import warnings
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit
from torch import nn

from _nets import MLP, make_end
from skdebias._utils._runtime import limit_threads
from skdebias._utils._validation import check_group_labels
from skdebias.base import BIAS_KEY, DictInputClassifier, HookedLossMixin, LayerCapture
from skdebias.correction import GroupBalancedClassifier


@pytest.fixture(autouse=True)
def _one_thread():
    with limit_threads(1):
        yield


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _hooks_left(module):
    return [name for name, m in module.named_modules() if m._forward_hooks or m._forward_pre_hooks]


@pytest.fixture
def data():
    rng = np.random.RandomState(0)
    X = rng.randn(40, 4).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64) + (X[:, 1] > 0)
    return X, y


# ------------------------------------------------------------------ LayerCapture
@pytest.mark.parametrize("capture_input", [False, True])
def test_capture_records_output_or_input_and_removes_the_hook(capture_input):
    model = _mlp()
    x = torch.randn(5, 4)
    with LayerCapture(model[2], capture_input=capture_input) as capture:
        out = model(x)
    expected = out if not capture_input else model[1](model[0](x))
    assert torch.allclose(capture.last, expected) and capture.last.requires_grad
    assert _hooks_left(model) == []
    with pytest.raises(ValueError, match="inside"):
        with LayerCapture(model[0]):
            raise ValueError("inside")
    assert _hooks_left(model) == []


def test_capture_requires_grad_makes_a_leaf_of_a_frozen_output():
    model = _mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    with LayerCapture(model[0], requires_grad=True) as capture:
        out = model(torch.randn(3, 4))
    (g,) = torch.autograd.grad(out.sum(), capture.last)
    assert g.shape == (3, 8)


def test_capture_bound_to_root_closes_after_the_forward_pass():
    model = _mlp()
    seen = []
    capture = LayerCapture(model[2], capture_input=True).open(
        root=model, on_forward_end=lambda c: seen.append(c.last.shape))
    model(torch.randn(2, 4))
    assert seen == [torch.Size([2, 8])] and _hooks_left(model) == []
    model(torch.randn(2, 4))  # closed: nothing more recorded
    assert len(capture.store) == 1 and len(seen) == 1


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_capture_bound_to_root_closes_when_the_forward_pass_raises():
    model = nn.Sequential(nn.Linear(4, 8), _Boom())
    seen = []
    LayerCapture(model[0]).open(root=model, on_forward_end=seen.append)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 4))
    assert seen == [] and _hooks_left(model) == []


def test_capture_bound_to_root_never_hides_the_error_of_a_failed_forward():
    """Another root hook registered after it: its removal waits for close()."""
    model = nn.Sequential(nn.Linear(4, 8), _Boom())
    capture = LayerCapture(model[0]).open(root=model)
    other = model.register_forward_hook(lambda *a: None, always_call=True)
    with pytest.raises(RuntimeError, match="boom"):  # not "mutated during iteration"
        model(torch.randn(2, 4))
    assert _hooks_left(model) == [""]  # the layer hook is gone, the root hook waits
    capture.close()
    other.remove()
    assert _hooks_left(model) == []


# ------------------------------------------------------------------ HookedLossMixin
class _ActNet(HookedLossMixin, NeuralNetClassifier):
    """Cross-entropy plus ``weight`` times the mean squared hidden activation."""

    hooked_term_names = ("act",)

    def __init__(self, *args, weight=0.5, raise_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight = weight
        self.raise_at = raise_at

    def hooked_layer(self):
        return self.module_[1], False

    def hooked_terms(self, activations, y_pred, y_true, X, training):
        self.seen_grad = torch.is_grad_enabled()
        if self.raise_at is not None:
            self.raise_at -= 1
            if self.raise_at == 0:
                raise RuntimeError("term failed")
        return {"act": (self.weight, activations.pow(2).mean())}


def _act_net(**kw):
    params = dict(module=_mlp(), criterion=nn.CrossEntropyLoss, lr=0.1, max_epochs=2,
                  batch_size=16, train_split=ValidSplit(4), verbose=0,
                  iterator_train__shuffle=False)
    params.update(kw)
    return _ActNet(**params)


def test_mixin_adds_the_weighted_term_and_logs_it(data):
    X, y = data
    net = _act_net().fit(X, y)
    batch = net.history[-1]["batches"][0]
    assert {"train_act"} <= set(batch) and "valid_act" in net.history[-1]["batches"][-1]
    assert len(net.history[:, "train_act"]) == 2 and len(net.history[:, "valid_act"]) == 2
    # the loss is CE + 0.5 * term
    Xt, yt = torch.as_tensor(X[:8]), torch.as_tensor(y[:8])
    with net._capture():
        loss = net.get_loss(net.infer(Xt), yt, X=Xt, training=False)
    hidden = net.module_[1](net.module_[0](Xt))
    expected = nn.functional.cross_entropy(net.module_(Xt), yt) + 0.5 * hidden.pow(2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert _hooks_left(net.module_) == []


def test_mixin_weight_zero_logs_but_does_not_train_on_the_term(data):
    X, y = data
    plain = NeuralNetClassifier(_mlp(), criterion=nn.CrossEntropyLoss, lr=0.1, max_epochs=2,
                                batch_size=16, train_split=None, verbose=0,
                                iterator_train__shuffle=False).fit(X, y)
    zero = _act_net(weight=0.0, train_split=None).fit(X, y)
    for a, b in zip(plain.module_.parameters(), zero.module_.parameters()):
        assert torch.equal(a, b)
    assert all(v > 0 for v in zero.history[:, "train_act"])


def test_mixin_validation_with_or_without_gradients(data):
    X, y = data
    net = _act_net(max_epochs=1)
    net.fit(X, y)
    assert net.seen_grad is False  # skorch's validation runs under no_grad
    net = _act_net(max_epochs=1)
    net.hooked_grad_in_validation = True
    net.fit(X, y)
    assert net.seen_grad is True
    assert all(np.isfinite(net.history[:, "valid_loss"]))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_mixin_removes_the_hook_when_a_step_raises(data, exc):
    X, y = data

    class Net(_ActNet):
        def hooked_terms(self, *args):
            terms = super().hooked_terms(*args)
            if len(self.history) and len(self.history[-1]["batches"]) == 2:
                raise exc("interrupted")
            return terms

    net = Net(module=_mlp(), criterion=nn.CrossEntropyLoss, max_epochs=1, batch_size=8,
              train_split=None, verbose=0)
    if exc is KeyboardInterrupt:
        net.fit(X, y)  # skorch stops training on Ctrl-C
    else:
        with pytest.raises(exc, match="interrupted"):
            net.fit(X, y)
    assert _hooks_left(net.module_) == []
    assert not set(vars(net)) & {"_hooked_capture", "_hooked_pending"}


def test_mixin_state_is_no_parameter_and_does_not_pickle(data):
    X, y = data
    net = _act_net(max_epochs=1).fit(X, y)
    with net._capture():
        # a loss computed outside skorch's loop leaves a value to log behind
        net.get_loss(net.infer(torch.as_tensor(X[:4])), torch.as_tensor(y[:4]),
                     X=torch.as_tensor(X[:4]), training=True)
        assert "_hooked_capture" not in net.get_params()
    assert "_hooked_pending" in vars(net) and "_hooked_pending" not in net.get_params()
    assert "_hooked_pending" not in net.__getstate__()
    assert clone(net).weight == 0.5
    restored = pickle.loads(pickle.dumps(net))
    assert np.allclose(restored.predict_proba(X), net.predict_proba(X))


# ------------------------------------------------------------------ DictInputClassifier
def test_dict_input_strips_extra_keys_and_copies_a_module_instance(data):
    X, y = data
    module = _mlp()
    before = copy.deepcopy(module.state_dict())
    net = DictInputClassifier(module, criterion=nn.CrossEntropyLoss, max_epochs=1,
                              train_split=None, verbose=0)
    net.fit(net._pack(X, BIAS_KEY, np.arange(len(y)) % 2, check_group_labels), y)
    assert net.module_ is not module
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    proba = net.predict_proba({"X": X, BIAS_KEY: np.zeros(len(y))})
    assert np.allclose(proba, net.predict_proba(X))


def test_dict_input_pack_errors(data):
    X, y = data
    net = DictInputClassifier(_mlp())
    with pytest.raises(ValueError, match="both as a key"):
        net._pack({"X": X, BIAS_KEY: y}, BIAS_KEY, y, check_group_labels)
    with pytest.raises(ValueError, match="under the key 'X'"):
        net._pack({"images": X}, BIAS_KEY, y, check_group_labels)
    with pytest.raises(TypeError, match="not a Dataset"):
        net._pack(torch.utils.data.TensorDataset(torch.as_tensor(X)), BIAS_KEY, y,
                  check_group_labels)
    assert net._pack(X, BIAS_KEY, None, check_group_labels) is None


# ------------------------------------ DictInputClassifier through its subclasses (EnD, reweighting)
@pytest.mark.parametrize("kind", ["end", "reweight"])
def test_module_instance_is_copied_at_every_fit(bias_toy, kind):
    X, y, bias = bias_toy
    torch.manual_seed(0)
    module = MLP()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    params = dict(optimizer=torch.optim.Adam, lr=1e-2, max_epochs=2, batch_size=32,
                  train_split=None, verbose=0)
    clf = make_end(module=module) if kind == "end" else GroupBalancedClassifier(module, **params)
    weights = []
    for _ in range(2):
        torch.manual_seed(1)
        clf.fit(X, y, bias=bias)
        weights.append({k: v.clone() for k, v in clf.module_.state_dict().items()})
        assert clf.module_ is not module
        for k, v in module.state_dict().items():
            assert torch.equal(v, before[k]), f"the caller's module changed ({k})"
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), "the second fit did not start afresh"
    assert not torch.equal(weights[0]["head.weight"], before["head.weight"])


@pytest.mark.parametrize("kind", ["end", "reweight"])
def test_nan_or_inf_in_X_or_bias_names_the_sample(bias_toy, kind):
    X, y, bias = bias_toy
    make = (lambda: make_end(max_epochs=1)) if kind == "end" else (lambda: GroupBalancedClassifier(
        MLP, max_epochs=1, train_split=None, verbose=0))
    bad = X.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN or infinity \(first at sample 5\)"):
        make().fit(bad, y, bias=bias)
    bad[5, 2], bad[9, 0] = 0.0, -np.inf
    with pytest.raises(ValueError, match=r"X contains NaN or infinity \(first at sample 9\)"):
        make().fit({"X": torch.as_tensor(bad), "bias": bias}, y)
    bad_bias = bias.astype(float)
    bad_bias[7] = np.nan
    with pytest.raises(ValueError, match=r"bias contains NaN or infinity \(first at sample 7"):
        make().fit(X, y, bias=bad_bias)
    bad_bias[7] = np.inf
    with pytest.raises(ValueError, match=r"bias contains NaN or infinity \(first at sample 7"):
        make().fit({"X": X, "bias": bad_bias}, y)


@pytest.mark.parametrize("kind", ["end", "reweight"])
@pytest.mark.parametrize("convert", ["float64", "int", "list", "tensor64"])
def test_float64_int_and_list_inputs_are_converted(bias_toy, kind, convert):
    X, y, bias = bias_toy
    Xc = {"float64": lambda: X.astype(np.float64), "int": lambda: np.round(X).astype(np.int64),
          "list": lambda: X.tolist(),
          "tensor64": lambda: torch.as_tensor(X, dtype=torch.float64)}[convert]()
    clf = make_end(max_epochs=1) if kind == "end" else GroupBalancedClassifier(
        MLP, max_epochs=1, train_split=None, verbose=0)
    torch.manual_seed(0)
    clf.fit(Xc, y, bias=bias)
    proba = clf.predict_proba(Xc)
    assert proba.shape == (len(y), 3) and np.all(np.isfinite(proba))
    assert clf.predict(Xc).shape == (len(y),)


# ------------------------------------------------------------------ the guard runs last
class _ForgetAtTheEnd(Callback):
    """Leaves the net at chance level when training ends, as a checkpoint that loads the
    weights of an early, untrained epoch does."""

    def on_train_end(self, net, **kwargs):
        with torch.no_grad():
            for p in net.module_.parameters():
                p.zero_()


def test_the_chance_level_check_judges_the_network_the_other_callbacks_leave(bias_toy):
    from skdebias.exceptions import ChanceLevelWarning

    X, y, bias = bias_toy
    kw = dict(optimizer=torch.optim.Adam, lr=0.05, max_epochs=20, train_split=None, verbose=0)
    trained = GroupBalancedClassifier(MLP, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChanceLevelWarning)  # it trains: no warning
        torch.manual_seed(0)
        trained.fit(X, y, bias=bias)
    assert np.mean(trained.predict(X) == y) > 0.6
    forgetful = GroupBalancedClassifier(MLP, callbacks=[("forget", _ForgetAtTheEnd())], **kw)
    assert [name for name, _ in forgetful.initialize().callbacks_][-1] == "divergence_guard"
    torch.manual_seed(0)
    with pytest.warns(ChanceLevelWarning, match="GroupBalancedClassifier ends its training"):
        forgetful.fit(X, y, bias=bias)


class _KeepThreeClasses(Callback):
    """At the end of training the last layer stops predicting classes 3-9."""

    def on_train_end(self, net, **kwargs):
        with torch.no_grad():
            net.module_[-1].bias[3:] = -1e3


def test_a_network_that_ends_far_below_its_best_epoch_warns():
    from skdebias.exceptions import ChanceLevelWarning

    rng = np.random.RandomState(0)
    y = np.arange(200) % 10
    X = (3.0 * np.eye(10)[y] + 0.3 * rng.randn(200, 10)).astype(np.float32)

    def net(callbacks=()):
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 10))
        return DictInputClassifier(module, criterion=nn.CrossEntropyLoss,
                                   optimizer=torch.optim.Adam, lr=0.05, max_epochs=10,
                                   train_split=None, verbose=0, callbacks=list(callbacks))

    with warnings.catch_warnings():
        warnings.simplefilter("error", ChanceLevelWarning)
        assert np.mean(net().fit(X, y).predict(X) == y) > 0.95
    forgetful = net([("keep_three", _KeepThreeClasses())])
    # 0.3 right at the end: above the chance threshold (0.1 + 0.1), below a quarter of the best
    # epoch's margin (0.1 + 0.25 * 0.9)
    with pytest.warns(ChanceLevelWarning, match=r"ends its training predicting 0\.300 of 200 "
                      r"training samples correctly, less than 0\.25 of what its best epoch "
                      r"\(epoch \d+: 1\.000\) had"):
        forgetful.fit(X, y)
    assert np.mean(forgetful.predict(X) == y) == pytest.approx(0.3)
