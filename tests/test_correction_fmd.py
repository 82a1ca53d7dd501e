"""FastModelDebiaser (FMD): the Hessian and gradient algebra, debiasing on tabular data and
on colored digits."""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from torch import nn

from _nets import flip_last_feature
from skdebias._utils._runtime import limit_threads
from skdebias.correction import FastModelDebiaser, softmax_cross_entropy_hessian
from skdebias.correction import _fmd as fmd_module
from skdebias.correction._fmd import (
    _augment, _bias_and_gradient, _conjugate_gradient, _HessianBuilder, _HessianOperator,
    _loss_gradients)
from skdebias.exceptions import ConfidenceOnlyWarning
from skdebias.metrics import counterfactual_bias, counterfactual_flip_rate


@pytest.fixture(autouse=True)
def _one_thread(request):
    """Tiny networks run on one CPU thread (thread synchronisation would dominate); the
    colored-digits CNN keeps the session's threads."""
    if "colored_net" in request.fixturenames:
        yield
    else:
        with limit_threads(1):
            yield


# ------------------------------------------------------------------ exact algebra
def _ce_sum(theta_flat, F, y, K, with_bias=True):
    theta = theta_flat.reshape(K, -1)
    Fa = _augment(F) if with_bias else F
    return nn.functional.cross_entropy(Fa @ theta.T, y, reduction="sum")


@pytest.mark.parametrize("with_bias", [True, False])
def test_hessian_matches_autograd(with_bias):
    g = torch.Generator().manual_seed(0)
    n, d, K = 7, 4, 3
    F = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = torch.randn(K, d, generator=g, dtype=torch.float64)
    b = torch.randn(K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=g)
    theta = torch.cat([W, b[:, None]], 1) if with_bias else W
    ref = torch.autograd.functional.hessian(
        lambda t: _ce_sum(t, F, y, K, with_bias), theta.reshape(-1))
    H = softmax_cross_entropy_hessian(F, W, b if with_bias else None)
    assert H.shape == (K * (d + int(with_bias)),) * 2
    assert torch.allclose(H, ref, atol=1e-10)
    Hd = softmax_cross_entropy_hessian(F, W, b if with_bias else None, damping=0.1)
    assert torch.allclose(Hd - H, 0.1 * n * torch.eye(H.shape[0], dtype=H.dtype), atol=1e-12)


@pytest.mark.parametrize("max_products", [10**9, 0])  # precomputed products / Q^T Q fallback
def test_hessian_builder_matches_autograd_at_changing_parameters(max_products):
    g = torch.Generator().manual_seed(2)
    n, d, K = 9, 4, 3
    Fa = _augment(torch.randn(n, d, generator=g, dtype=torch.float64))
    y = torch.randint(0, K, (n,), generator=g)
    build = _HessianBuilder(Fa, K, damping=0.2, max_products=max_products)
    assert (build.Z is None) == (max_products == 0)
    for _ in range(2):  # the same builder at two parameter values
        theta = torch.randn(K, d + 1, generator=g, dtype=torch.float64)
        ref = torch.autograd.functional.hessian(
            lambda t: _ce_sum(t, Fa[:, :-1], y, K), theta.reshape(-1))
        ref += 0.2 * n * torch.eye(K * (d + 1), dtype=ref.dtype)
        assert torch.allclose(build(theta), ref, atol=1e-10)


def test_loss_and_bias_gradients_match_autograd():
    g = torch.Generator().manual_seed(1)
    n, d, K = 6, 3, 4
    F = _augment(torch.randn(n, d, generator=g, dtype=torch.float64))
    F_cf = _augment(torch.randn(n, d, generator=g, dtype=torch.float64))
    theta = torch.randn(K, d + 1, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (n,), generator=g)
    G = _loss_gradients(theta, F, y)
    for i in range(n):
        t = theta.clone().requires_grad_(True)
        nn.functional.cross_entropy((F[i:i + 1] @ t.T), y[i:i + 1]).backward()
        assert torch.allclose(G[i], t.grad.reshape(-1), atol=1e-12)
    B, grad_b = _bias_and_gradient(theta, F, F_cf, y)
    t = theta.clone().requires_grad_(True)
    rows = torch.arange(n)
    bias = (torch.softmax(F @ t.T, 1)[rows, y] - torch.softmax(F_cf @ t.T, 1)[rows, y]).abs().mean()
    bias.backward()
    assert B == pytest.approx(float(bias.detach()))
    assert torch.allclose(grad_b, t.grad.reshape(-1), atol=1e-12)


