"""Tests of the CAV-based correctors: GradientPenaltyCorrector (RR-ClArC) and
ClassArtifactCompensator (A-/P-ClArC)."""

import copy
import io
import os
import pickle

import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from skdebias import ActivationExtractor, CAVEstimator
from skdebias._torch import get_module, set_seed
from skdebias.correction import (
    ClassArtifactCompensator,
    CompensatedLayer,
    ConceptCompensation,
    GradientPenaltyCorrector,
    gradient_penalty,
)
from skdebias.metrics import attacked_accuracy, concept_sensitivity, make_debias_scorer

LAYER = "features.6"


# ------------------------------------------------------------------ fixtures
@pytest.fixture
def routing():
    """Metadata routing on for one test, restored afterwards."""
    with sklearn.config_context(enable_metadata_routing=True):
        yield


@pytest.fixture(scope="module")
def small(artifact_data):
    """A small training subset: every class-0 image (all artifact images) + 300 others."""
    d = artifact_data
    rng = np.random.RandomState(0)
    others = rng.choice(np.flatnonzero(d.y != 0), 300, replace=False)
    idx = np.sort(np.r_[np.flatnonzero(d.y == 0), others])
    concept = np.where(d.y[idx] == 0, d.concept[idx], -1)
    return d.X[idx], d.y[idx], concept


@pytest.fixture(scope="module")
def vanilla_scores(artifact_data, artifact_net):
    d = artifact_data
    return {"clean": float(np.mean(artifact_net.predict(d.X_test) == d.y_test)),
            "attacked": attacked_accuracy(artifact_net, d.X_test, d.y_test, d.add_artifact)}


@pytest.fixture(scope="module")
def rr_fitted(artifact_data, artifact_net):
    """RR-ClArC on the full artifact digits (fast setting: 2 epochs, lr 5e-3)."""
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    return GradientPenaltyCorrector(artifact_net, LAYER, penalty=1e4, max_epochs=2, lr=5e-3,
                                    device="cpu", random_state=0).fit(d.X, d.y, c)


@pytest.fixture(scope="module")
def pclarc_fitted(artifact_data, artifact_net):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    return ClassArtifactCompensator(artifact_net, LAYER, device="cpu").fit(d.X, d.y, c)


def _f(t):
    return float(t.detach())


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


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
                                  device="cpu", random_state=3).fit(X, y, c)

    module = copy.deepcopy(get_module(artifact_net))
    for name, p in module.named_parameters():
        p.requires_grad_(name.startswith("classifier."))
    plain = NeuralNetClassifier(module, criterion=nn.CrossEntropyLoss, optimizer=torch.optim.SGD,
                                optimizer__momentum=0.9, lr=1e-2, max_epochs=2, batch_size=64,
                                train_split=None, iterator_train__shuffle=True, device="cpu",
                                verbose=0)
    set_seed(3)
    plain.fit(X, y)
    got, want = _state(rr.module_), _state(plain.module_)
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
                                     device="cpu", random_state=0).fit(d.X, d.y, c)
    X_att = d.add_artifact(d.X_test)
    v = rr_fitted.cav_
    s_vanilla = concept_sensitivity(artifact_net, X_att, LAYER, v, target=0)["mean_abs"]
    s_plain = concept_sensitivity(plain, X_att, LAYER, v, target=0)["mean_abs"]
    s_rr = concept_sensitivity(rr_fitted, X_att, LAYER, v, target=0)["mean_abs"]
    assert s_plain > 0.5 * s_vanilla
    assert s_rr < 0.2 * s_plain
    # the penalty term stays high without the penalty, and falls with it
    assert plain.history_[-1, "train_rr"] > 10 * rr_fitted.history_[-1, "train_rr"]


