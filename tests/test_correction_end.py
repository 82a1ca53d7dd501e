"""EnD: the two terms, the EnDRegularizer callback and EnDClassifier."""

import pickle
import re
import warnings

import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from skorch import NeuralNetClassifier
from skorch.helper import SliceDict
from torch import nn

from _nets import MLP, make_end
from skdebias.correction import (
    EnDClassifier,
    EnDRegularizer,
    IgnoreBiasInput,
    end_terms,
)
from skdebias.exceptions import SaturatedPenaltyWarning

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the two terms
def test_end_terms_hand_computed_4_samples():
    # normalised rows: (1,0), (1,1)/sqrt2, (0,1), (1,0)
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [2.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1])
    bias = torch.tensor([0, 1, 0, 1])
    r_perp, r_par = end_terms(f, y, bias)
    s = 1 / np.sqrt(2)
    # same-bias pairs: (0,2) G=0 (b=0) and (1,3) G=1/sqrt2 (b=1)
    assert float(r_perp) == pytest.approx((0.0 + s) / 2, abs=1e-6)
    # same class, other bias: (0,1) G=1/sqrt2 and (2,3) G=0
    assert float(r_par) == pytest.approx(1 - ((1 + s) / 2 + (1 + 0) / 2) / 2, abs=1e-6)


def test_end_terms_abs_of_group_sum_not_sum_of_abs():
    f = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 0, 1])
    bias = torch.tensor([0, 0, 0, 1])
    r_perp, r_par = end_terms(f, y, bias)
    # bias 0: G01=-1, G02=+1, G12=-1 -> |sum| = 1 over 3 pairs (sum of |.| would give 1.0)
    assert float(r_perp) == pytest.approx(1 / 3, abs=1e-6)
    # only (1,3): same class, other bias, G=0 -> 1 - 1/2
    assert float(r_par) == pytest.approx(0.5, abs=1e-6)


def test_end_terms_no_pairs_and_gradients():
    f = torch.randn(3, 5, requires_grad=True)
    r_perp, r_par = end_terms(f, [0, 1, 2], [0, 1, 2])
    assert float(r_perp.detach()) == 0.0 and float(r_par.detach()) == 0.0
    r_perp, r_par = end_terms(f, [0, 0, 1], [0, 1, 1])
    (r_perp + r_par).backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_end_terms_spatial_features_are_flattened():
    f = torch.rand(4, 2, 3, 3)
    a = end_terms(f, [0, 0, 1, 1], [0, 1, 0, 1])
    b = end_terms(f.reshape(4, -1), [0, 0, 1, 1], [0, 1, 0, 1])
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_end_terms_center_subtracts_batch_mean():
    # non-negative features: every uncentred similarity is >= 0
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    y, bias = [0, 1, 0, 1], [0, 0, 1, 1]
    r_perp, r_par = end_terms(f, y, bias)
    assert float(r_perp) == pytest.approx(1.0) and float(r_par) == pytest.approx(0.5)
    # mean (1, 1.5): rows (0,-1.5), (2,-1.5), (-1,0.5), (-1,2.5); hand-computed cosines
    c = f - f.mean(0)
    n = c / c.norm(dim=1, keepdim=True)
    g01, g23, g02, g13 = (float(n[i] @ n[j]) for i, j in ((0, 1), (2, 3), (0, 2), (1, 3)))
    r_perp, r_par = end_terms(f, y, bias, center=True)
    assert float(r_perp) == pytest.approx((abs(g01) + abs(g23)) / 2, abs=1e-6)
    assert float(r_par) == pytest.approx(1 - ((1 + g02) / 2 + (1 + g13) / 2) / 2, abs=1e-6)
    assert g01 == pytest.approx(0.6, abs=1e-6)  # 2.25 / (1.5 * 2.5)


