"""GradientPenaltyCorrector (RR-ClArC) and its penalty term gradient_penalty."""

import copy
import pickle

import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from torch import nn

from _nets import INPLACE_CAV, BNNet, blobs, inplace_net, state_copy
from skdebias._utils._modules import get_module
from skdebias.correction import ClassArtifactCompensator, GradientPenaltyCorrector, gradient_penalty
from skdebias.metrics import attacked_accuracy, concept_sensitivity, make_debias_scorer

# some tests correct untrained networks on purpose (history, warm start)
pytestmark = pytest.mark.filterwarnings("ignore::skdebias.exceptions.UntrainedNetworkWarning")

LAYER = "features.6"


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def routing():
    """Metadata routing on for one test, restored afterwards."""
    with sklearn.config_context(enable_metadata_routing=True):
        yield


@pytest.fixture(scope="module")
def rr_fitted(artifact_data, artifact_net):
    """RR-ClArC on the full artifact digits (fast setting: 2 epochs, lr 5e-3; the reference
    recipe's SGD, not the vanilla network's Adam)."""
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    return GradientPenaltyCorrector(artifact_net, LAYER, penalty=1e4, max_epochs=2, lr=5e-3,
                                    optimizer=torch.optim.SGD, device="cpu",
                                    random_state=0).fit(d.X, d.y, c)


def _f(t):
    return float(t.detach())


# ------------------------------------------------------------------ L_RR by hand
def _two_layer():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net[0].bias.zero_()
        net[1].weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]))
        net[1].bias.zero_()
    return net


def _forward_capture(net, x):
    store = []
    handle = net[0].register_forward_hook(lambda m, i, o: store.append(o))
    out = net(x)
    handle.remove()
    return store[0], out


@pytest.mark.parametrize("aggregation, expected", [
    # g_b = W2[y_b] = [1, 2, 0] and [0, 1, 3]; v = [0.6, 0.8, 0]: v.g = 2.2 and 0.8
    ("l2_mean", (2.2 ** 2 + 0.8 ** 2) / 2),
    ("l2", (2.2 ** 2 + 0.8 ** 2) / 2),
    ("l1_mean", (2.2 + 0.8) / 2),
    ("l1", (2.2 + 0.8) / 2),
    ("cosine_mean", (2.2 ** 2 / 5 + 0.8 ** 2 / 10) / 2),
])
def test_gradient_penalty_matches_hand_computed_value(aggregation, expected):
    net = _two_layer()
    a, out = _forward_capture(net, torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
    loss = gradient_penalty(a, out, [0.6, 0.8, 0.0], y=torch.tensor([0, 1]),
                            gradient_target="target", aggregation=aggregation)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    loss.backward()  # differentiable w.r.t. the weights after the layer (create_graph)
    assert net[1].weight.grad is not None and float(net[1].weight.grad.abs().sum()) > 0


def test_gradient_penalty_targets_by_hand():
    net = _two_layer()
    a, out = _forward_capture(net, torch.tensor([[1.0, 2.0], [3.0, -4.0]]))
    v = [0.6, 0.8, 0.0]
    # "all": g = W2[0] + W2[1] = [1, 3, 3]: v.g = 3.0 for both samples
    assert _f(gradient_penalty(a, out, v, gradient_target="all")) == pytest.approx(9.0)
    # "max": the arg-max logit per sample; out = [[5, 11], [-5, -13]] -> classes 1 and 0
    expected = (0.8 ** 2 + 2.2 ** 2) / 2
    assert _f(gradient_penalty(a, out, v, gradient_target="max")) == pytest.approx(expected)
    # "all_random": one of the sign combinations, the same for the same generator seed
    values = {round(_f(gradient_penalty(a, out, v, gradient_target="all_random",
                                           generator=torch.Generator().manual_seed(s))), 6)
              for s in range(20)}
    # v.(s1 W2[0] + s2 W2[1]) in {+-3.0, +-1.4}; per sample square in {9, 1.96}
    assert values <= {9.0, 1.96, round((9 + 1.96) / 2, 6)}
    assert len(values) > 1


def test_gradient_penalty_spatial_aggregations_by_hand():
    a = torch.zeros(1, 2, 1, 2, requires_grad=True)
    W = torch.tensor([[[[1.0, 3.0]], [[2.0, 0.0]]]])  # (K=1, C=2, 1, 2): g = W[0]
    out = torch.einsum("bchw,kchw->bk", a, W)
    v = [1.0, 0.0]  # projections per position: 1 and 3
    assert _f(gradient_penalty(a, out, v, gradient_target="all", aggregation="l2")) == \
        pytest.approx((1 + 9) / 2)
    assert _f(gradient_penalty(a, out, v, gradient_target="all", aggregation="l2_mean")) == \
        pytest.approx(2.0 ** 2)
    assert _f(gradient_penalty(a, out, v, gradient_target="all", aggregation="l1")) == \
        pytest.approx(2.0)


def test_gradient_penalty_errors():
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="autograd graph"):
        gradient_penalty(a, torch.zeros(2, 2), [1.0, 0, 0])
    a = torch.zeros(2, 3, requires_grad=True)
    out = a @ torch.ones(3, 2)
    with pytest.raises(ValueError, match="aggregation"):
        gradient_penalty(a, out, [1.0, 0, 0], aggregation="l3")
    with pytest.raises(ValueError, match="gradient_target"):
        gradient_penalty(a, out, [1.0, 0, 0], gradient_target="random")
    with pytest.raises(ValueError, match="3 channels"):
        gradient_penalty(a, out, [1.0, 0], gradient_target="all")