def test_compare_corrections_default_settings(artifact_data, artifact_net, vanilla_scores):
    """The demo's correction table: RR-ClArC removes most of the sensitivity and recovers
    attacked accuracy, P-ClArC closes the attacked gap, on the fixture's Clever Hans."""
    from skdebias.correction import compare_corrections

    rows = compare_corrections(artifact_net, artifact_data, methods=("vanilla", "P-ClArC",
                                                                     "RR-ClArC"),
                               n_relevance=20, device="cpu", random_state=0)
    res = {r["method"]: r for r in rows}
    assert set(res["vanilla"]) == {"method", "clean acc", "attacked acc", "concept sensitivity",
                                   "sensitivity ratio", "artifact relevance", "fit s"}
    van, rr, pc = res["vanilla"], res["RR-ClArC"], res["P-ClArC"]
    assert van["attacked acc"] == pytest.approx(vanilla_scores["attacked"])
    assert van["sensitivity ratio"] == 1.0 and van["fit s"] == 0.0
    assert rr["sensitivity ratio"] < 0.2
    lost = van["clean acc"] - van["attacked acc"]
    assert rr["attacked acc"] - van["attacked acc"] >= 0.5 * lost
    assert rr["clean acc"] >= van["clean acc"] - 0.02
    # P-ClArC closes most of the attacked gap (the 5-point acceptance figure is the
    # benchmark's; this fixture's ~10-point gap leaves 3.7 to 5.2 points across CPUs)
    assert abs(pc["clean acc"] - pc["attacked acc"]) <= 0.6 * lost
    assert pc["concept sensitivity"] < 1e-6
    # the artifact gets less of the relevance once the network ignores it
    assert rr["artifact relevance"] < van["artifact relevance"]
    with pytest.raises(ValueError, match="Unknown methods"):
        compare_corrections(artifact_net, artifact_data, methods=("vanilla", "B-ClArC"))


def test_compare_corrections_ratio_does_not_depend_on_the_order(artifact_data, artifact_net):
    from skdebias.correction import compare_corrections

    kw = dict(n_relevance=5, device="cpu", random_state=0)
    after = compare_corrections(artifact_net, artifact_data, methods=("P-ClArC", "vanilla"), **kw)
    before = compare_corrections(artifact_net, artifact_data, methods=("vanilla", "P-ClArC"), **kw)
    assert after[1]["sensitivity ratio"] == 1.0
    assert after[0]["sensitivity ratio"] == pytest.approx(before[1]["sensitivity ratio"])
    assert after[0]["sensitivity ratio"] < 1e-3
    alone = compare_corrections(artifact_net, artifact_data, methods=("P-ClArC",), **kw)
    assert "sensitivity ratio" not in alone[0]


def test_rr_clarc_only_trains_layers_after(rr_fitted, artifact_net):
    before, after = _state(get_module(artifact_net)), _state(rr_fitted.module_)
    assert rr_fitted.trainable_params_ == [k for k in before if k.startswith("classifier.")]
    for key in before:
        if key.startswith("features."):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
        else:
            assert not torch.equal(after[key], before[key])


def test_pclarc_closes_the_attacked_gap(pclarc_fitted, artifact_data, vanilla_scores):
    d = artifact_data
    clean = pclarc_fitted.score(d.X_test, d.y_test)
    attacked = attacked_accuracy(pclarc_fitted, d.X_test, d.y_test, d.add_artifact)
    gap_vanilla = vanilla_scores["clean"] - vanilla_scores["attacked"]
    assert gap_vanilla > 0.05  # the fixture network is a Clever Hans
    # most of the gap closes: float results differ between CPU kernels, so the bound is
    # relative (measured: 3.7 of 9.4 points left on one CPU, 5.2 of 10.7 on another)
    assert abs(clean - attacked) <= 0.6 * gap_vanilla
    assert attacked - vanilla_scores["attacked"] >= 0.3 * gap_vanilla
    assert clean >= vanilla_scores["clean"] - 0.05


def test_pclarc_moves_every_sample_to_the_clean_reference(pclarc_fitted, artifact_data):
    from skdebias.extraction import ActivationExtractor

    d = artifact_data
    X_att = d.add_artifact(d.X_test[:50])
    A = ActivationExtractor(pclarc_fitted.module_, LAYER, device="cpu").fit_transform(X_att)
    np.testing.assert_allclose(A @ pclarc_fitted.cav_, pclarc_fitted.mu_clean_, atol=1e-3)
    assert pclarc_fitted.mu_artifact_ > pclarc_fitted.mu_clean_
    # the uncompensated activations are still there, and the network ignores the CAV there
    s = concept_sensitivity(pclarc_fitted, X_att, pclarc_fitted.measure_layer_,
                            pclarc_fitted.cav_, target=0)
    assert s["mean_abs"] < 1e-6