def test_end_defaults_and_center_validation(bias_toy):
    assert EnDRegularizer().get_params() == {"layer": None, "alpha": 1.0, "beta": 3.0,
                                             "center": True, "perp_loss": "linear"}
    params = make_end().get_params()
    assert (params["alpha"], params["beta"], params["center"], params["perp_loss"]) == \
        (1.0, 3.0, True, "linear")
    X, y, bias = bias_toy
    with pytest.raises(ValueError, match="center=1 is not valid"):
        make_end(center=1).fit(X, y, bias=bias)
    with pytest.raises(ValueError, match="center='yes' is not valid"):
        EnDRegularizer(center="yes").penalty(torch.rand(4, 2), [0, 0, 1, 1], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="perp_loss='square' is not valid"):
        make_end(perp_loss="square").fit(X, y, bias=bias)
    with pytest.raises(ValueError, match="perp_loss='exp' is not valid"):
        EnDRegularizer(perp_loss="exp").penalty(torch.rand(4, 2), [0, 0, 1, 1], [0, 1, 0, 1])


def _saturated_batch():
    """Six features in two bias groups whose centred features all but coincide (R_perp ~ 1)."""
    torch.manual_seed(0)
    f = torch.tensor([[5.0, 0.0, 0.0]] * 3 + [[0.0, 5.0, 0.0]] * 3) + 0.02 * torch.randn(6, 3)
    return f.requires_grad_(True), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0] * 3 + [1] * 3)


def test_log_perp_loss_value_and_gradient_where_linear_vanishes():
    f, y, bias = _saturated_batch()
    r_perp, r_par = (t.detach() for t in end_terms(f, y, bias, center=True))
    assert float(r_perp) > 0.99
    linear, log = (EnDRegularizer(alpha=2.0, beta=0.5, perp_loss=p) for p in ("linear", "log"))
    assert float(log.penalty(f.detach(), y, bias)) == pytest.approx(
        float(-2.0 * torch.log1p(-r_perp) + 0.5 * r_par), rel=1e-5)
    assert float(linear.penalty(f.detach(), y, bias)) == pytest.approx(
        float(2.0 * r_perp + 0.5 * r_par))
    # the disentangling term alone: the log form scales the gradient by 1 / (1 - R_perp)
    only = dict(alpha=1.0, beta=0.0)
    (g_lin,) = torch.autograd.grad(EnDRegularizer(**only).penalty(f, y, bias), f)
    (g_log,) = torch.autograd.grad(EnDRegularizer(perp_loss="log", **only).penalty(f, y, bias), f)
    ratio = float(g_log.norm() / g_lin.norm())
    assert ratio == pytest.approx(1 / (1 - float(r_perp)), rel=1e-3) and ratio > 100


def test_log_perp_loss_in_the_classifier_logs_both_terms(bias_toy):
    X, y, bias = bias_toy
    torch.manual_seed(0)
    clf = make_end(perp_loss="log", max_epochs=1).fit(X, y, bias=bias)
    batch = clf.history[-1]["batches"][0]
    assert {"end_perp", "end_par", "end_perp_log"} <= set(batch)
    assert batch["end_perp_log"] == pytest.approx(-np.log1p(-batch["end_perp"]), rel=1e-4)
    # the loss adds alpha * -log(1 - R_perp), not alpha * R_perp
    Xt, yt, bt = torch.as_tensor(X[:16]), torch.as_tensor(y[:16]), torch.as_tensor(bias[:16])
    with clf._capture():
        loss = clf.get_loss(clf.infer({"X": Xt, "bias": bt}), yt, X={"X": Xt, "bias": bt})
    r_perp, r_par = end_terms(clf.module_.body(Xt), yt, bt, center=True)
    expected = nn.functional.cross_entropy(clf.module_(Xt), yt) - torch.log1p(-r_perp) + \
        3.0 * r_par
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.fixture
def saturating_toy():
    """Three features that carry the bias ten times as strongly as anything else: the
    bottleneck features of each bias group coincide and stay so at a small lr."""
    rng = np.random.RandomState(0)
    n = 96
    bias = rng.randint(0, 3, n)
    y = np.where(rng.rand(n) < 0.9, bias, rng.randint(0, 3, n))
    X = (0.05 * rng.randn(n, 6)).astype(np.float32)
    X[np.arange(n), bias] += 10.0
    return X, y.astype(np.int64), bias.astype(np.int64)


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [w for w in caught if issubclass(w.category, SaturatedPenaltyWarning)]


