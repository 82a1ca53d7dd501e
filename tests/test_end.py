"""EnD regulariser, EnDClassifier and the group-balanced reweighting baseline."""

import pickle

import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from skorch import NeuralNetClassifier
from skorch.helper import SliceDict
from torch import nn

from skdebias._torch import limit_threads
from skdebias.correction import (
    EnDClassifier,
    EnDRegularizer,
    GroupBalancedClassifier,
    IgnoreBiasInput,
    end_terms,
    group_balanced_weights,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every model here is tiny: one CPU thread avoids thread-synchronisation overhead."""
    with limit_threads(1):
        yield


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
    assert float(r_perp) == 0.0 and float(r_par) == 0.0
    r_perp, r_par = end_terms(f, [0, 0, 1], [0, 1, 1])
    (r_perp + r_par).backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_end_terms_spatial_features_are_flattened():
    f = torch.rand(4, 2, 3, 3)
    a = end_terms(f, [0, 0, 1, 1], [0, 1, 0, 1])
    b = end_terms(f.reshape(4, -1), [0, 0, 1, 1], [0, 1, 0, 1])
    assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


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
    r_perp, r_par = end_terms(feats, y, bias)
    penalty = reg.penalty(store[-1], y, bias).detach()
    assert float(penalty) == pytest.approx(float(2 * r_perp + 0.5 * r_par))
    with pytest.raises(ValueError, match="alpha must be"):
        EnDRegularizer(alpha=-1).penalty(feats, y, bias)


# ------------------------------------------------------------------ EnDClassifier
class _MLP(nn.Module):
    def __init__(self, n_in=6, n_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, 16), nn.ReLU())
        self.head = nn.Linear(16, n_classes)

    def forward(self, X):
        return self.head(self.body(X))


@pytest.fixture
def toy():
    rng = np.random.RandomState(0)
    n = 96
    y = rng.randint(0, 3, n)
    bias = np.where(rng.rand(n) < 0.8, y, rng.randint(0, 3, n))
    X = rng.randn(n, 6).astype(np.float32)
    X[:, 0] += 2.0 * y
    X[:, 1] += 3.0 * bias  # the spurious feature
    return X, y.astype(np.int64), bias.astype(np.int64)


def _end(**kw):
    params = dict(module=_MLP, optimizer=torch.optim.Adam, lr=1e-2, max_epochs=3, batch_size=32,
                  train_split=None, verbose=0, device="cpu")
    params.update(kw)
    return EnDClassifier(**params)


def test_endclassifier_fits_and_logs_terms(toy):
    X, y, bias = toy
    torch.manual_seed(0)
    clf = _end(alpha=1.0, beta=1.0).fit(X, y, bias=bias)
    assert clf.predict(X).shape == (len(y),)
    assert clf.predict_proba(X).shape == (len(y), 3)
    batch = clf.history[-1]["batches"][0]
    assert {"end_perp", "end_par"} <= set(batch)


def test_endclassifier_loss_is_ce_plus_penalty(toy):
    X, y, bias = toy
    torch.manual_seed(0)
    clf = _end(alpha=0.7, beta=1.3, max_epochs=1).fit(X, y, bias=bias)
    Xt, yt, bt = torch.as_tensor(X[:16]), torch.as_tensor(y[:16]), torch.as_tensor(bias[:16])
    with clf._capture():
        y_pred = clf.infer({"X": Xt, "bias": bt})
        loss = clf.get_loss(y_pred, yt, X={"X": Xt, "bias": bt}, training=False)
    feats = clf.module_.body(Xt)
    r_perp, r_par = end_terms(feats, yt, bt)
    expected = nn.functional.cross_entropy(clf.module_(Xt), yt) + 0.7 * r_perp + 1.3 * r_par
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_endclassifier_changes_training(toy):
    X, y, bias = toy
    torch.manual_seed(0)
    plain = _end(alpha=0.0, beta=0.0).fit(X, y, bias=bias)
    torch.manual_seed(0)
    reg = _end(alpha=5.0, beta=5.0).fit(X, y, bias=bias)
    w0 = plain.module_.head.weight.detach()
    w1 = reg.module_.head.weight.detach()
    assert not torch.allclose(w0, w1)
    # the regularised run ends with a lower disentangling term than the plain one
    last = lambda net: np.mean([b["end_perp"] for b in net.history[-1]["batches"]])  # noqa: E731
    assert last(reg) < last(plain)


def test_endclassifier_dict_and_slicedict_inputs(toy):
    X, y, bias = toy
    torch.manual_seed(0)
    a = _end(max_epochs=1).fit(X, y, bias=bias)
    torch.manual_seed(0)
    b = _end(max_epochs=1).fit({"X": X, "bias": bias}, y)
    torch.manual_seed(0)
    c = _end(max_epochs=1).fit(SliceDict(X=X, bias=bias), y)
    for other in (b, c):
        assert np.allclose(a.predict_proba(X), other.predict_proba(X), atol=1e-6)


def test_endclassifier_missing_or_bad_bias(toy):
    X, y, bias = toy
    with pytest.raises(ValueError, match="needs bias labels"):
        _end().fit(X, y)
    with pytest.raises(ValueError, match="one label per sample"):
        _end().fit(X, y, bias=bias[:-1])
    with pytest.raises(ValueError, match="integer group labels"):
        _end().fit(X, y, bias=bias + 0.5)
    with pytest.raises(ValueError, match="both as a key"):
        _end().fit({"X": X, "bias": bias}, y, bias=bias)
    with pytest.raises(ValueError, match="beta must be"):
        _end(beta=-1.0).fit(X, y, bias=bias)


def test_endclassifier_clone_params_pickle(toy):
    X, y, bias = toy
    clf = _end(alpha=0.3, beta=0.2, layer="body.1")
    params = clf.get_params()
    assert params["alpha"] == 0.3 and params["beta"] == 0.2 and params["layer"] == "body.1"
    cloned = clone(clf)
    assert cloned.alpha == 0.3 and cloned.layer == "body.1"
    torch.manual_seed(0)
    clf.fit(X, y, bias=bias)
    restored = pickle.loads(pickle.dumps(clf))
    assert np.allclose(restored.predict_proba(X), clf.predict_proba(X))
    assert "_end_store" not in clf.get_params()


def test_endclassifier_unknown_layer(toy):
    X, y, bias = toy
    with pytest.raises(ValueError, match="Unknown layer 'bdy.1'"):
        _end(layer="bdy.1").fit(X, y, bias=bias)


def test_endclassifier_metadata_routing(toy):
    X, y, bias = toy
    with sklearn.config_context(enable_metadata_routing=True):
        clf = _end(max_epochs=1).set_fit_request(bias=True)
        search = GridSearchCV(clf, {"alpha": [0.0, 1.0]}, cv=2, scoring="accuracy")
        search.fit(X, y, bias=bias)
        assert set(search.cv_results_["param_alpha"]) == {0.0, 1.0}
        assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))


# ------------------------------------------------------------------ callback on a plain net
@pytest.mark.parametrize("layer, plain_layer", [(None, None), ("body.1", "module.body.1")])
def test_callback_equals_loss_term(toy, layer, plain_layer):
    """The gradient injected by the callback equals adding the penalty to the loss."""
    X, y, bias = toy
    torch.manual_seed(0)
    base = _MLP()
    common = dict(optimizer=torch.optim.SGD, lr=0.5, max_epochs=1, batch_size=len(y),
                  train_split=None, verbose=0, device="cpu", iterator_train__shuffle=False)
    a = EnDClassifier(_MLP, alpha=2.0, beta=3.0, layer=layer, module__n_in=6, **common)
    a.initialize()
    a.module_.load_state_dict(base.state_dict())
    a.partial_fit(X, y, bias=bias)
    b = NeuralNetClassifier(IgnoreBiasInput(_MLP()), criterion=nn.CrossEntropyLoss,
                            callbacks=[EnDRegularizer(layer=plain_layer, alpha=2.0, beta=3.0)],
                            **common)
    b.initialize()
    b.module_.module.load_state_dict(base.state_dict())
    b.partial_fit({"X": X, "bias": bias}, y)
    for pa, pb in zip(a.module_.parameters(), b.module_.module.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    assert not torch.allclose(a.module_.head.weight, base.head.weight)
    assert "end_perp" in b.history[-1]["batches"][0]


def test_callback_needs_bias_in_data(toy):
    X, y, _ = toy
    net = NeuralNetClassifier(IgnoreBiasInput(_MLP()), criterion=nn.CrossEntropyLoss,
                              callbacks=[EnDRegularizer()], max_epochs=1, train_split=None,
                              verbose=0)
    with pytest.raises(ValueError, match="needs bias labels in every batch"):
        net.fit(X, y)


# ------------------------------------------------------------------ reweighting
def test_group_balanced_weights():
    y = np.array([0, 0, 0, 0, 1, 1])
    bias = np.array([0, 0, 0, 1, 1, 1])
    w = group_balanced_weights(y, bias)
    assert w.dtype == np.float32 and w.mean() == pytest.approx(1.0)
    totals = [w[(y == c) & (bias == b)].sum() for c, b in [(0, 0), (0, 1), (1, 1)]]
    assert np.allclose(totals, totals[0])
    assert w[3] == pytest.approx(3 * w[0])
    with pytest.raises(ValueError, match="same length"):
        group_balanced_weights(y, bias[:-1])


def test_group_balanced_classifier(toy):
    X, y, bias = toy
    params = dict(optimizer=torch.optim.Adam, lr=1e-2, max_epochs=2, batch_size=32,
                  train_split=None, verbose=0)
    torch.manual_seed(0)
    clf = GroupBalancedClassifier(_MLP, **params).fit(X, y, bias=bias)
    assert np.allclose(clf.sample_weight_, group_balanced_weights(y, bias))
    assert clf.predict(X).shape == (len(y),)
    # uniform weights give the same model as plain cross-entropy training
    torch.manual_seed(0)
    ones = GroupBalancedClassifier(_MLP, **params).fit(X, y, sample_weight=np.ones(len(y)))
    torch.manual_seed(0)
    plain = NeuralNetClassifier(_MLP, criterion=nn.CrossEntropyLoss, **params).fit(X, y)
    assert np.allclose(ones.predict_proba(X), plain.predict_proba(X), atol=1e-5)
    with pytest.raises(ValueError, match="needs bias labels"):
        GroupBalancedClassifier(_MLP, **params).fit(X, y)
    with pytest.raises(ValueError, match="not both"):
        GroupBalancedClassifier(_MLP, **params).fit(X, y, bias=bias, sample_weight=np.ones(len(y)))
    with pytest.raises(ValueError, match="finite, >= 0"):
        GroupBalancedClassifier(_MLP, **params).fit(X, y, sample_weight=-np.ones(len(y)))