def test_aclarc_fine_tunes_then_removes_the_shift(small, artifact_net, artifact_data,
                                                 vanilla_scores):
    X, y, c = small
    d = artifact_data
    ac = ClassArtifactCompensator(artifact_net, LAYER, mode="augmentative", max_epochs=2,
                                  lr=5e-3, device="cpu", random_state=0).fit(X, y, c)
    assert not any(isinstance(m, (CompensatedLayer, ConceptCompensation))
                   for m in ac.module_.modules())
    before, after = _state(get_module(artifact_net)), _state(ac.module_)
    assert before.keys() == after.keys()
    torch.testing.assert_close(after["features.6.weight"], before["features.6.weight"])
    assert not torch.equal(after["classifier.0.weight"], before["classifier.0.weight"])
    # A-ClArC shows in the attacked accuracy, not in the gradient along the CAV (which stays
    # within ~2% of vanilla: the demo's sensitivity ratio is 0.98; which side of 1 it lands on
    # depends on the CPU's float kernels)
    gap = vanilla_scores["clean"] - vanilla_scores["attacked"]
    attacked = attacked_accuracy(ac, d.X_test, d.y_test, d.add_artifact)
    assert attacked - vanilla_scores["attacked"] >= 0.5 * gap
    assert ac.score(d.X_test, d.y_test) >= vanilla_scores["clean"] - 0.05
    assert ac.mu_artifact_ == pytest.approx(ac.reference_)


# ------------------------------------------------------------------ the caller's network
@pytest.mark.parametrize("make", ["rr", "pclarc"])
def test_never_mutates_the_callers_network(small, artifact_net, make):
    X, y, c = small
    module = get_module(artifact_net)
    state = _state(module)
    flags = [p.requires_grad for p in module.parameters()]
    training = [m.training for m in module.modules()]
    X_copy, c_copy = X.copy(), c.copy()
    if make == "rr":
        GradientPenaltyCorrector(artifact_net, LAYER, penalty=10.0, max_epochs=1, lr=1e-2,
                                 device="cpu", random_state=0).fit(X, y, c)
    else:
        ClassArtifactCompensator(artifact_net, LAYER, device="cpu").fit(X, y, c)
    for key, value in _state(module).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert [p.requires_grad for p in module.parameters()] == flags
    assert [m.training for m in module.modules()] == training
    assert not any(isinstance(m, CompensatedLayer) for m in module.modules())
    np.testing.assert_array_equal(X, X_copy)
    np.testing.assert_array_equal(c, c_copy)


# ------------------------------------------------------------------ train_layers / BatchNorm
class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.body(x))


def _blobs(n=90, seed=0):
    rng = np.random.RandomState(seed)
    y = np.arange(n) % 3
    X = (rng.randn(n, 4) + 2 * np.eye(4)[y]).astype(np.float32)
    c = (rng.rand(n) < 0.5).astype(int)
    X[c == 1, 3] += 3.0
    return X, y, c


@pytest.mark.parametrize("train_layers, changed", [
    ("after", {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}),
    ("all", None),
    (["head.2."], {"head.2.weight", "head.2.bias"}),
])
def test_train_layers_and_batchnorm_in_eval(train_layers, changed):
    torch.manual_seed(0)
    net = _BNNet()
    X, y, c = _blobs()
    rr = GradientPenaltyCorrector(net, "body.2", penalty=1.0, train_layers=train_layers,
                                  max_epochs=2, lr=0.05, batch_size=16, device="cpu",
                                  random_state=0).fit(X, y, c)
    before, after = _state(net), _state(rr.module_)
    differs = {k for k in before if not torch.equal(before[k], after[k])}
    params = {k for k, _ in net.named_parameters()}
    if changed is None:
        # every parameter and the BatchNorm statistics move (but the bias in front of
        # BatchNorm, whose gradient is zero)
        assert differs >= params - {"body.0.bias"}
        assert "body.1.running_mean" in differs
    else:
        assert differs == changed
        assert set(rr.trainable_params_) == changed
        # frozen BatchNorm stayed in eval mode: running statistics untouched
        assert "body.1.running_mean" not in differs


def test_train_layers_errors():
    X, y, c = _blobs(30)
    with pytest.raises(ValueError, match="match no parameter"):
        GradientPenaltyCorrector(_BNNet(), "body.2", train_layers=["heda."], max_epochs=1,
                                 device="cpu").fit(X, y, c)
    with pytest.raises(ValueError, match="train_layers"):
        GradientPenaltyCorrector(_BNNet(), "body.2", train_layers="before", max_epochs=1,
                                 device="cpu").fit(X, y, c)
    with pytest.raises(ValueError, match="no parameter to train"):
        GradientPenaltyCorrector(_BNNet(), "head.2", max_epochs=1, device="cpu").fit(X, y, c)