# ------------------------------------------------------------------ tiny tabular setting
class _Tabular(nn.Module):
    """2-d input net: the last input feature plays the bias attribute."""

    def __init__(self, n_in=4, n_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, 8), nn.Tanh())
        self.head = nn.Linear(8, n_classes)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.fixture
def tabular():
    torch.manual_seed(0)
    net = _Tabular()
    rng = np.random.RandomState(0)
    X = rng.randn(200, 4).astype(np.float32)
    X[:, -1] = np.abs(X[:, -1]) + 1.0
    y = rng.randint(0, 3, 200)
    return net, X, y


def test_fmd_lowers_bias_on_tabular(tabular):
    net, X, y = tabular
    before = copy.deepcopy(net.state_dict())
    fmd = FastModelDebiaser(net, damping=0.1, max_accuracy_drop=1.0, random_state=0)
    X_cf = flip_last_feature(X)
    fmd.fit(X, y, X_cf=X_cf)
    assert fmd.n_steps_ >= 1
    assert fmd.bias_after_ < fmd.bias_before_
    assert counterfactual_bias(fmd.module_, X, X_cf, y) < counterfactual_bias(net, X, X_cf, y)
    # only the head changed, and the caller's network did not
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    # (the corrected copy lives on fmd.device_, CUDA where present with device="auto")
    assert torch.equal(fmd.module_.body[0].weight.cpu(), net.body[0].weight)
    assert not torch.equal(fmd.module_.head.weight.cpu(), net.head.weight)


def test_fmd_untouched_when_bias_is_zero(tabular):
    net, X, y = tabular
    fmd = FastModelDebiaser(net, random_state=0).fit(X, y, X_cf=X.copy())
    assert fmd.bias_before_ == 0.0 and fmd.n_steps_ == 0
    for a, b in zip(fmd.module_.parameters(), net.parameters()):
        assert torch.equal(a.cpu(), b)
    # a network blind to the bias feature: bias zero although X_cf differs from X
    blind = copy.deepcopy(net)
    with torch.no_grad():
        blind.body[0].weight[:, -1] = 0.0
    fmd = FastModelDebiaser(blind, random_state=0).fit(X, y, X_cf=flip_last_feature(X))
    assert fmd.bias_before_ == pytest.approx(0.0, abs=1e-7) and fmd.n_steps_ == 0
    for a, b in zip(fmd.module_.parameters(), blind.parameters()):
        assert torch.equal(a.cpu(), b)


def test_fmd_restores_thread_setting(tabular):
    # the small-head algebra runs on one thread; the caller's setting must come back
    net, X, y = tabular
    with limit_threads(1):  # restores the session's setting afterwards
        torch.set_num_threads(2)
        FastModelDebiaser(net, random_state=0).fit(X, y, X_cf=flip_last_feature(X))
        assert torch.get_num_threads() == 2


def test_fmd_accuracy_guard(tabular):
    net, X, y = tabular
    fmd = FastModelDebiaser(net, max_accuracy_drop=0.0, random_state=0)
    fmd.fit(X, y, X_cf=flip_last_feature(X))
    assert fmd.accuracy_after_ >= fmd.accuracy_before_
    assert all(h["accuracy_val"] >= fmd.accuracy_before_ for h in fmd.history_ if h["accepted"])


