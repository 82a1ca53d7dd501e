"""In-place layers, refits and edge cases across the shared helpers and metrics.

Networks with ``ReLU(inplace=True)`` (VGG, ResNet) must neither change the caller's data nor
the measured gradients; refits must not keep stale fitted state; metrics must not depend on the
order of tied samples.
"""

import numpy as np
import pytest
import torch
from torch import nn

from skdebias import ActivationExtractor, CAVEstimator
from skdebias.attribution import attribute
from skdebias.metrics import (
    DebiasScorer,
    artifact_relevance,
    concept_sensitivity,
    counterfactual_bias,
    spurious_gap,
)

CAV = [1.0, -1.0, 0.5, 0.2]


def _net(inplace_after=False, inplace_first=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.ReLU(inplace=inplace_first), nn.Conv2d(1, 4, 3),
                         nn.ReLU(inplace=inplace_after), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.fixture
def X():
    return np.random.RandomState(0).randn(6, 1, 8, 8).astype("float32")


def test_gradient_at_the_layer_despite_inplace_relu_after_it(X):
    reference = concept_sensitivity(_net(), X, "1", CAV, target=0)
    net = _net(inplace_after=True)
    trainable = concept_sensitivity(net, X, "1", CAV, target=0)
    for p in net.parameters():
        p.requires_grad_(False)
    frozen = concept_sensitivity(net, X, "1", CAV, target=0)
    for got in (trainable, frozen):
        assert got["mean_abs"] == pytest.approx(reference["mean_abs"], rel=1e-6)
        assert got["tcav"] == reference["tcav"]


def test_rr_penalty_is_the_same_with_an_inplace_relu_after_the_layer(X):
    from skdebias.correction import GradientPenaltyCorrector

    y = np.array([0, 1, 2, 0, 1, 2])
    # train_layers="all": the layer's output is already part of the graph (no leaf copy)
    kw = dict(layer="1", cav=CAV, penalty=1.0, max_epochs=1, lr=1e-2, batch_size=6,
              train_layers="all", device="cpu", random_state=0)
    plain = GradientPenaltyCorrector(_net(), **kw).fit(X, y)
    inplace = GradientPenaltyCorrector(_net(inplace_after=True), **kw).fit(X, y)
    assert inplace.history_[-1, "train_rr"] == pytest.approx(plain.history_[-1, "train_rr"],
                                                              rel=1e-5)
    assert plain.history_[-1, "train_rr"] > 0


def test_inplace_first_layer_never_writes_into_the_callers_data(X):
    before = X.copy()
    ActivationExtractor(_net(inplace_first=True), "1", device="cpu").fit_transform(X)
    concept_sensitivity(_net(inplace_first=True), X, "1", CAV)
    counterfactual_bias(_net(inplace_first=True), X, X.copy(), [0, 1, 0, 1, 0, 1])
    attribute(_net(inplace_first=True), X, method="gradient_x_input", device="cpu")
    np.testing.assert_array_equal(X, before)
    Xt = torch.as_tensor(before.copy())
    ActivationExtractor(_net(inplace_first=True), "1", device="cpu").fit_transform(Xt)
    np.testing.assert_array_equal(Xt.numpy(), before)


def test_attribution_multiplies_the_original_input(X):
    # first layer in-place ReLU: the gradient is zero where the input is negative, and
    # gradient x input must use the unclamped input (so it is zero there too, but positive
    # inputs keep their value); compare with a network without the in-place op
    net_inplace = _net(inplace_first=True)
    net_plain = _net(inplace_first=False)
    R_inplace = attribute(net_inplace, X, target=0, method="gradient_x_input", device="cpu")
    R_plain = attribute(net_plain, X, target=0, method="gradient_x_input", device="cpu")
    np.testing.assert_allclose(R_inplace, R_plain, rtol=1e-5, atol=1e-7)
    R_pred = attribute(net_inplace, X, target=None, method="gradient_x_input", device="cpu")
    R_pred_plain = attribute(net_plain, X, target=None, method="gradient_x_input", device="cpu")
    np.testing.assert_allclose(R_pred, R_pred_plain, rtol=1e-5, atol=1e-7)


def test_attribute_and_artifact_relevance_refuse_empty_input():
    empty = np.zeros((0, 1, 8, 8), dtype="float32")
    with pytest.raises(ValueError, match="X is empty: attribute"):
        attribute(_net(), empty, device="cpu")
    with pytest.raises(ValueError, match="X is empty"):
        artifact_relevance(_net(), empty, np.zeros((8, 8)), method="gradient", device="cpu")


def test_extractor_refit_drops_n_features_in():
    vec = nn.Sequential(nn.Linear(5, 3))
    ext = ActivationExtractor(vec, "0", device="cpu").fit(np.ones((4, 5), dtype="float32"))
    assert ext.n_features_in_ == 5
    ext.set_params(estimator=_net(), layer="1").fit(np.ones((2, 1, 8, 8), dtype="float32"))
    assert not hasattr(ext, "n_features_in_")
    assert ext.input_shape_ == (1, 8, 8)


@pytest.mark.parametrize("method", ["svm", "logistic", "ridge", "lasso"])
def test_cav_class_weight_dict_is_keyed_by_the_users_labels(method):
    rng = np.random.RandomState(0)
    A = rng.randn(60, 4)
    t01 = (A[:, 0] + 0.5 * rng.randn(60) > 0).astype(int)
    kw = dict(method=method, alpha=0.05, random_state=0)
    ref = CAVEstimator(class_weight={0: 1.0, 1: 5.0}, **kw).fit(A, t01)
    got = CAVEstimator(class_weight={1: 1.0, 2: 5.0}, **kw).fit(A, t01 + 1)
    np.testing.assert_allclose(got.cav_, ref.cav_, rtol=1e-6, atol=1e-9)
    flat = CAVEstimator(class_weight=None, **kw).fit(A, t01)
    assert not np.allclose(flat.cav_, ref.cav_)  # the weights matter
    with pytest.raises(ValueError, match=r"no weight for the concept label\(s\) \[2\]"):
        CAVEstimator(class_weight={0: 1.0, 1: 5.0}, **kw).fit(A, t01 + 1)


def test_spurious_gap_does_not_depend_on_the_order_of_ties():
    y = np.zeros(6, dtype=int)
    pred = np.array([0, 1, 0, 1, 0, 1])
    flat = np.zeros(6)
    assert spurious_gap(y, pred, flat, k=2) == 0.0
    assert spurious_gap(y[::-1], pred[::-1], flat, k=2) == 0.0
    # a tie at the boundary: the tied samples share the places left
    s = np.array([0.0, 1.0, 1.0, 1.0, 2.0, 3.0])
    correct_low = np.array([0, 0, 1, 1, 1, 1])  # right on samples 0 and 1
    gap = spurious_gap(y, correct_low, s, k=2)
    assert gap == pytest.approx(0.0 - (1 + 1 / 3) / 2)
    perm = np.array([5, 3, 1, 4, 2, 0])
    assert spurious_gap(y[perm], correct_low[perm], s[perm], k=2) == pytest.approx(gap)
    # no ties: the plain definition
    assert spurious_gap(y, pred, np.arange(6.0), k=2) == 0.0
    assert spurious_gap(y, np.array([1, 1, 0, 0, 0, 0]), np.arange(6.0), k=2) == 1.0


def test_spurious_gap_names_infinite_values():
    y = np.zeros(4, dtype=int)
    with pytest.raises(ValueError, match="NaN \\(or infinite\\)"):
        spurious_gap(y, y, np.array([0.0, 1.0, np.inf, 2.0]), k=1)


def test_debias_scorer_without_reference_sensitivity(X):
    net = _net()
    y = np.array([0, 1, 2, 0, 1, 2])
    s = concept_sensitivity(net, X, "1", CAV, target=0)["mean_abs"]
    assert s > 0

    class Scored:  # anything with predict and a network in module_
        module_ = net

        def predict(self, X_):
            with torch.no_grad():
                return net(torch.as_tensor(X_)).argmax(1).numpy()

    def score(reference):
        return DebiasScorer(layer="1", cav=CAV, reference=reference, sensitivity_weight=1.0,
                            target=0)(Scored(), X, y)

    assert score(0.0) == 0.0  # sensitivity grew from zero: nothing was removed
    assert score(s / 2) == 0.0
    assert score(10 * s) == pytest.approx(0.9)


def test_counterfactual_bias_accepts_float_and_skorch_labels(X):
    from skorch import NeuralNetClassifier

    net = _net()
    y_int = np.array([0, 1, 2, 0, 1, 2])
    X_cf = X[::-1].copy()
    ref = counterfactual_bias(net, X, X_cf, y_int)
    assert counterfactual_bias(net, X, X_cf, y_int.astype(float)) == pytest.approx(ref)
    with pytest.raises(ValueError, match=r"labels \[3\] that are not among the network's"):
        counterfactual_bias(net, X, X_cf, np.array([0, 1, 2, 3, 1, 2]))
    # a fitted skorch classifier with string classes: labels are mapped to output columns
    clf = NeuralNetClassifier(_net(), criterion=nn.CrossEntropyLoss, max_epochs=1,
                              train_split=None, lr=0.0, device="cpu", classes=["a", "b", "c"])
    clf.fit(X, y_int)
    labels = np.array(["a", "b", "c", "a", "b", "c"])
    assert counterfactual_bias(clf, X, X_cf, labels) == pytest.approx(
        counterfactual_bias(clf.module_, X, X_cf, y_int), rel=1e-5)


# ------------------------------------------------------------------ correctors
def _container_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),          # "0.0", "0.1": CAV layer
                      nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),  # "0.2", "0.3": after it
                      nn.ReLU(), nn.Dropout(0.5)),                       # "0.4", "0.5"
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


