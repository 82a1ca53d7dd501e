"""What the CAV correctors share (skdebias/correction/_base.py): the network copy, the CAV
(vector or estimator, fitted on the labelled samples), the freezing rules of ``train_layers``
with frozen modules kept in eval mode, and the input and label checks. Each test runs on
GradientPenaltyCorrector and/or ClassArtifactCompensator."""

import numpy as np
import pytest
import torch
from torch import nn

from _nets import BNNet, blobs, state_copy
from skdebias import CAVEstimator
from skdebias._utils._modules import get_module
from skdebias.correction import ClassArtifactCompensator, CompensatedLayer, GradientPenaltyCorrector

# these tests correct small untrained networks on purpose (what layers train, BatchNorm, cloning)
pytestmark = pytest.mark.filterwarnings("ignore::skdebias.exceptions.UntrainedNetworkWarning")

LAYER = "features.6"


# ------------------------------------------------------------------ the caller's network
@pytest.mark.parametrize("make", ["rr", "pclarc"])
def test_never_mutates_the_callers_network(small, artifact_net, make):
    X, y, c = small
    module = get_module(artifact_net)
    state = state_copy(module)
    flags = [p.requires_grad for p in module.parameters()]
    training = [m.training for m in module.modules()]
    X_copy, c_copy = X.copy(), c.copy()
    if make == "rr":
        GradientPenaltyCorrector(artifact_net, LAYER, penalty=10.0, max_epochs=1, lr=1e-2,
                                 device="cpu", random_state=0).fit(X, y, c)
    else:
        ClassArtifactCompensator(artifact_net, LAYER, device="cpu").fit(X, y, c)
    for key, value in state_copy(module).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert [p.requires_grad for p in module.parameters()] == flags
    assert [m.training for m in module.modules()] == training
    assert not any(isinstance(m, CompensatedLayer) for m in module.modules())
    np.testing.assert_array_equal(X, X_copy)
    np.testing.assert_array_equal(c, c_copy)


# ------------------------------------------------------------------ train_layers / BatchNorm
@pytest.mark.parametrize("train_layers, changed", [
    ("after", {"head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"}),
    ("all", None),
    (["head.2."], {"head.2.weight", "head.2.bias"}),
])
def test_train_layers_and_batchnorm_in_eval(train_layers, changed):
    torch.manual_seed(0)
    net = BNNet()
    X, y, c = blobs()
    rr = GradientPenaltyCorrector(net, "body.2", penalty=1.0, train_layers=train_layers,
                                  max_epochs=2, lr=0.05, batch_size=16, device="cpu",
                                  random_state=0).fit(X, y, c)
    before, after = state_copy(net), state_copy(rr.module_)
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
    X, y, c = blobs(30)
    with pytest.raises(ValueError, match="match no parameter"):
        GradientPenaltyCorrector(BNNet(), "body.2", train_layers=["heda."], max_epochs=1,
                                 device="cpu").fit(X, y, c)
    with pytest.raises(ValueError, match="train_layers"):
        GradientPenaltyCorrector(BNNet(), "body.2", train_layers="before", max_epochs=1,
                                 device="cpu").fit(X, y, c)
    with pytest.raises(ValueError, match="no parameter to train"):
        GradientPenaltyCorrector(BNNet(), "head.2", max_epochs=1, device="cpu").fit(X, y, c)


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


# ------------------------------------------------------------------ CAV handling
def test_cav_as_vector_and_estimator_is_cloned():
    X, y, c = blobs(60)
    v = np.r_[np.zeros(7), 2.0]
    rr = GradientPenaltyCorrector(BNNet(), "body.2", cav=v, max_epochs=1, lr=0.01,
                                  device="cpu", random_state=0).fit(X, y)  # no labels needed
    np.testing.assert_allclose(rr.cav_, v / 2.0)
    assert rr.cav_.dtype == np.float32 and rr.cav_estimator_ is None
    cav = CAVEstimator(method="mean_diff")
    rr = GradientPenaltyCorrector(BNNet(), "body.2", cav=cav, max_epochs=1, lr=0.01,
                                  device="cpu", random_state=0).fit(X, y, c)
    assert not hasattr(cav, "cav_")
    assert rr.cav_estimator_ is not cav and rr.cav_estimator_.method == "mean_diff"
    np.testing.assert_allclose(np.linalg.norm(rr.cav_), 1.0, rtol=1e-6)


def test_unlabelled_samples_are_left_out_of_the_cav():
    X, y, c = blobs(90)
    c_partial = np.where(y == 0, c, -1)
    est = ClassArtifactCompensator(BNNet(), "body.2", device="cpu").fit(X, y, c_partial)
    from skdebias.extraction import ActivationExtractor

    A = ActivationExtractor(est.estimator, "body.2", device="cpu").fit_transform(X[y == 0])
    expected = CAVEstimator().fit(A, c[y == 0]).cav_
    np.testing.assert_allclose(est.cav_, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ inputs and errors
@pytest.mark.parametrize("Est", [GradientPenaltyCorrector, ClassArtifactCompensator])
def test_errors(Est):
    X, y, c = blobs(30)
    net = BNNet()
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


def test_dataset_input_and_skorch_classes():
    from skorch import NeuralNetClassifier

    X, y, c = blobs(60)
    labels = np.array(["a", "b", "c"])[y]
    # skorch trains on class indices; ``classes`` gives the labels of its outputs
    net = NeuralNetClassifier(BNNet, criterion=nn.CrossEntropyLoss, max_epochs=2,
                              train_split=None, verbose=0, classes=["a", "b", "c"]).fit(X, y)
    rr = GradientPenaltyCorrector(net, "body.2", max_epochs=1, lr=0.01, device="cpu",
                                  random_state=0).fit(X, labels, c)
    assert list(rr.classes_) == ["a", "b", "c"]
    assert set(rr.predict(X)) <= {"a", "b", "c"}
    ds = torch.utils.data.TensorDataset(torch.as_tensor(X), torch.as_tensor(y))
    rr2 = GradientPenaltyCorrector(BNNet(), "body.2", max_epochs=1, lr=0.01, device="cpu",
                                   random_state=0).fit(ds, None, c)
    assert rr2.predict(ds).shape == (60,)
    np.testing.assert_allclose(rr2.predict_proba(ds), rr2.predict_proba(X), rtol=1e-5)