def test_saturated_disentangling_term_warns(saturating_toy, bias_toy):
    X, y, bias = saturating_toy
    torch.manual_seed(0)
    (w,) = _caught(lambda: make_end().fit(X, y, bias=bias))
    msg = str(w.message)
    assert re.search(r"R_perp averaged (0\.9[5-9]\d|1\.000) over the last training epoch", msg)
    assert "perp_loss='log'" in msg and "raise alpha (now 1.0)" in msg
    # the log form names alpha only
    torch.manual_seed(0)
    (w,) = _caught(lambda: make_end(perp_loss="log").fit(X, y, bias=bias))
    assert "perp_loss" not in str(w.message) and "raise alpha (now 1.0)" in str(w.message)
    # no regulariser, no warning; nor where the term falls (the usual toy)
    assert not _caught(lambda: make_end(alpha=0.0).fit(X, y, bias=bias))
    Xb, yb, bb = bias_toy
    assert not _caught(lambda: make_end().fit(Xb, yb, bias=bb))


def test_saturated_disentangling_term_warns_from_the_callback(saturating_toy):
    X, y, bias = saturating_toy
    torch.manual_seed(0)
    net = NeuralNetClassifier(IgnoreBiasInput(MLP()), criterion=nn.CrossEntropyLoss,
                              optimizer=torch.optim.Adam, lr=1e-2, callbacks=[
                                  ("end", EnDRegularizer(layer="module.body.1"))],
                              max_epochs=3, train_split=None, verbose=0)
    (w,) = _caught(lambda: net.fit({"X": X, "bias": bias}, y))
    assert "perp_loss='log'" in str(w.message)


def test_end_terms_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        end_terms(torch.rand(4, 2), [0, 1, 0], [0, 1, 0, 1])


def test_regularizer_loss_term_in_a_torch_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    reg = EnDRegularizer(alpha=2.0, beta=0.5)
    x, y, bias = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 1, 0, 1, 0, 1])
    with reg.attach(model) as store:
        model(x)
    with torch.no_grad():
        feats = model[1](model[0](x))  # input of the last Linear
    assert torch.allclose(store[-1], feats)
    r_perp, r_par = end_terms(feats, y, bias, center=True)
    penalty = reg.penalty(store[-1], y, bias).detach()
    assert float(penalty) == pytest.approx(float(2 * r_perp + 0.5 * r_par))
    with pytest.raises(ValueError, match="alpha must be"):
        EnDRegularizer(alpha=-1).penalty(feats, y, bias)


# ------------------------------------------------------------------ EnDClassifier


def test_endclassifier_fits_and_logs_terms(bias_toy):
    X, y, bias = bias_toy
    torch.manual_seed(0)
    clf = make_end(alpha=1.0, beta=1.0).fit(X, y, bias=bias)
    assert clf.predict(X).shape == (len(y),)
    assert clf.predict_proba(X).shape == (len(y), 3)
    batch = clf.history[-1]["batches"][0]
    assert {"end_perp", "end_par"} <= set(batch)


def test_endclassifier_default_validation_split_scores_the_dict_input(bias_toy):
    # skorch's default split hands the dict input back as a Dataset for validation scoring
    from skorch.dataset import ValidSplit

    X, y, bias = bias_toy
    clf = make_end(train_split=ValidSplit(5, stratified=True)).fit(X, y, bias=bias)
    assert {"valid_loss", "valid_acc"} <= set(clf.history[-1])
    assert 0.0 <= clf.history[-1]["valid_acc"] <= 1.0


def test_endclassifier_loss_is_ce_plus_penalty(bias_toy):
    X, y, bias = bias_toy
    torch.manual_seed(0)
    clf = make_end(alpha=0.7, beta=1.3, max_epochs=1).fit(X, y, bias=bias)
    Xt, yt, bt = torch.as_tensor(X[:16]), torch.as_tensor(y[:16]), torch.as_tensor(bias[:16])
    with clf._capture():
        y_pred = clf.infer({"X": Xt, "bias": bt})
        loss = clf.get_loss(y_pred, yt, X={"X": Xt, "bias": bt}, training=False)
    feats = clf.module_.body(Xt)
    r_perp, r_par = end_terms(feats, yt, bt, center=True)
    expected = nn.functional.cross_entropy(clf.module_(Xt), yt) + 0.7 * r_perp + 1.3 * r_par
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_endclassifier_changes_training(bias_toy):
    X, y, bias = bias_toy
    torch.manual_seed(0)
    plain = make_end(alpha=0.0, beta=0.0).fit(X, y, bias=bias)
    torch.manual_seed(0)
    reg = make_end(alpha=5.0, beta=5.0).fit(X, y, bias=bias)
    w0 = plain.module_.head.weight.detach()
    w1 = reg.module_.head.weight.detach()
    assert not torch.allclose(w0, w1)
    # the regularised run ends with a lower disentangling term than the plain one
    last = lambda net: np.mean([b["end_perp"] for b in net.history[-1]["batches"]])  # noqa: E731
    assert last(reg) < last(plain)