def test_fmd_counterfactual_callable_and_y_cf(tabular):
    net, X, y = tabular
    a = FastModelDebiaser(net, counterfactual=flip_last_feature, random_state=0).fit(X, y)
    b = FastModelDebiaser(net, random_state=0).fit(X, y, X_cf=flip_last_feature(X), y_cf=y)
    assert np.allclose(a.predict_proba(X), b.predict_proba(X))
    assert a.predict(X).shape == (200,) and set(np.unique(a.predict(X))) <= {0, 1, 2}
    assert 0.0 <= a.score(X, y) <= 1.0


def test_fmd_skorch_net_input(tabular):
    from skorch import NeuralNetClassifier

    _, X, y = tabular
    torch.manual_seed(0)
    skorch_net = NeuralNetClassifier(_Tabular, criterion=nn.CrossEntropyLoss, max_epochs=3,
                                     lr=0.1, train_split=None, verbose=0).fit(X, y)
    w = skorch_net.module_.head.weight.detach().clone()
    fmd = FastModelDebiaser(skorch_net, damping=0.1, max_accuracy_drop=1.0, random_state=0)
    fmd.fit(X, y, X_cf=flip_last_feature(X))
    assert type(fmd.estimator_) is NeuralNetClassifier
    assert torch.equal(skorch_net.module_.head.weight, w)
    assert np.allclose(fmd.estimator_.predict_proba(X), fmd.predict_proba(X), atol=1e-6)


def test_fmd_errors(tabular):
    net, X, y = tabular
    with pytest.raises(ValueError, match="needs counterfactual pairs"):
        FastModelDebiaser(net).fit(X, y)
    with pytest.raises(ValueError, match="counterfactual set must match X"):
        FastModelDebiaser(net).fit(X, y, X_cf=X[:-3])
    with pytest.raises(ValueError, match="counterfactual set must match X"):
        FastModelDebiaser(net).fit(X, y, X_cf=X[:, :3])
    with pytest.raises(ValueError, match=r"class indices .* in \[0, 2\]"):
        FastModelDebiaser(net).fit(X, y + 5, X_cf=X)
    with pytest.raises(ValueError, match="y must be a 1-d array with 200"):
        FastModelDebiaser(net).fit(X, y[:-1], X_cf=X)
    with pytest.raises(ValueError, match="is a Tanh"):
        FastModelDebiaser(net, layer="body.1").fit(X, y, X_cf=X)
    with pytest.raises(ValueError, match="Unknown layer 'hed'"):
        FastModelDebiaser(net, layer="hed").fit(X, y, X_cf=X)
    with pytest.raises(ValueError, match="not the network's output"):
        FastModelDebiaser(nn.Sequential(net, nn.Tanh())).fit(X, y, X_cf=X)
    for bad in [dict(damping=-1), dict(step_size=0), dict(max_iter=0), dict(n_pairs=1),
                dict(max_accuracy_drop=1.5), dict(validation_fraction=1.0),
                dict(counterfactual="flip")]:
        with pytest.raises(ValueError, match=list(bad)[0]):
            FastModelDebiaser(net, **bad).fit(X, y, X_cf=X)


def test_fmd_clone_and_pickle(tabular):
    net, X, y = tabular
    fmd = FastModelDebiaser(net, damping=0.5, counterfactual=flip_last_feature, random_state=3)
    cloned = clone(fmd)
    assert cloned.get_params()["damping"] == 0.5 and cloned.random_state == 3
    fmd.fit(X, y)
    restored = pickle.loads(pickle.dumps(fmd))
    assert np.allclose(restored.predict_proba(X), fmd.predict_proba(X))
    assert np.allclose(restored.influence_on_bias(X[:20], y[:20]),
                       fmd.influence_on_bias(X[:20], y[:20]))


# ------------------------------------------------------------------ colored digits
def _biased_test_pairs(data):
    """(x, x_cf, y): biased test images and the same digits in another colour."""
    m = data.bias_test_biased != data.bias_test
    return data.X_test_biased[m], data.X_test[m], data.y_test[m]