# ------------------------------------------------------------------ training equivalence
def test_penalty_zero_equals_plain_finetuning(small, artifact_net):
    from skorch import NeuralNetClassifier

    X, y, c = small
    X, y, c = X[:192], y[:192], c[:192]
    rr = GradientPenaltyCorrector(artifact_net, LAYER, penalty=0.0, max_epochs=2, lr=1e-2,
                                  optimizer=torch.optim.SGD, max_grad_norm=None,
                                  device="cpu", random_state=3).fit(X, y, c)

    module = copy.deepcopy(get_module(artifact_net))
    for name, p in module.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    plain = NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD,
                                optimizer__momentum=0.9, lr=1e-2, max_epochs=2, batch_size=64,
                                train_split=None, iterator_train__shuffle=True, device="cpu",
                                verbose=0, iterator_train__generator=torch.Generator().manual_seed(
                                    int(np.random.RandomState(3).randint(np.iinfo(np.int32).max))))
    plain.fit(X, y)  # the corrector shuffles from a generator seeded by random_state
    got, want = state_copy(rr.module_), state_copy(plain.module_)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert not torch.equal(want["classifier.2.weight"],
                           get_module(artifact_net).classifier[2].weight)
    # the penalty was still measured (logged), it just did not enter the loss
    assert all(v > 0 for v in rr.history_[:, "train_rr"])


def test_same_seed_same_result(small, artifact_net):
    X, y, c = small
    X, y, c = X[:128], y[:128], c[:128]
    kw = dict(penalty=100.0, max_epochs=1, lr=1e-2, device="cpu", random_state=0)
    a = GradientPenaltyCorrector(artifact_net, LAYER, **kw).fit(X, y, c)
    b = GradientPenaltyCorrector(artifact_net, LAYER, **kw).fit(X, y, c)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))


