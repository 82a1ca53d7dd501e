"""Never silently wrong: a user's own skorch network, divergence, interrupts, failed refits,
odd input, and reproducible parallel searches. Each test pins one way a result used to be
wrong without a word."""

import warnings

import numpy as np
import pytest
import sklearn
import torch
from sklearn.model_selection import GridSearchCV, KFold
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback
from torch import nn

from skdebias import (
    ActivationExtractor,
    ClassArtifactCompensator,
    FastModelDebiaser,
    GradientPenaltyCorrector,
    SpuriosityHeadFinetuner,
)
from skdebias.exceptions import DivergenceError, UntrainedNetworkWarning
from skdebias.metrics import concept_sensitivity, counterfactual_bias
from skdebias.models import SmallCNN, make_classifier

LAYER = "features.1"


class SoftmaxNet(nn.Module):
    """Built the way skorch's defaults expect: the module ends in Softmax (criterion NLLLoss)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 14 * 14, 32), nn.ReLU(),
                                  nn.Linear(32, 10), nn.Softmax(dim=1))

    def forward(self, x):
        return self.head(self.features(x))


class CountEpochs(Callback):
    def initialize(self):
        self.epochs = 0
        return self

    def on_epoch_end(self, net, **kwargs):
        self.epochs += 1


@pytest.fixture(scope="module")
def data(artifact_data):
    d = artifact_data
    idx = np.random.RandomState(0).choice(len(d.y), 600, replace=False)
    return d.X[idx], d.y[idx], np.where(d.y[idx] == 0, d.concept[idx], -1)


@pytest.fixture(scope="module")
def softmax_net(data):
    """skorch's defaults (NLLLoss on a Softmax module) with the user's Adam and callback."""
    X, y, _ = data
    torch.manual_seed(0)
    net = NeuralNetClassifier(SoftmaxNet, max_epochs=6, lr=1e-2, optimizer=torch.optim.Adam,
                              optimizer__weight_decay=1e-5,
                              callbacks=[("count", CountEpochs())], train_split=None, verbose=0)
    return net.fit(X, y)


# ------------------------------------------------------------------ a user's skorch net
@pytest.mark.parametrize("make", [
    lambda net: GradientPenaltyCorrector(net, LAYER, penalty=1.0, max_epochs=0, device="cpu"),
    lambda net: ClassArtifactCompensator(net, LAYER, reference=0.0, cav=np.ones(8),
                                         device="cpu"),
    lambda net: ClassArtifactCompensator(net, LAYER, mode="augmentative", max_epochs=1,
                                         lr=1e-4, device="cpu", random_state=0),
], ids=["RR-ClArC", "P-ClArC", "A-ClArC"])
def test_softmax_network_probabilities_are_not_softmaxed_twice(softmax_net, data, make):
    X, y, c = data
    corrector = make(softmax_net).fit(X, y, concept_labels=c)
    assert corrector.output_ == "probabilities"
    proba = corrector.predict_proba(X[:50])
    if isinstance(corrector, GradientPenaltyCorrector):  # untrained: the user's own numbers
        np.testing.assert_allclose(proba, softmax_net.predict_proba(X[:50]), atol=1e-5)
    # a second softmax squeezes every row towards uniform (max 0.995 -> 0.23 before)
    assert proba.max(axis=1).mean() > 0.5
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(corrector.estimator_.predict_proba(X[:5]), proba[:5], atol=1e-5)


def test_user_optimizer_criterion_and_callbacks_are_kept(softmax_net, data):
    X, y, c = data
    rr = GradientPenaltyCorrector(softmax_net, LAYER, penalty=1.0, max_epochs=2, lr=1e-4,
                                  device="cpu", random_state=0).fit(X, y, concept_labels=c)
    net = rr.estimator_
    assert isinstance(net.optimizer_, torch.optim.Adam)
    assert net.optimizer_.defaults["weight_decay"] == 1e-5 and net.optimizer_.defaults["lr"] == 1e-4
    assert isinstance(net.criterion_, nn.NLLLoss)
    assert dict(net.callbacks_)["count"].epochs == 2  # the user's callback ran (on a copy)
    assert dict(softmax_net.callbacks_)["count"].epochs == 6
    # the corrector's own optimizer wins when given
    sgd = GradientPenaltyCorrector(softmax_net, LAYER, max_epochs=1, optimizer=torch.optim.SGD,
                                   device="cpu", random_state=0).fit(X, y, concept_labels=c)
    assert isinstance(sgd.estimator_.optimizer_, torch.optim.SGD)
    assert sgd.estimator_.optimizer_.defaults["momentum"] == 0.9
    # the loss is finite and in the network's output space (NLL of log-probabilities)
    assert np.isfinite(rr.history_[-1]["train_loss"]) and rr.history_[-1]["train_loss"] < 3


@pytest.mark.parametrize("make", [
    lambda net: FastModelDebiaser(net, n_pairs=100, random_state=0, device="cpu"),
    lambda net: SpuriosityHeadFinetuner(net, k=5, max_epochs=3, random_state=0, device="cpu"),
], ids=["FMD", "head fine-tuner"])
def test_last_layer_methods_take_a_softmax_network(softmax_net, data, make):
    X, y, _ = data
    est = make(softmax_net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(est, FastModelDebiaser):
            est.fit(X, y, X_cf=X[:, ::-1].copy())
        else:
            est.fit(X, y, spuriosity=np.random.RandomState(0).rand(len(y)))
    proba = est.predict_proba(X[:20])
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert proba.max(axis=1).mean() > 0.5


def test_metrics_detect_probability_outputs(softmax_net, data):
    X, y, _ = data
    X_cf = X[:50, ::-1].copy()
    p, p_cf = softmax_net.predict_proba(X[:50]), softmax_net.predict_proba(X_cf)
    rows = np.arange(50)
    expected = np.abs(p[rows, y[:50]] - p_cf[rows, y[:50]]).mean()
    # the bare module (Softmax at the end) gives the same bias as the skorch net
    assert counterfactual_bias(softmax_net.module_, X[:50], X_cf, y[:50]) == pytest.approx(
        expected, abs=1e-5)


# ------------------------------------------------------------------ divergence
@pytest.mark.parametrize("make", [
    lambda net: GradientPenaltyCorrector(net, "features.6", penalty=1.0, lr=1e8, max_epochs=2,
                                         max_grad_norm=None, device="cpu", random_state=0),
    lambda net: ClassArtifactCompensator(net, "features.6", mode="augmentative", lr=1e8,
                                         max_epochs=2, max_grad_norm=None, device="cpu",
                                         random_state=0),
], ids=["RR-ClArC", "A-ClArC"])
def test_a_diverging_fit_raises_naming_the_parameters(artifact_net, artifact_data, make):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    corrector = make(artifact_net)
    with pytest.raises(DivergenceError, match=r"lower lr \(now 1"):
        corrector.fit(d.X[:400], d.y[:400], concept_labels=c[:400])
    assert not hasattr(corrector, "estimator_")  # nothing half-fitted is left


def test_collapse_to_chance_is_caught_and_clipping_is_on_by_default(artifact_net, artifact_data):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    # measured: clipped at 100, SGD lr 1e-2 with penalty 1e7 ends at 0.076 test accuracy after
    # one epoch; the guard stops it instead of returning it as fitted
    rr = GradientPenaltyCorrector(artifact_net, "features.6", penalty=1e7, lr=1e-2, max_epochs=1,
                                  optimizer=torch.optim.SGD, device="cpu", random_state=0)
    assert rr.max_grad_norm == 100.0
    with pytest.raises(DivergenceError, match="collapsed"):
        rr.fit(d.X[:600], d.y[:600], concept_labels=c[:600])


@pytest.mark.parametrize("make", [
    lambda net: GradientPenaltyCorrector(net, "features.6", penalty=1.0, max_epochs=1,
                                         device="cpu", random_state=0),
    lambda net: ClassArtifactCompensator(net, "features.6", mode="augmentative", max_epochs=1,
                                         device="cpu", random_state=0),
], ids=["RR-ClArC", "A-ClArC"])
def test_an_untrained_network_to_correct_is_named_in_a_warning(artifact_net, artifact_data,
                                                                make):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    X, y, c = d.X[:300], d.y[:300], c[:300]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedNetworkWarning)
        make(artifact_net).fit(X, y, concept_labels=c)  # a trained network: no warning
    untrained = make_classifier(SmallCNN, max_epochs=1, lr=1e-9, device="cpu",
                                random_state=0).fit(X, y)
    corrector = make(untrained)
    with pytest.warns(UntrainedNetworkWarning,
                      match=r"network given to .* predicts 0\.\d+ of 300 training samples "
                            r"correctly.*max_epochs"):
        corrector.fit(X, y, concept_labels=c)
    # the same trained network with labels it was not trained on
    with pytest.warns(UntrainedNetworkWarning, match="labels it was trained on"):
        make(artifact_net).fit(X, (y + 1) % 10, concept_labels=c)


def test_grid_search_ranks_a_diverged_fit_last(artifact_net, artifact_data):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    est = GradientPenaltyCorrector(artifact_net, "features.6", penalty=1.0, max_epochs=1,
                                   max_grad_norm=None, device="cpu", random_state=0)
    search = GridSearchCV(est, {"lr": [1e-4, 1e8]}, cv=KFold(2), error_score=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        search.fit(d.X[:300], d.y[:300], concept_labels=c[:300])
    ranks = search.cv_results_["rank_test_score"]
    assert np.isnan(search.cv_results_["mean_test_score"][1]) and ranks[1] == 2
    assert search.best_params_ == {"lr": 1e-4}


# ------------------------------------------------------------------ interrupts and failed refits
class Interrupt(Callback):
    def on_epoch_end(self, net, **kwargs):
        raise KeyboardInterrupt


def test_keyboard_interrupt_propagates_and_leaves_nothing_fitted(artifact_net, data):
    X, y, c = data
    rr = GradientPenaltyCorrector(artifact_net, "features.6", max_epochs=3, callbacks=[Interrupt()],
                                  device="cpu", random_state=0)
    with pytest.raises(KeyboardInterrupt):
        rr.fit(X, y, concept_labels=c)
    assert not hasattr(rr, "estimator_") and not hasattr(rr, "cav_")


@pytest.mark.parametrize("name", ["fmd", "finetuner"])
def test_interrupt_in_last_layer_methods_leaves_nothing_fitted(artifact_net, data, monkeypatch,
                                                               name):
    X, y, _ = data
    if name == "fmd":
        est = FastModelDebiaser(artifact_net, n_pairs=50, device="cpu", random_state=0)
        target, args = "_unlearn", {"X_cf": X}
    else:
        est = SpuriosityHeadFinetuner(artifact_net, k=5, max_epochs=2, device="cpu")
        target, args = "_evaluate", {"spuriosity": np.zeros(len(y))}

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(est), target, interrupted)
    with pytest.raises(KeyboardInterrupt):
        est.fit(X, y, **args)
    assert not hasattr(est, "estimator_") and not hasattr(est, "input_shape_")


def test_a_failed_refit_keeps_the_previous_fit(artifact_net, data):
    X, y, _ = data
    fmd = FastModelDebiaser(artifact_net, n_pairs=50, device="cpu", random_state=0)
    fmd.fit(X, y, X_cf=X[..., ::-1])
    before = dict(fmd.__dict__)
    with pytest.raises(ValueError, match="X_cf"):
        fmd.fit(X[:, :, :20, :20], y, X_cf=X[:10])
    assert fmd.input_shape_ == before["input_shape_"]
    assert fmd.estimator_ is before["estimator_"] and fmd.bias_after_ == before["bias_after_"]


# ------------------------------------------------------------------ input
def test_uint8_images_are_scaled_with_a_warning(artifact_net, data):
    X = data[0][:20]
    X8 = np.round(X * 255).astype(np.uint8)
    ext = ActivationExtractor(artifact_net, "features.6", device="cpu")
    with pytest.warns(UserWarning, match="uint8 images; they are scaled from 0..255"):
        A8 = ext.fit_transform(X8)
    np.testing.assert_allclose(A8, ext.transform(X8.astype(np.float32) / 255), atol=1e-5)
    with pytest.raises(ValueError, match="X holds int64 images"):
        ext.fit(X8.astype(np.int64))


def test_negative_strides_and_byte_order_are_accepted(artifact_net, data):
    X = data[0][:10]
    ext = ActivationExtractor(artifact_net, "features.6", device="cpu").fit(X)
    flipped = X[..., ::-1]
    np.testing.assert_allclose(ext.transform(flipped), ext.transform(flipped.copy()), atol=1e-6)
    np.testing.assert_allclose(ext.transform(X.astype(">f4")), ext.transform(X), atol=1e-6)


@pytest.mark.parametrize("shape, match", [
    ((4, 28, 28), r"shape \(n_samples, 3, H, W\)"),
    ((4, 1, 28, 28), r"shape \(n_samples, 3, H, W\)"),
    ((4, 3, 28, 28, 2), "per-sample shape"),
    ((4, 5), r"shape \(n_samples, 3, H, W\)"),
])
@pytest.mark.parametrize("name", ["FMD", "finetuner", "RR-ClArC"])
def test_shapes_the_network_cannot_take_name_X(artifact_net, shape, match, name):
    X = np.zeros(shape, dtype=np.float32)
    y = np.arange(shape[0]) % 2
    est = {"FMD": FastModelDebiaser(artifact_net, device="cpu"),
           "finetuner": SpuriosityHeadFinetuner(artifact_net, k=1, device="cpu"),
           "RR-ClArC": GradientPenaltyCorrector(artifact_net, "features.6", cav=np.ones(64),
                                                device="cpu")}[name]
    with pytest.raises(ValueError, match=match) as info:
        est.fit(X, y, **({"X_cf": X} if name == "FMD" else {}))
    assert str(info.value).startswith("X has per-sample shape")


@pytest.mark.parametrize("metric", ["concept_sensitivity", "counterfactual_bias"])
def test_metrics_refuse_nan_naming_the_sample(artifact_net, data, metric):
    X = data[0][:8].copy()
    X[5, 0, 3, 3] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN or infinity \(first at sample 5\)"):
        if metric == "concept_sensitivity":
            concept_sensitivity(artifact_net, X, "features.6", np.ones(64))
        else:
            counterfactual_bias(artifact_net, X, X, np.zeros(8, dtype=int))


# ------------------------------------------------------------------ reproducible parallel search
def test_threaded_grid_search_is_reproducible(artifact_net, data):
    X, y, c = data
    est = GradientPenaltyCorrector(artifact_net, "features.6", max_epochs=1, lr=1e-3,
                                   device="cpu", random_state=0)
    with sklearn.config_context(enable_metadata_routing=True):
        est.set_fit_request(concept_labels=True)

        def run():
            search = GridSearchCV(est, {"penalty": [1.0, 100.0]}, cv=KFold(2), n_jobs=2)
            import joblib

            with joblib.parallel_backend("threading", n_jobs=2):
                search.fit(X, y, concept_labels=c)
            return search.cv_results_

        first, second = run(), run()
    for key in ("split0_test_score", "split1_test_score", "mean_test_score"):
        np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.parametrize("cls", ["EnDClassifier", "GroupBalancedClassifier"])
def test_end_and_reweighting_stop_on_a_nan_loss(colored_data, cls):
    import skdebias.correction as correction
    from skdebias.models import SmallCNN

    d = colored_data
    net = getattr(correction, cls)(SmallCNN, lr=1e8, max_epochs=2, train_split=None,
                                   optimizer=torch.optim.SGD, verbose=0)
    with pytest.raises(DivergenceError, match=r"loss became nan: lower lr \(now 100000000"):
        net.fit(d.X[:200], d.y[:200], bias=d.bias[:200])
