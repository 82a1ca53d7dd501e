"""Group-balanced reweighting: group_balanced_weights and GroupBalancedClassifier."""

import numpy as np
import pytest
import torch
from skorch import NeuralNetClassifier
from torch import nn

from _nets import MLP
from skdebias.correction import GroupBalancedClassifier, group_balanced_weights

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_group_balanced_classifier(bias_toy):
    X, y, bias = bias_toy
    params = dict(optimizer=torch.optim.Adam, lr=1e-2, max_epochs=2, batch_size=32,
                  train_split=None, verbose=0)
    torch.manual_seed(0)
    clf = GroupBalancedClassifier(MLP, **params).fit(X, y, bias=bias)
    assert np.allclose(clf.sample_weight_, group_balanced_weights(y, bias))
    assert clf.predict(X).shape == (len(y),)
    # uniform weights give the same model as plain cross-entropy training
    torch.manual_seed(0)
    ones = GroupBalancedClassifier(MLP, **params).fit(X, y, sample_weight=np.ones(len(y)))
    torch.manual_seed(0)
    plain = NeuralNetClassifier(MLP, criterion=nn.CrossEntropyLoss, **params).fit(X, y)
    assert np.allclose(ones.predict_proba(X), plain.predict_proba(X), atol=1e-5)
    with pytest.raises(ValueError, match="needs bias labels"):
        GroupBalancedClassifier(MLP, **params).fit(X, y)
    with pytest.raises(ValueError, match="not both"):
        GroupBalancedClassifier(MLP, **params).fit(X, y, bias=bias, sample_weight=np.ones(len(y)))
    with pytest.raises(ValueError, match="finite, >= 0"):
        GroupBalancedClassifier(MLP, **params).fit(X, y, sample_weight=-np.ones(len(y)))


def test_sample_weight_error_names_the_sample(bias_toy):
    X, y, _ = bias_toy
    w = np.ones(len(y))
    w[3] = np.nan
    with pytest.raises(ValueError, match="finite, >= 0 and not all zero; sample 3 is nan"):
        GroupBalancedClassifier(MLP, max_epochs=1, train_split=None, verbose=0).fit(
            X, y, sample_weight=w)


def test_partial_fit_uses_the_group_balanced_weights():
    from skdebias.models import SmallCNN

    rng = np.random.RandomState(0)
    X = rng.rand(24, 3, 28, 28)  # float64: converted like in fit
    y, bias = np.arange(24) % 2, (np.arange(24) < 20).astype(int)
    clf = GroupBalancedClassifier(SmallCNN, module__n_classes=2, max_epochs=1, batch_size=8,
                                  train_split=None, verbose=0)
    torch.manual_seed(0)
    clf.partial_fit(X, y, bias=bias)
    np.testing.assert_allclose(clf.sample_weight_, group_balanced_weights(y, bias))
    assert len(clf.history_) == 1
    with pytest.raises(ValueError, match=r"partial_fit needs bias labels \(partial_fit\(X, y"):
        clf.partial_fit(X, y)


def test_a_classifier_that_ends_at_chance_level_warns_naming_max_epochs_and_lr(bias_toy):
    from skdebias.exceptions import ChanceLevelWarning

    X, y, bias = bias_toy
    clf = GroupBalancedClassifier(MLP, optimizer=torch.optim.Adam, lr=0.0, max_epochs=1,
                                  train_split=None, verbose=0)
    with pytest.warns(ChanceLevelWarning, match=r"GroupBalancedClassifier ends its training "
                      r".*train longer \(max_epochs, now 1\) or change lr \(now 0\.0\)"):
        clf.fit(X, y, bias=bias)