# ------------------------------------------------------------------ effects
def test_rr_clarc_reduces_concept_sensitivity(rr_fitted, artifact_data, artifact_net,
                                              vanilla_scores):
    d = artifact_data
    X_att = d.add_artifact(d.X_test)
    before = concept_sensitivity(artifact_net, X_att, LAYER, rr_fitted.cav_, target=0)
    after = concept_sensitivity(rr_fitted, X_att, LAYER, rr_fitted.cav_, target=0)
    assert after["mean_abs"] < 0.2 * before["mean_abs"]
    clean = rr_fitted.score(d.X_test, d.y_test)
    assert clean >= vanilla_scores["clean"] - 0.02
    attacked = attacked_accuracy(rr_fitted, d.X_test, d.y_test, d.add_artifact)
    # recovers at least half of the accuracy the artifact costs the vanilla network
    assert attacked - vanilla_scores["attacked"] >= \
        0.5 * (vanilla_scores["clean"] - vanilla_scores["attacked"])
    # the penalty went down during training
    rr = rr_fitted.history_[:, "train_rr"]
    assert rr[-1] < rr[0]


def test_rr_clarc_effect_comes_from_the_penalty(rr_fitted, artifact_data, artifact_net):
    """Control: the same fine-tuning without the penalty leaves the sensitivity in place, so the
    reduction above is the penalty's doing (and the test above can fail)."""
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    plain = GradientPenaltyCorrector(artifact_net, LAYER, penalty=0.0, max_epochs=2, lr=5e-3,
                                     optimizer=torch.optim.SGD, device="cpu",
                                     random_state=0).fit(d.X, d.y, c)
    X_att = d.add_artifact(d.X_test)
    v = rr_fitted.cav_
    s_vanilla = concept_sensitivity(artifact_net, X_att, LAYER, v, target=0)["mean_abs"]
    s_plain = concept_sensitivity(plain, X_att, LAYER, v, target=0)["mean_abs"]
    s_rr = concept_sensitivity(rr_fitted, X_att, LAYER, v, target=0)["mean_abs"]
    assert s_plain > 0.5 * s_vanilla
    assert s_rr < 0.2 * s_plain
    # the penalty term stays high without the penalty, and falls with it
    assert plain.history_[-1, "train_rr"] > 10 * rr_fitted.history_[-1, "train_rr"]


def test_rr_clarc_only_trains_layers_after(rr_fitted, artifact_net):
    before, after = state_copy(get_module(artifact_net)), state_copy(rr_fitted.module_)
    assert rr_fitted.trainable_params_ == [k for k in before if k.startswith("classifier.")]
    for key in before:
        if key.startswith("features."):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
        else:
            assert not torch.equal(after[key], before[key])


def test_rr_penalty_is_the_same_with_an_inplace_relu_after_the_layer(gray_images):
    X = gray_images
    from skdebias.correction import GradientPenaltyCorrector

    y = np.array([0, 1, 2, 0, 1, 2])
    # train_layers="all": the layer's output is already part of the graph (no leaf copy)
    kw = dict(layer="1", cav=INPLACE_CAV, penalty=1.0, max_epochs=1, lr=1e-2, batch_size=6,
              train_layers="all", device="cpu", random_state=0)
    plain = GradientPenaltyCorrector(inplace_net(), **kw).fit(X, y)
    inplace = GradientPenaltyCorrector(inplace_net(inplace_after=True), **kw).fit(X, y)
    assert inplace.history_[-1, "train_rr"] == pytest.approx(plain.history_[-1, "train_rr"],
                                                              rel=1e-5)
    assert plain.history_[-1, "train_rr"] > 0


# ------------------------------------------------------------------ errors
def test_parameter_errors():
    X, y, c = blobs(30)
    net = BNNet()
    for kwargs, match in [({"penalty": -1.0}, "penalty"), ({"gradient_target": "x"}, "gradient_target"),
                          ({"aggregation": "l3"}, "aggregation"), ({"max_epochs": -1}, "max_epochs"),
                          ({"lr": 0.0}, "lr"), ({"optimizer": "adam"}, "optimizer")]:
        with pytest.raises(ValueError, match=match):
            GradientPenaltyCorrector(net, "body.2", device="cpu", **kwargs).fit(X, y, c)
    with pytest.raises(ValueError, match="mode="):
        ClassArtifactCompensator(net, "body.2", mode="both").fit(X, y, c)
    with pytest.raises(ValueError, match="max_epochs >= 1"):
        ClassArtifactCompensator(net, "body.2", mode="augmentative").fit(X, y, c)
    with pytest.raises(ValueError, match="reference"):
        ClassArtifactCompensator(net, "body.2", reference="mean").fit(X, y, c)