@pytest.mark.parametrize("kind", ["rr", "aclarc"])
def test_after_keeps_only_modules_up_to_the_layer_in_eval_mode(kind):
    """train_layers="after" in a container: BatchNorm and Dropout after the CAV layer train."""
    from skdebias.correction import ClassArtifactCompensator, GradientPenaltyCorrector

    rng = np.random.RandomState(0)
    X = rng.rand(32, 3, 8, 8).astype("float32")
    y, c = rng.randint(0, 10, 32), np.arange(32) % 2
    net = _container_net()
    seen = []
    net[0][3].register_forward_hook(
        lambda m, i, o: seen.append(m.training) if torch.is_grad_enabled() else None)
    kw = dict(layer="0.1", device="cpu", random_state=0, lr=1e-2, batch_size=8, max_epochs=1)
    est = (GradientPenaltyCorrector(net, **kw) if kind == "rr"
           else ClassArtifactCompensator(net, mode="augmentative", **kw)).fit(X, y, c)
    assert est.estimator_.eval_modules == ["0.0", "0.1"]
    assert est.trainable_params_[:2] == ["0.2.weight", "0.2.bias"]
    assert seen and all(seen)  # the copy's BatchNorm ran in training mode
    assert not torch.equal(est.module_.get_submodule("0.3").running_mean,
                           net[0][3].running_mean)