# ------------------------------------------------------------------ CAV handling
def test_cav_as_vector_and_estimator_is_cloned():
    X, y, c = _blobs(60)
    v = np.r_[np.zeros(7), 2.0]
    rr = GradientPenaltyCorrector(_BNNet(), "body.2", cav=v, max_epochs=1, lr=0.01,
                                  device="cpu", random_state=0).fit(X, y)  # no labels needed
    np.testing.assert_allclose(rr.cav_, v / 2.0)
    assert rr.cav_.dtype == np.float32 and rr.cav_estimator_ is None
    cav = CAVEstimator(method="mean_diff")
    rr = GradientPenaltyCorrector(_BNNet(), "body.2", cav=cav, max_epochs=1, lr=0.01,
                                  device="cpu", random_state=0).fit(X, y, c)
    assert not hasattr(cav, "cav_")
    assert rr.cav_estimator_ is not cav and rr.cav_estimator_.method == "mean_diff"
    np.testing.assert_allclose(np.linalg.norm(rr.cav_), 1.0, rtol=1e-6)


def test_unlabelled_samples_are_left_out_of_the_cav():
    X, y, c = _blobs(90)
    c_partial = np.where(y == 0, c, -1)
    est = ClassArtifactCompensator(_BNNet(), "body.2", device="cpu").fit(X, y, c_partial)
    from skdebias.extraction import ActivationExtractor

    A = ActivationExtractor(est.estimator, "body.2", device="cpu").fit_transform(X[y == 0])
    expected = CAVEstimator().fit(A, c[y == 0]).cav_
    np.testing.assert_allclose(est.cav_, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("Est", [GradientPenaltyCorrector, ClassArtifactCompensator])
def test_errors(Est):
    X, y, c = _blobs(30)
    net = _BNNet()
    with pytest.raises(ValueError, match="Unknown layer 'body.9'.*Closest"):
        Est(net, "body.9", device="cpu").fit(X, y, c)
    with pytest.raises(ValueError, match="concept_labels are required"):
        Est(net, "body.2", device="cpu").fit(X, y)
    with pytest.raises(ValueError, match="one class only"):
        Est(net, "body.2", device="cpu").fit(X, y, np.zeros(30, dtype=int))
    with pytest.raises(ValueError, match="one class only"):
        Est(net, "body.2", device="cpu").fit(X, y, np.where(c == 1, 1, -1))
    with pytest.raises(ValueError, match="must hold 0"):
        Est(net, "body.2", device="cpu").fit(X, y, c + 5)
    with pytest.raises(ValueError, match="one entry per sample"):
        Est(net, "body.2", device="cpu").fit(X, y, c[:10])
    with pytest.raises(ValueError, match="5 dimensions but layer 'body.2' has 8 channels"):
        Est(net, "body.2", cav=np.ones(5), device="cpu").fit(X, y, c)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        Est(net, "body.2", device="cpu").fit(X, y[:20], c)
    with pytest.raises(ValueError, match="not among the network's classes"):
        Est(net, "body.2", device="cpu").fit(X, y + 5, c)
    with pytest.raises(ValueError, match="batch_size"):
        Est(net, "body.2", batch_size=0, device="cpu").fit(X, y, c)


def test_parameter_errors():
    X, y, c = _blobs(30)
    net = _BNNet()
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
    from skorch.dataset import ValidSplit

    class Count(Callback):
        def __init__(self):
            self.epochs = 0

        def on_epoch_end(self, net, **kwargs):
            self.epochs += 1

    counter = Count()
    X, y, c = _blobs(90)
    rr = GradientPenaltyCorrector(_BNNet(), "body.2", penalty=5.0, max_epochs=2, lr=0.05,
                                  batch_size=16, train_split=ValidSplit(3, stratified=True),
                                  callbacks=[counter], warm_start=True, device="cpu",
                                  random_state=0).fit(X, y, c)
    hist = rr.history_
    assert len(hist) == 2
    assert all(v > 0 for v in hist[:, "valid_rr"]) and all(v > 0 for v in hist[:, "train_rr"])
    # validation loss includes the penalty (CE alone would be smaller)
    assert counter.epochs == 0  # the user's callback object is copied, not mutated
    state = _state(rr.module_)
    rr.fit(X, y, c)  # warm start: continues training the corrected network
    assert len(rr.history_) == 4
    assert not torch.equal(_state(rr.module_)["head.2.weight"], state["head.2.weight"])


def test_dataset_input_and_skorch_classes():
    from skorch import NeuralNetClassifier

    X, y, c = _blobs(60)
    labels = np.array(["a", "b", "c"])[y]
    # skorch trains on class indices; ``classes`` gives the labels of its outputs
    net = NeuralNetClassifier(_BNNet, criterion=nn.CrossEntropyLoss, max_epochs=2,
                              train_split=None, verbose=0, classes=["a", "b", "c"]).fit(X, y)
    rr = GradientPenaltyCorrector(net, "body.2", max_epochs=1, lr=0.01, device="cpu",
                                  random_state=0).fit(X, labels, c)
    assert list(rr.classes_) == ["a", "b", "c"]
    assert set(rr.predict(X)) <= {"a", "b", "c"}
    ds = torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    rr2 = GradientPenaltyCorrector(_BNNet(), "body.2", max_epochs=1, lr=0.01, device="cpu",
                                   random_state=0).fit(ds, None, c)
    assert rr2.predict(ds).shape == (60,)
    np.testing.assert_allclose(rr2.predict_proba(ds), rr2.predict_proba(X), rtol=1e-5)


# ------------------------------------------------------------------ persistence
def test_pclarc_network_survives_pickle_deepcopy_save_and_skorch_params(pclarc_fitted,
                                                                        artifact_data, tmp_path):
    xb = torch.as_tensor(artifact_data.add_artifact(artifact_data.X_test[:8]))
    module = pclarc_fitted.module_
    module.eval()
    want = module(xb).detach()
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    for other in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module),
                  torch.load(buf, weights_only=False)):
        torch.testing.assert_close(other.eval()(xb), want)
    # skorch save_params / load_params into a fresh net of the same structure
    path = os.path.join(tmp_path, "params.pt")
    pclarc_fitted.estimator_.save_params(f_params=path)
    fresh = clone(pclarc_fitted.estimator_).initialize()
    with torch.no_grad():
        fresh.module_.features[6].compensation.reference.fill_(0.0)
        fresh.module_.classifier[2].weight.zero_()
    fresh.load_params(f_params=path)
    np.testing.assert_allclose(fresh.predict_proba(xb.numpy()),
                               pclarc_fitted.predict_proba(xb.numpy()), rtol=1e-5, atol=1e-6)
    est = pickle.loads(pickle.dumps(pclarc_fitted))
    np.testing.assert_allclose(est.predict_proba(xb.numpy()),
                               pclarc_fitted.predict_proba(xb.numpy()), rtol=1e-6)