# ------------------------------------------------------------------ skorch integration
def test_history_logs_penalty_on_validation_and_warm_start():
    from skorch.callbacks import Callback

    class Count(Callback):
        def __init__(self):
            self.epochs = 0

        def on_epoch_end(self, net, **kwargs):
            self.epochs += 1

    counter = Count()
    X, y, c = blobs(90)
    rr = GradientPenaltyCorrector(BNNet(), "body.2", penalty=5.0, max_epochs=2, lr=0.05,
                                  batch_size=16, validation_fraction=1 / 3,
                                  callbacks=[counter], warm_start=True, device="cpu",
                                  random_state=0).fit(X, y, c)
    hist = rr.history_
    assert len(hist) == 2
    assert all(v > 0 for v in hist[:, "valid_rr"]) and all(v > 0 for v in hist[:, "train_rr"])
    # validation loss includes the penalty (CE alone would be smaller)
    assert counter.epochs == 0  # the user's callback object is copied, not mutated
    state = state_copy(rr.module_)
    rr.fit(X, y, c)  # warm start: continues training the corrected network
    assert len(rr.history_) == 4
    assert not torch.equal(state_copy(rr.module_)["head.2.weight"], state["head.2.weight"])


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


# ------------------------------------------------------------------ persistence
def test_clone_and_pickle_fitted_rr(rr_fitted, artifact_data, artifact_net):
    X = artifact_data.X_test[:20]
    cloned = clone(rr_fitted)
    assert not hasattr(cloned, "estimator_")
    assert cloned.get_params()["penalty"] == rr_fitted.penalty
    # the skorch net to correct keeps its trained weights in the clone (sklearn's clone
    # alone would give an unfitted net), and it is a copy
    assert cloned.estimator is not artifact_net
    np.testing.assert_array_equal(cloned.estimator.predict_proba(X), artifact_net.predict_proba(X))
    loaded = pickle.loads(pickle.dumps(rr_fitted))
    np.testing.assert_array_equal(loaded.predict_proba(X), rr_fitted.predict_proba(X))


# ------------------------------------------------------------------ sklearn workflows
class _RecordingRR(GradientPenaltyCorrector):
    seen = []

    def fit(self, X, y, concept_labels=None):
        type(self).seen.append((len(X), None if concept_labels is None else len(concept_labels)))
        return super().fit(X, y, concept_labels=concept_labels)


def test_grid_search_routes_concept_labels_and_picks_a_penalty(routing, small, artifact_net):
    X, y, c = small
    _RecordingRR.seen = []
    est = _RecordingRR(artifact_net, LAYER, max_epochs=1, lr=5e-3, device="cpu",
                       random_state=0).set_fit_request(concept_labels=True)
    search = GridSearchCV(est, {"penalty": [0.0, 1e4]}, scoring=make_debias_scorer(),
                          cv=KFold(2, shuffle=True, random_state=0), error_score="raise")
    search.fit(X, y, concept_labels=c)
    fold_sizes = {n for n, _ in _RecordingRR.seen[:-1]}
    assert all(n == m for n, m in _RecordingRR.seen)  # labels sliced with X
    assert fold_sizes < {len(X)} | fold_sizes and _RecordingRR.seen[-1][0] == len(X)
    # the scorer rewards removing the sensitivity: the penalty wins over plain fine-tuning
    assert search.best_params_["penalty"] == 1e4
    assert search.cv_results_["mean_test_score"][1] > search.cv_results_["mean_test_score"][0]