def test_warm_start_on_a_dataset_of_pairs():
    from torch.utils.data import TensorDataset

    from skdebias.correction import GradientPenaltyCorrector
    from skdebias.models import SmallCNN

    rng = np.random.RandomState(0)
    X = rng.rand(24, 3, 28, 28).astype("float32")
    y, c = rng.randint(0, 10, 24), np.arange(24) % 2
    ds = TensorDataset(torch.from_numpy(X), torch.from_numpy(y))
    rr = GradientPenaltyCorrector(SmallCNN(), layer="features.6", max_epochs=1, device="cpu",
                                  random_state=0, warm_start=True)
    rr.fit(ds, None, concept_labels=c)
    rr.fit(ds, None, concept_labels=c)
    assert len(rr.history_) == 2


def test_spray_cluster_errors_name_the_given_value():
    from skdebias.detection import SpectralRelevanceAnalysis
    from tests._nets import AnyWidth

    rng = np.random.RandomState(0)
    X = np.r_[rng.randn(15, 2) + 4, rng.randn(15, 2) - 4].astype("float32")
    y = np.zeros(30, dtype=int)
    spray = SpectralRelevanceAnalysis(AnyWidth(), method="gradient_x_input", n_clusters=2,
                                      n_neighbors=5, device="cpu", random_state=0).fit(X, y)
    for bad in (0.7, -1, 2, True):
        with pytest.raises(ValueError, match=rf"cluster \[{bad!r}\] does not exist"):
            spray.concept_labels_for(bad)


def test_head_finetuner_keeps_the_copys_flags_and_does_not_reseed_torch():
    from skdebias import SpuriosityRanker
    from skdebias.correction import SpuriosityHeadFinetuner
    from tests._nets import AnyWidth

    rng = np.random.RandomState(0)
    X = rng.randn(60, 2).astype("float32")
    y = rng.randint(0, 3, 60)
    net = AnyWidth()
    net.body.weight.requires_grad_(False)  # the caller froze part of the body

    def fit_then_draw(torch_seed):
        np.random.seed(0)
        torch.manual_seed(torch_seed)
        ft = SpuriosityHeadFinetuner(net, ranker=SpuriosityRanker(spurious_features=[0]), k=5,
                                     val_k=3, max_epochs=2, device="cpu").fit(X, y)
        return ft, torch.rand(3)

    ft, after_1 = fit_then_draw(1)
    _, after_2 = fit_then_draw(2)
    assert not ft.module_.body.weight.requires_grad
    assert ft.module_.head.weight.requires_grad
    # random_state=None draws from torch's global RNG but does not reseed it from numpy's
    assert not torch.equal(after_1, after_2)