def test_fmd_on_colored_digits(colored_data, colored_net):
    x, x_cf, yt = _biased_test_pairs(colored_data)
    w = colored_net.module_.classifier[2].weight.detach().clone()
    fmd = FastModelDebiaser(colored_net, n_pairs=300, random_state=0)
    # these features hold the colour and little of the digit: the bias falls because the
    # network grows less confident, while the colour still decides the class, and FMD says so
    with pytest.warns(ConfidenceOnlyWarning, match=r"max_accuracy_drop \(now 0.02\)"):
        fmd.fit(colored_data.X, colored_data.y, X_cf=colored_data.X_cf)
    assert fmd.flip_rate_before_ >= 0.9 and fmd.flip_rate_after_ >= 0.8 * fmd.flip_rate_before_
    assert fmd.confidence_after_ < fmd.confidence_before_ - 0.2
    assert counterfactual_flip_rate(fmd.estimator_, x, x_cf) >= 0.8 * counterfactual_flip_rate(
        colored_net, x, x_cf)
    assert fmd.layer_ == "classifier.2"
    assert torch.equal(colored_net.module_.classifier[2].weight, w)
    assert fmd.n_steps_ >= 1 and fmd.bias_after_ < fmd.bias_before_ - 0.1
    before = counterfactual_bias(colored_net, x, x_cf, yt)
    after = counterfactual_bias(fmd.estimator_, x, x_cf, yt)
    assert after < before - 0.1
    acc_before = np.mean(colored_net.predict(colored_data.X_test_biased) == colored_data.y_test)
    acc_after = fmd.score(colored_data.X_test_biased, colored_data.y_test)
    assert acc_after >= acc_before - 0.05
    assert fmd.fit_time_ < 10.0
    # identification: bias-aligned training samples push the bias up, conflicting ones down
    # (every bias-conflicting training sample plus 300 aligned ones keeps the test fast)
    aligned_idx = np.flatnonzero(colored_data.concept == 1)[:300]
    idx = np.concatenate([aligned_idx, np.flatnonzero(colored_data.concept == 0)])
    scores = fmd.influence_on_bias(colored_data.X[idx], colored_data.y[idx])
    assert scores.shape == (len(idx),) and np.all(np.isfinite(scores))
    aligned = colored_data.concept[idx] == 1
    assert scores[aligned].mean() > scores[~aligned].mean()


def _shortcut_pairs(n=400, seed=0):
    """Two classes with a noisy class signal in 3 features and a bias feature that agrees with
    the class; the head trusts the bias feature. Counterfactuals flip the bias feature."""
    rng = np.random.RandomState(seed)
    y = rng.randint(0, 2, n)
    sign = (2 * y - 1).astype(np.float32)
    X = np.c_[sign[:, None] + rng.randn(n, 3), sign].astype(np.float32)
    X_cf = X.copy()
    X_cf[:, -1] *= -1
    net = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[-0.3, -0.3, -0.3, -4.0], [0.3, 0.3, 0.3, 4.0]]))
        net[0].bias.zero_()
    return net, X, X_cf, y


def test_fmd_changing_the_decisions_does_not_warn(recwarn):
    net, X, X_cf, y = _shortcut_pairs()
    fmd = FastModelDebiaser(net, max_accuracy_drop=0.05, random_state=0).fit(X, y, X_cf=X_cf)
    assert not [w for w in recwarn if issubclass(w.category, ConfidenceOnlyWarning)]
    assert fmd.flip_rate_before_ == 1.0 and fmd.flip_rate_after_ < 0.5
    assert fmd.bias_after_ < 0.5 * fmd.bias_before_
    assert counterfactual_flip_rate(fmd.estimator_, X, X_cf) < 0.5


def test_fmd_warns_when_the_features_carry_only_the_bias():
    net, X, X_cf, y = _shortcut_pairs()
    X[:, :3] = np.random.RandomState(1).randn(len(X), 3)  # no class signal left
    X_cf[:, :3] = X[:, :3]
    with torch.no_grad():
        net[0].weight[:, :3] = 0.0
    with pytest.warns(ConfidenceOnlyWarning) as record:
        fmd = FastModelDebiaser(net, random_state=0).fit(X, y, X_cf=X_cf)
    assert record[0].filename == __file__  # points at the caller's line
    assert fmd.bias_after_ < 0.6 * fmd.bias_before_
    assert fmd.flip_rate_after_ > 0.9 and fmd.confidence_after_ < fmd.confidence_before_