def test_grid_search_in_pipeline_with_routing(routing, small, artifact_net):
    X, y, c = small
    pipe = Pipeline([("corrector", GradientPenaltyCorrector(
        artifact_net, LAYER, max_epochs=1, lr=5e-3, device="cpu",
        random_state=0).set_fit_request(concept_labels=True))])
    search = GridSearchCV(pipe, {"corrector__penalty": [1.0, 1e4]},
                          scoring=make_debias_scorer(), cv=2)
    search.fit(X, y, concept_labels=c)
    assert search.best_params_["corrector__penalty"] in (1.0, 1e4)


def test_pipeline_without_routing(small, artifact_net):
    X, y, c = small
    pipe = Pipeline([("corrector", GradientPenaltyCorrector(
        artifact_net, LAYER, max_epochs=1, lr=5e-3, device="cpu", random_state=0))])
    pipe.fit(X, y, corrector__concept_labels=c)
    assert pipe.score(X, y) > 0.5


# ------------------------------------------------------------------ reference-recipe options
def test_train_layers_linear_trains_every_linear_layer(small, artifact_net):
    """At a Linear layer, "linear" (the reference recipe) also trains the Linear layers up to it;
    "after" trains only the ones after it."""
    X, y, c = small
    X, y, c = X[:128], y[:128], c[:128]
    kw = dict(penalty=1.0, max_epochs=1, lr=1e-2, device="cpu", random_state=0)
    lin = GradientPenaltyCorrector(artifact_net, "classifier.1", train_layers="linear",
                                   **kw).fit(X, y, c)
    after = GradientPenaltyCorrector(artifact_net, "classifier.1", **kw).fit(X, y, c)
    assert lin.trainable_params_ == ["classifier.0.weight", "classifier.0.bias",
                                     "classifier.2.weight", "classifier.2.bias"]
    assert after.trainable_params_ == ["classifier.2.weight", "classifier.2.bias"]
    before, got = state_copy(get_module(artifact_net)), state_copy(lin.module_)
    assert not torch.equal(got["classifier.0.weight"], before["classifier.0.weight"])
    torch.testing.assert_close(got["features.6.weight"], before["features.6.weight"],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="no torch.nn.Linear layer"):
        GradientPenaltyCorrector(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten()), "0",
                                 train_layers="linear", device="cpu").fit(X, y % 2, c)


def test_cav_samples_correct_fits_on_correctly_predicted_samples(small, artifact_net):
    from skdebias import CAVEstimator, ActivationExtractor

    X, y, c = small
    kw = dict(penalty=1.0, max_epochs=0, device="cpu", random_state=0)
    # a network that gets some labelled samples wrong: labels shuffled within the labelled set
    y_noisy = y.copy()
    lab = np.flatnonzero(c != -1)
    y_noisy[lab[::3]] = 5
    default = GradientPenaltyCorrector(artifact_net, LAYER, **kw).fit(X, y_noisy, c)
    correct = GradientPenaltyCorrector(artifact_net, LAYER, cav_samples="correct",
                                       **kw).fit(X, y_noisy, c)
    pred = artifact_net.predict(X)
    keep = (c != -1) & (pred == y_noisy)
    A = ActivationExtractor(artifact_net, LAYER, device="cpu").fit_transform(X[keep])
    want = CAVEstimator().fit(A, c[keep]).cav_
    np.testing.assert_allclose(correct.cav_, want, atol=1e-5)
    assert not np.allclose(default.cav_, want, atol=1e-3)
    with pytest.raises(ValueError, match="cav_samples='wrong' is not valid|cav_samples"):
        GradientPenaltyCorrector(artifact_net, LAYER, cav_samples="wrong",
                                 **kw).fit(X, y, c)
    # no correctly predicted concept sample left: a clear error, not a CAV from one group
    with pytest.raises(ValueError, match="cav_samples='correct' keeps 0 concept"):
        y_bad = y.copy()
        y_bad[c == 1] = 7
        GradientPenaltyCorrector(artifact_net, LAYER, cav_samples="correct",
                                 **kw).fit(X, y_bad, c)