def test_concept_compensation_formula():
    comp = ConceptCompensation([3.0, 4.0], reference=2.0)
    a = torch.randn(5, 2, 3, 3)
    out = comp(a)
    v = torch.tensor([0.6, 0.8])
    pooled = out.flatten(2).amax(2) @ v
    torch.testing.assert_close(pooled, torch.full((5,), 2.0))
    # only the CAV direction changes
    diff = (out - a).flatten(2)
    ortho = torch.tensor([0.8, -0.6])
    torch.testing.assert_close(torch.einsum("bcp,c->bp", diff, ortho), torch.zeros(5, 9),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expects activations"):
        comp(torch.zeros(2, 3))


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


def test_grid_search_n_jobs_2():
    X, y, c = _blobs(60)
    est = ClassArtifactCompensator(_BNNet(), "body.2", cav=np.ones(8), device="cpu")
    search = GridSearchCV(est, {"reference": [0.0, 1.0]}, cv=2, n_jobs=2).fit(X, y)
    assert search.best_params_["reference"] in (0.0, 1.0)
    assert hasattr(search.best_estimator_, "estimator_")


# ------------------------------------------------------------------ sklearn checks
class _Tiny(nn.Module):
    """Accepts 2-d input (n, n_features) of any width: LazyLinear -> ReLU -> Linear."""

    def __init__(self, n_classes=4):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.LazyLinear(8), nn.ReLU())
        self.head = nn.Linear(8, n_classes)

    def forward(self, x):
        return self.head(self.body(x))


_OUTPUTS = ("The network's output units define the classes: classes_ and the columns of "
            "predict_proba follow the network's outputs (4 here), not the labels seen in y "
            "(string labels need a fitted skorch classifier with classes_)")

_EXPECTED = {
    "check_classifiers_classes": _OUTPUTS,
    "check_classifiers_one_label": "A corrector fine-tunes a multi-class network; trained on "
                                   "one class it still predicts the others",
    "check_classifiers_train": _OUTPUTS,
    "check_estimators_overwrite_params": "joblib.hash of a torch module differs between deep "
                                         "copies of it; that the network is not modified is "
                                         "tested in test_never_mutates_the_callers_network",
}


def _expected_failed(estimator):
    return _EXPECTED