def test_fmd_warns_when_only_the_confidence_fell():
    fmd = FastModelDebiaser(nn.Sequential(nn.Linear(4, 2)), max_accuracy_drop=0.05)
    # bias down 60 % (or 8 %), with the flip rate and confidence after as given
    for bias_after, flip_after, conf_after, warns in [
            (0.2, 0.9, 0.5, True), (0.2, 0.6, 0.5, False), (0.2, 0.9, 0.99, False),
            (0.46, 1.0, 0.5, False)]:
        fmd.bias_before_, fmd.bias_after_ = 0.5, bias_after
        fmd.flip_rate_before_, fmd.flip_rate_after_ = 1.0, flip_after
        fmd.confidence_before_, fmd.confidence_after_ = 0.98, conf_after
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fmd._check_confidence_only()
        assert [w.category for w in caught] == ([ConfidenceOnlyWarning] if warns else [])
    fmd.bias_after_, fmd.flip_rate_after_, fmd.confidence_after_ = 0.2, 0.9, 0.5
    with pytest.warns(ConfidenceOnlyWarning, match=r"by 60% \(0.500 -> 0.200\).*0.98 -> 0.50.*"
                                                   r"on 90% of those pairs \(100% before\)"):
        fmd._check_confidence_only()


# ------------------------------------------------------------------ Hessian-free (cg) solver
def _random_layer(seed, n=40, d=6, K=5):
    g = torch.Generator().manual_seed(seed)
    Fa = _augment(torch.randn(n, d, generator=g, dtype=torch.float64))
    theta = torch.randn(K, d + 1, generator=g, dtype=torch.float64)
    return g, Fa, theta