def test_endclassifier_dict_and_slicedict_inputs(bias_toy):
    X, y, bias = bias_toy
    torch.manual_seed(0)
    a = make_end(max_epochs=1).fit(X, y, bias=bias)
    torch.manual_seed(0)
    b = make_end(max_epochs=1).fit({"X": X, "bias": bias}, y)
    torch.manual_seed(0)
    c = make_end(max_epochs=1).fit(SliceDict(X=X, bias=bias), y)
    for other in (b, c):
        assert np.allclose(a.predict_proba(X), other.predict_proba(X), atol=1e-6)


def test_endclassifier_missing_or_bad_bias(bias_toy):
    X, y, bias = bias_toy
    with pytest.raises(ValueError, match="needs bias labels"):
        make_end().fit(X, y)
    with pytest.raises(ValueError, match="one label per sample"):
        make_end().fit(X, y, bias=bias[:-1])
    with pytest.raises(ValueError, match="integer group labels"):
        make_end().fit(X, y, bias=bias + 0.5)
    with pytest.raises(ValueError, match="both as a key"):
        make_end().fit({"X": X, "bias": bias}, y, bias=bias)
    with pytest.raises(ValueError, match="beta must be"):
        make_end(beta=-1.0).fit(X, y, bias=bias)


def test_endclassifier_clone_params_pickle(bias_toy):
    X, y, bias = bias_toy
    clf = make_end(alpha=0.3, beta=0.2, layer="body.1")
    params = clf.get_params()
    assert params["alpha"] == 0.3 and params["beta"] == 0.2 and params["layer"] == "body.1"
    cloned = clone(clf)
    assert cloned.alpha == 0.3 and cloned.layer == "body.1"
    torch.manual_seed(0)
    clf.fit(X, y, bias=bias)
    restored = pickle.loads(pickle.dumps(clf))
    assert np.allclose(restored.predict_proba(X), clf.predict_proba(X))
    assert "_end_store" not in clf.get_params()


def test_endclassifier_unknown_layer(bias_toy):
    X, y, bias = bias_toy
    with pytest.raises(ValueError, match="Unknown layer 'bdy.1'"):
        make_end(layer="bdy.1").fit(X, y, bias=bias)


def test_endclassifier_metadata_routing(bias_toy):
    X, y, bias = bias_toy
    with sklearn.config_context(enable_metadata_routing=True):
        clf = make_end(max_epochs=1).set_fit_request(bias=True)
        search = GridSearchCV(clf, {"alpha": [0.0, 1.0]}, cv=2, scoring="accuracy")
        search.fit(X, y, bias=bias)
        assert set(search.cv_results_["param_alpha"]) == {0.0, 1.0}
        assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


