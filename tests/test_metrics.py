"""skdebias.metrics: concept sensitivity, the spurious gap, counterfactual bias, the debias
scorer and the accuracy metrics.

Networks with ``ReLU(inplace=True)`` (VGG, ResNet) must not change the measured gradients;
metrics must not depend on the order of tied samples.
"""

import numpy as np
import pytest
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import make_scorer
from sklearn.model_selection import cross_val_score
from torch import nn

from _nets import INPLACE_CAV, inplace_net
from skdebias.metrics import (
    DebiasScorer,
    artifact_relevance,
    attacked_accuracy,
    concept_sensitivity,
    counterfactual_bias,
    counterfactual_flip_rate,
    spurious_gap,
    worst_group_accuracy,
)


# ------------------------------------------------------------------ concept_sensitivity
def test_gradient_at_the_layer_despite_inplace_relu_after_it(gray_images):
    X = gray_images
    reference = concept_sensitivity(inplace_net(), X, "1", INPLACE_CAV, target=0)
    net = inplace_net(inplace_after=True)
    trainable = concept_sensitivity(net, X, "1", INPLACE_CAV, target=0)
    for p in net.parameters():
        p.requires_grad_(False)
    frozen = concept_sensitivity(net, X, "1", INPLACE_CAV, target=0)
    for got in (trainable, frozen):
        assert got["mean_abs"] == pytest.approx(reference["mean_abs"], rel=1e-6)
        assert got["tcav"] == reference["tcav"]


# ------------------------------------------------------------------ spurious_gap
def test_spurious_gap_values_and_errors():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([3.0, 2.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0])
    pred = np.array([0, 0, 1, 1, 1, 1, 1, 1])  # class 0 right only when spurious
    gap, per = spurious_gap(y, pred, s, k=2, return_per_class=True)
    assert per == {0: 1.0, 1: 0.0} and gap == 0.5
    s_nan = s.copy()
    s_nan[y == 1] = np.nan
    assert spurious_gap(y, pred, s_nan, k=2) == 1.0  # class 1 skipped
    with pytest.raises(ValueError, match="k=5 is larger than class 0"):
        spurious_gap(y, pred, s, k=5)
    with pytest.raises(ValueError, match="NaN for every sample"):
        spurious_gap(y, pred, np.full(8, np.nan), k=2)
    with pytest.raises(ValueError, match="mixes NaN"):
        spurious_gap(y, pred, np.r_[np.nan, s[1:]], k=2)


def test_spurious_gap_as_routed_scorer():
    rng = np.random.RandomState(0)
    y = np.repeat([0, 1], 60)
    spur = rng.rand(120)
    # the feature shows the class only for spurious samples: a biased classifier
    A = np.c_[np.where(spur > 0.5, y, rng.randint(0, 2, 120)) + 0.1 * rng.randn(120)]
    with sklearn.config_context(enable_metadata_routing=True):
        scorer = make_scorer(spurious_gap, greater_is_better=False, k=5)
        scorer.set_score_request(spuriosity=True)
        scores = cross_val_score(LogisticRegression(), A, y, scoring=scorer, cv=3,
                                 params={"spuriosity": spur})
    assert scores.shape == (3,) and np.all(scores < -0.2)  # sign-flipped gap


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


# ------------------------------------------------------------------ DebiasScorer
def test_debias_scorer_without_reference_sensitivity(gray_images):
    X = gray_images
    net = inplace_net()
    y = np.array([0, 1, 2, 0, 1, 2])
    s = concept_sensitivity(net, X, "1", INPLACE_CAV, target=0)["mean_abs"]
    assert s > 0

    class Scored:  # anything with predict and a network in module_
        module_ = net

        def predict(self, X_):
            with torch.no_grad():
                return net(torch.as_tensor(X_)).argmax(1).numpy()

    def score(reference):
        return DebiasScorer(layer="1", cav=INPLACE_CAV, reference=reference, sensitivity_weight=1.0,
                            target=0)(Scored(), X, y)

    assert score(0.0) == 0.0  # sensitivity grew from zero: nothing was removed
    assert score(s / 2) == 0.0
    assert score(10 * s) == pytest.approx(0.9)


# ------------------------------------------------------------------ counterfactual_bias
def test_counterfactual_bias_values():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.log(x[:, :2])

    X = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    X_cf = np.array([[0.5, 0.5], [0.6, 0.4]], dtype=np.float32)
    y = np.array([0, 1])
    assert counterfactual_bias(Fixed(), X, X_cf, y) == pytest.approx((0.4 + 0.4) / 2, abs=1e-6)
    assert counterfactual_bias(Fixed(), X, X_cf, y, signed=True) == pytest.approx(0.4, abs=1e-6)
    assert counterfactual_bias(Fixed(), X_cf, X, y, signed=True) == pytest.approx(-0.4, abs=1e-6)
    with pytest.raises(ValueError, match="same shape as X"):
        counterfactual_bias(Fixed(), X, X_cf[:1], y)
    with pytest.raises(ValueError, match="y has 1 labels"):
        counterfactual_bias(Fixed(), X, X_cf, y[:1])
    with pytest.raises(ValueError,
                       match=r"labels \[2\] that are not among the network.s classes \[0, 1\]"):
        counterfactual_bias(Fixed(), X, X_cf, np.array([0, 2]))