@pytest.mark.parametrize("damping", [1.0, 0.1, 0.0])
def test_hessian_vector_product_matches_exact_hessian(damping):
    g, Fa, theta = _random_layer(3)
    H = softmax_cross_entropy_hessian(Fa[:, :-1], theta[:, :-1], theta[:, -1], damping=damping)
    hvp = _HessianOperator(Fa, damping).at(theta)
    for _ in range(3):
        V = torch.randn(theta.shape, generator=g, dtype=torch.float64)
        assert torch.allclose(hvp(V).reshape(-1), H @ V.reshape(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("damping", [1.0, 0.1, 0.0])
def test_conjugate_gradient_matches_exact_solve(seed, damping):
    g, Fa, theta = _random_layer(seed)
    H = _HessianBuilder(Fa, theta.shape[0], damping)(theta)
    b = torch.randn(theta.shape, generator=g, dtype=torch.float64)
    b -= b.mean(dim=0)  # as every loss / bias gradient: orthogonal to a shift of all logits
    ref = torch.linalg.lstsq(H, b.reshape(-1, 1)).solution.reshape(theta.shape)
    hvp = _HessianOperator(Fa, damping).at(theta)
    x, n_iter = _conjugate_gradient(hvp, b, tol=1e-6, max_iter=500)
    assert 0 < n_iter < 500
    assert float((x - ref).norm() / ref.norm()) < 1e-4
    # a warm start at the solution needs no product beyond the residual check
    x2, n_iter2 = _conjugate_gradient(hvp, b, x0=x, tol=1e-6)
    assert n_iter2 == 0 and torch.equal(x2, x)
    zero, n_zero = _conjugate_gradient(hvp, torch.zeros_like(b))
    assert n_zero == 0 and not torch.any(zero)


@pytest.mark.parametrize("damping", [1.0, 0.1])
def test_fmd_cg_reaches_the_bias_of_the_exact_solver(tabular, damping):
    net, X, y = tabular
    X_cf = flip_last_feature(X)
    fits = {solver: FastModelDebiaser(net, solver=solver, damping=damping, max_accuracy_drop=1.0,
                                      random_state=0).fit(X, y, X_cf=X_cf)
            for solver in ["exact", "cg"]}
    exact, cg = fits["exact"], fits["cg"]
    assert exact.solver_ == "exact" and exact.n_cg_iter_ == 0
    assert cg.solver_ == "cg" and cg.n_cg_iter_ > 0
    assert cg.bias_before_ == exact.bias_before_
    assert cg.n_steps_ >= 1 and cg.bias_after_ < cg.bias_before_
    assert abs(cg.bias_after_ - exact.bias_after_) <= 0.1 * exact.bias_after_
    assert np.allclose(cg.influence_on_bias(X[:20], y[:20]),
                       exact.influence_on_bias(X[:20], y[:20]), rtol=1e-3, atol=1e-6)


def test_fmd_cg_on_colored_digits(colored_data, colored_net):
    kw = dict(n_pairs=300, random_state=0)
    with pytest.warns(ConfidenceOnlyWarning):
        exact = FastModelDebiaser(colored_net, solver="exact", **kw).fit(
            colored_data.X, colored_data.y, X_cf=colored_data.X_cf)
    with pytest.warns(ConfidenceOnlyWarning):
        cg = FastModelDebiaser(colored_net, solver="cg", **kw).fit(
            colored_data.X, colored_data.y, X_cf=colored_data.X_cf)
    assert cg.n_steps_ >= 1 and cg.bias_after_ < cg.bias_before_ - 0.1
    assert abs(cg.bias_after_ - exact.bias_after_) <= 0.1 * exact.bias_after_


def test_fmd_auto_solver_picks_cg_above_the_hessian_limit(tabular, monkeypatch):
    net, X, y = tabular
    X_cf = flip_last_feature(X)
    size = 3 * (8 + 1)  # the tabular head
    assert FastModelDebiaser(net, random_state=0).fit(X, y, X_cf=X_cf).solver_ == "exact"
    monkeypatch.setattr(fmd_module, "MAX_HESSIAN_SIZE", size - 1)
    fmd = FastModelDebiaser(net, random_state=0).fit(X, y, X_cf=X_cf)
    assert fmd.solver_ == "cg" and fmd.n_cg_iter_ > 0
    with pytest.raises(ValueError, match="solver='cg'"):
        FastModelDebiaser(net, solver="exact").fit(X, y, X_cf=X_cf)
    monkeypatch.setattr(fmd_module, "MAX_HESSIAN_SIZE", size)
    assert FastModelDebiaser(net, random_state=0).fit(X, y, X_cf=X_cf).solver_ == "exact"


def test_fmd_unlearns_a_head_too_large_for_the_exact_hessian():
    # 200 -> 100: 20,100 parameters, above the exact limit of 12,000
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 200), nn.Tanh(), nn.Linear(200, 100))
    rng = np.random.RandomState(0)
    X = rng.randn(300, 4).astype(np.float32)
    X[:, -1] = np.abs(X[:, -1]) + 1.0
    y = rng.randint(0, 100, 300)
    fmd = FastModelDebiaser(net, damping=0.1, max_accuracy_drop=1.0, random_state=0)
    fmd.fit(X, y, X_cf=flip_last_feature(X))
    assert fmd.solver_ == "cg"
    assert fmd.n_steps_ >= 1 and fmd.bias_after_ < fmd.bias_before_


@pytest.mark.parametrize("bad", [dict(solver="newton"), dict(solver=None), dict(solver="CG"),
                                 dict(cg_tol=0.0), dict(cg_tol=float("nan")),
                                 dict(cg_max_iter=0), dict(cg_max_iter=2.5)])
def test_fmd_solver_parameter_errors(tabular, bad):
    net, X, y = tabular
    with pytest.raises(ValueError, match=list(bad)[0]):
        FastModelDebiaser(net, **bad).fit(X, y, X_cf=X)