@parametrize_with_checks([
    GradientPenaltyCorrector(_Tiny(), "body.1", cav=np.ones(8), penalty=1.0, max_epochs=2,
                             lr=0.05, batch_size=32, device="cpu", random_state=0),
    ClassArtifactCompensator(_Tiny(), "body.1", cav=np.ones(8), reference=0.0, max_epochs=1,
                             lr=0.05, batch_size=32, device="cpu", random_state=0),
], expected_failed_checks=_expected_failed)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# ------------------------------------------------------------------ P-ClArC over the flattened map
def test_concept_compensation_flatten_formula():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2 * 3 * 3, generator=g)
    comp = ConceptCompensation(v.numpy(), reference=1.5, pooling="flatten")
    a = torch.randn(5, 2, 3, 3, generator=g)
    out = comp(a)
    u = v / v.norm()
    torch.testing.assert_close(out.reshape(5, -1) @ u, torch.full((5,), 1.5))
    # a - a' is parallel to v: nothing orthogonal to it moves
    diff = (out - a).reshape(5, -1)
    torch.testing.assert_close(diff - (diff @ u)[:, None] * u, torch.zeros(5, 18),
                               atol=1e-5, rtol=0)
    assert "pooling='flatten'" in repr(comp)
    with pytest.raises(ValueError, match="18 values per sample"):
        comp(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="pooling"):
        ConceptCompensation(v.numpy(), pooling="mean")


def test_pclarc_flatten_closes_the_gap_and_survives_pickle(artifact_data, artifact_net,
                                                           vanilla_scores):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    pc = ClassArtifactCompensator(artifact_net, LAYER, pooling="flatten", device="cpu").fit(
        d.X, d.y, c)
    maps = ActivationExtractor(artifact_net, LAYER, pooling=None, device="cpu").fit_transform(
        d.X[:2])
    n_dims = int(np.prod(maps.shape[1:]))
    assert pc.cav_.shape == (n_dims,) and n_dims > 64  # C x H x W, not C
    clean = pc.score(d.X_test, d.y_test)
    attacked = attacked_accuracy(pc, d.X_test, d.y_test, d.add_artifact)
    lost = vanilla_scores["clean"] - vanilla_scores["attacked"]
    # measured with avx512 / avx2 / default kernels: 1.5 / 1.7 / 1.9 points left of a 10.4-11.5
    # point vanilla gap (the max-pooled P-ClArC leaves 3.7-5.2): issue 3's 5-point figure holds
    assert abs(clean - attacked) <= min(0.05, 0.35 * lost), (clean, attacked, lost)
    assert attacked - vanilla_scores["attacked"] >= 0.3 * lost
    again = pickle.loads(pickle.dumps(pc.module_))
    assert again.features[6].compensation.pooling == "flatten"
    xb = torch.as_tensor(d.X_test[:4])
    torch.testing.assert_close(again.eval()(xb), pc.module_.eval()(xb))


def test_pclarc_flatten_errors(artifact_data, artifact_net):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    with pytest.raises(ValueError, match="pooling"):
        ClassArtifactCompensator(artifact_net, LAYER, pooling="mean", device="cpu").fit(d.X, d.y, c)
    with pytest.raises(ValueError, match="flattened activations"):
        ClassArtifactCompensator(artifact_net, LAYER, cav=np.ones(64), reference=0.0,
                                 pooling="flatten", device="cpu").fit(d.X, d.y)
    pc = ClassArtifactCompensator(artifact_net, LAYER, pooling="flatten", device="cpu").fit(
        d.X[:200], d.y[:200], c[:200])
    with pytest.raises(ValueError, match="per-sample shape"):
        pc.predict(np.zeros((2, 3, 32, 32), np.float32))


def test_compare_corrections_flatten_row_with_a_vector_cav(artifact_data, artifact_net):
    from skdebias.correction import compare_corrections

    c = np.where(artifact_data.y == 0, artifact_data.concept, -1)
    vec = ClassArtifactCompensator(artifact_net, LAYER, device="cpu").fit(
        artifact_data.X, artifact_data.y, c).cav_
    rows = compare_corrections(artifact_net, artifact_data, cav=vec,
                               methods=("P-ClArC flatten", "vanilla"), n_relevance=5,
                               device="cpu", random_state=0)
    res = {r["method"]: r for r in rows}
    assert res["vanilla"]["sensitivity ratio"] == 1.0
    assert res["P-ClArC flatten"]["attacked acc"] > res["vanilla"]["attacked acc"]