def test_counterfactual_flip_rate_counts_changed_decisions_not_confidence():
    class Scaled(nn.Module):  # logits = x / temperature
        def __init__(self, temperature=1.0):
            super().__init__()
            self.temperature = temperature

        def forward(self, x):
            return x / self.temperature

    X = np.array([[3.0, 0.0], [0.0, 3.0], [2.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    X_cf = np.array([[0.0, 3.0], [3.0, 0.0], [2.5, 1.0], [0.0, 1.0]], dtype=np.float32)
    y = np.array([0, 1, 0, 0])
    assert counterfactual_flip_rate(Scaled(), X, X_cf) == pytest.approx(0.75)
    # softening the outputs lowers the bias but leaves every decision as it was
    biases = [counterfactual_bias(Scaled(t), X, X_cf, y) for t in (1.0, 4.0, 16.0)]
    assert biases[0] > biases[1] > biases[2]
    assert [counterfactual_flip_rate(Scaled(t), X, X_cf) for t in (4.0, 16.0)] == [0.75, 0.75]
    assert counterfactual_flip_rate(Scaled(), X, X) == 0.0
    with pytest.raises(ValueError, match="same shape as X"):
        counterfactual_flip_rate(Scaled(), X, X_cf[:1])
    with pytest.raises(ValueError, match="0 sample"):
        counterfactual_flip_rate(Scaled(), X[:0], X_cf[:0])


def test_counterfactual_bias_accepts_float_and_skorch_labels(gray_images):
    X = gray_images
    from skorch import NeuralNetClassifier

    net = inplace_net()
    y_int = np.array([0, 1, 2, 0, 1, 2])
    X_cf = X[::-1].copy()
    ref = counterfactual_bias(net, X, X_cf, y_int)
    assert counterfactual_bias(net, X, X_cf, y_int.astype(float)) == pytest.approx(ref)
    with pytest.raises(ValueError, match=r"labels \[3\] that are not among the network's"):
        counterfactual_bias(net, X, X_cf, np.array([0, 1, 2, 3, 1, 2]))
    # a fitted skorch classifier with string classes: labels are mapped to output columns
    clf = NeuralNetClassifier(inplace_net(), criterion=nn.CrossEntropyLoss, max_epochs=1,
                              train_split=None, lr=0.0, device="cpu", classes=["a", "b", "c"])
    clf.fit(X, y_int)
    labels = np.array(["a", "b", "c", "a", "b", "c"])
    assert counterfactual_bias(clf, X, X_cf, labels) == pytest.approx(
        counterfactual_bias(clf.module_, X, X_cf, y_int), rel=1e-5)


# ------------------------------------------------------------------ accuracy metrics
def test_worst_group_accuracy():
    y = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 1])
    groups = np.array([0, 0, 1, 1, 2, 2])
    worst, per = worst_group_accuracy(y, pred, groups, return_groups=True)
    assert worst == 0.5 and per == {0: 1.0, 1: 0.5, 2: 1.0}
    # several columns: each distinct row is a group
    worst, per = worst_group_accuracy(y, pred, np.c_[y, [0, 1, 1, 0, 0, 1]], return_groups=True)
    assert per == {(0, 0): 1.0, (0, 1): 0.5, (1, 0): 1.0, (1, 1): 1.0} and worst == 0.5
    with pytest.raises(ValueError, match="must have the same length, got 6, 5 and 6"):
        worst_group_accuracy(y, pred[:5], groups)
    with pytest.raises(ValueError, match="needs at least one sample"):
        worst_group_accuracy([], [], [])
    with pytest.raises(ValueError, match=r"groups must be 1-d or 2-d, got shape \(6, 1, 1\)"):
        worst_group_accuracy(y, pred, groups[:, None, None])


def _sum_sign_net():
    """(n, 1, 2, 2) -> class 0 where the pixel sum is positive, else class 1."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
    return net


def test_attacked_accuracy():
    X = -np.ones((3, 1, 2, 2), np.float32)  # predicted 1
    y = np.zeros(3, dtype=int)
    assert attacked_accuracy(_sum_sign_net(), X, y, lambda X_: X_ + 2.0) == 1.0
    assert attacked_accuracy(_sum_sign_net(), X, y, lambda X_: X_) == 0.0
    with pytest.raises(ValueError, match="add_artifact must be a callable"):
        attacked_accuracy(_sum_sign_net(), X, y, "patch")
    with pytest.raises(ValueError, match="y has 2 labels but X has 3 samples"):
        attacked_accuracy(_sum_sign_net(), X, y[:2], lambda X_: X_)


def test_artifact_relevance_is_the_share_inside_the_mask():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 1.0]]))
    X = np.ones((2, 1, 2, 2), np.float32)
    top_row = np.array([[1, 1], [0, 0]])
    # the gradient of logit 0 is (1, 2, 3, 4): the top row holds 3 / 10 of it
    share = artifact_relevance(net, X, top_row, target=0, method="gradient", device="cpu")
    assert share == pytest.approx(0.3)
    masks = np.stack([top_row, 1 - top_row])  # one mask per sample
    share = artifact_relevance(net, X, masks, target=0, method="gradient", device="cpu")
    assert share == pytest.approx((0.3 + 0.7) / 2)
    assert np.isnan(artifact_relevance(net, X, np.zeros((2, 2)), target=0, method="gradient",
                                       device="cpu"))  # no sample has a mask
    with pytest.raises(ValueError, match=r"masks must have shape \(2, 2, 2\) or \(2, 2\)"):
        artifact_relevance(net, X, np.ones((3, 2, 2)), target=0, method="gradient", device="cpu")