# ------------------------------------------------------------------ callback on a plain net
@pytest.mark.parametrize("layer, plain_layer", [(None, None), ("body.1", "module.body.1")])
def test_callback_equals_loss_term(bias_toy, layer, plain_layer):
    """The gradient injected by the callback equals adding the penalty to the loss."""
    X, y, bias = bias_toy
    torch.manual_seed(0)
    base = MLP()
    common = dict(optimizer=torch.optim.SGD, lr=0.5, max_epochs=1, batch_size=len(y),
                  train_split=None, verbose=0, device="cpu", iterator_train__shuffle=False)
    a = EnDClassifier(MLP, alpha=2.0, beta=3.0, layer=layer, module__n_in=6, **common)
    a.initialize()
    a.module_.load_state_dict(base.state_dict())
    a.partial_fit(X, y, bias=bias)
    b = NeuralNetClassifier(IgnoreBiasInput(MLP()), criterion=nn.CrossEntropyLoss,
                            callbacks=[EnDRegularizer(layer=plain_layer, alpha=2.0, beta=3.0)],
                            **common)
    b.initialize()
    b.module_.module.load_state_dict(base.state_dict())
    b.partial_fit({"X": X, "bias": bias}, y)
    for pa, pb in zip(a.module_.parameters(), b.module_.module.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert not torch.allclose(a.module_.head.weight, base.head.weight)
    assert "end_perp" in b.history[-1]["batches"][0]


def test_callback_needs_bias_in_data(bias_toy):
    X, y, _ = bias_toy
    net = NeuralNetClassifier(IgnoreBiasInput(MLP()), criterion=nn.CrossEntropyLoss,
                              callbacks=[EnDRegularizer()], max_epochs=1, train_split=None,
                              verbose=0)
    with pytest.raises(ValueError, match="needs bias labels in every batch"):
        net.fit(X, y)


# ------------------------------------------------------------------ batches without pairs
def _callback_net(layer=None, module=MLP, **kw):
    params = dict(criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD, lr=0.1, max_epochs=1,
                  batch_size=32, train_split=None, verbose=0, device="cpu",
                  iterator_train__shuffle=False)
    params.update(kw)
    return NeuralNetClassifier(IgnoreBiasInput(module()), callbacks=[
        ("end", EnDRegularizer(layer=layer, alpha=2.0, beta=3.0))], **params)


@pytest.mark.parametrize("layer", [None, "module.body.1"])
def test_callback_batch_without_pairs_contributes_zero(bias_toy, layer):
    """A last batch of one sample has no pair at all: zero terms, no crash."""
    X, y, bias = bias_toy
    X, y, bias = np.concatenate([X, X[:1]]), np.concatenate([y, y[:1]]), np.concatenate(
        [bias, bias[:1]])  # 97 samples: batches of 32, 32, 32 and 1
    torch.manual_seed(0)
    net = _callback_net(layer).fit({"X": X, "bias": bias}, y)
    last = net.history[-1]["batches"][-1]
    assert last["train_batch_size"] == 1
    assert last["end_perp"] == 0.0 and last["end_par"] == 0.0
    assert all(torch.isfinite(p).all() for p in net.module_.parameters())


def test_batch_without_pairs_zero_terms_backpropagate():
    f = torch.randn(3, 5, requires_grad=True)
    # every sample its own class and bias: neither a same-bias nor a same-class pair
    penalty = EnDRegularizer(alpha=1.0, beta=1.0).penalty(f, [0, 1, 2], [0, 1, 2])
    penalty.backward()
    assert float(penalty.detach()) == 0.0 and torch.equal(f.grad, torch.zeros_like(f))


def test_endclassifier_batch_of_one(bias_toy):
    X, y, bias = bias_toy
    torch.manual_seed(0)
    clf = make_end(max_epochs=1, batch_size=95).fit(X, y, bias=bias)  # second batch: 1 sample
    assert clf.history[-1]["batches"][-1]["end_perp"] == 0.0


# ------------------------------------------------------------------ hooks never outlive a fit
def _hooks_left(module):
    return [(name, len(m._forward_hooks) + len(m._forward_pre_hooks))
            for name, m in module.named_modules()
            if m._forward_hooks or m._forward_pre_hooks]


class _RaiseOnCall(nn.CrossEntropyLoss):
    """Raises ``exc`` on the ``at``-th call."""

    def __init__(self, at=2, exc=RuntimeError):
        super().__init__()
        self.at, self.exc, self.calls = at, exc, 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc("boom")
        return super().forward(*args)


class _MLPRaisingForward(MLP):
    """Raises in the forward pass after the bottleneck on the 2nd call."""

    calls = 0

    def forward(self, X, bias=None):
        feats = self.body(X)
        type(self).calls += 1
        if type(self).calls == 2:
            raise RuntimeError("boom in forward")
        return self.head(feats)


@pytest.mark.parametrize("layer", [None, "module.body.1"])
def test_callback_removes_its_hook_when_the_loss_raises(bias_toy, layer):
    X, y, bias = bias_toy
    net = _callback_net(layer, criterion=_RaiseOnCall)
    with pytest.raises(RuntimeError, match="boom"):
        net.fit({"X": X, "bias": bias}, y)
    assert _hooks_left(net.module_) == []


@pytest.mark.parametrize("layer", [None, "module.body.1"])
def test_callback_removes_its_hook_when_the_forward_raises(bias_toy, layer):
    X, y, bias = bias_toy
    _MLPRaisingForward.calls = 0
    net = _callback_net(layer, module=_MLPRaisingForward)  # raises in IgnoreBiasInput's child
    with pytest.raises(RuntimeError, match="boom in forward"):
        net.fit({"X": X, "bias": bias}, y)
    assert _hooks_left(net.module_) == []


def test_callback_removes_its_hook_on_keyboard_interrupt(bias_toy):
    X, y, bias = bias_toy
    net = _callback_net(criterion=_RaiseOnCall, criterion__exc=KeyboardInterrupt)
    net.fit({"X": X, "bias": bias}, y)  # skorch ends training on Ctrl-C
    assert _hooks_left(net.module_) == []


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_endclassifier_removes_its_hook_when_fit_raises(bias_toy, exc):
    X, y, bias = bias_toy
    clf = make_end(criterion=_RaiseOnCall, criterion__exc=exc)
    # Ctrl-C propagates too (skorch alone would swallow it and return a half-trained net)
    with pytest.raises(exc):
        clf.fit(X, y, bias=bias)
    assert _hooks_left(clf.module_) == []
    assert "_hooked_capture" not in vars(clf)


# ------------------------------------------------------------------ clone and get_params
def test_regularizer_clone_after_use(bias_toy):
    X, y, bias = bias_toy
    reg = EnDRegularizer(layer="module.body.1", alpha=0.4, beta=0.6)
    net = NeuralNetClassifier(IgnoreBiasInput(MLP()), criterion=nn.CrossEntropyLoss,
                              callbacks=[("end", reg)], max_epochs=1, train_split=None,
                              verbose=0)
    net.fit({"X": X, "bias": bias}, y)
    assert reg.get_params() == {"layer": "module.body.1", "alpha": 0.4, "beta": 0.6,
                                "center": True, "perp_loss": "linear"}
    cloned = clone(reg)
    assert cloned.get_params() == reg.get_params()
    assert EnDRegularizer(**reg.get_params()).get_params() == reg.get_params()
    # a net that holds the used callback clones too (sklearn clones its parameters)
    assert clone(net).callbacks[0][1].get_params() == reg.get_params()
    pickle.loads(pickle.dumps(reg))


def test_endclassifier_clone_and_get_params_round_trip(bias_toy):
    X, y, bias = bias_toy
    clf = make_end(alpha=0.3, beta=0.2, layer="body.1", max_epochs=1,
               callbacks=[("extra", EnDRegularizer(alpha=0.0, beta=0.0))])
    torch.manual_seed(0)
    clf.fit(X, y, bias=bias)
    for other in (clone(clf), type(clf)(**clf.get_params(deep=False))):
        assert other.alpha == 0.3 and other.beta == 0.2 and other.layer == "body.1"
        assert not hasattr(other, "module_")
        torch.manual_seed(0)
        other.fit(X, y, bias=bias)
        assert np.allclose(other.predict_proba(X), clf.predict_proba(X), atol=1e-6)
    clf.set_params(**clf.get_params())


def test_endclassifier_that_ends_at_chance_level_warns_naming_alpha_and_beta(bias_toy):
    import warnings

    from skdebias.exceptions import ChanceLevelWarning

    X, y, bias = bias_toy
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChanceLevelWarning)
        make_end(alpha=0.1, beta=0.1).fit(X, y, bias=bias)  # learns the classes: no warning
    # lr 0: the network stays as initialised
    with pytest.warns(ChanceLevelWarning, match=r"EnDClassifier ends its training predicting "
                      r"0\.\d+ of 96 training samples correctly.*lower alpha \(now 1\.0\) or "
                      r"beta \(now 3\.0\), or train longer \(max_epochs, now 3\)"):
        make_end(lr=0.0).fit(X, y, bias=bias)
