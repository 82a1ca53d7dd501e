"""SpuriosityHeadFinetuner: low-spuriosity fine-tuning of the classification head only."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from torch import nn

from _nets import AnyWidth
from skdebias import ActivationExtractor, SpuriosityRanker, propose_features
from skdebias._utils._runtime import limit_threads
from skdebias.correction import SpuriosityHeadFinetuner
from skdebias.metrics import spurious_gap


def shortcut_data(n_per_class=60, seed=0):
    """2-d data: feature 0 is a shortcut (aligned with the class for 90% of samples), feature 1 core."""
    rng = np.random.RandomState(seed)
    y = np.repeat([0, 1, 2], n_per_class)
    aligned = rng.rand(len(y)) < 0.9
    shortcut = np.where(aligned, y, rng.randint(0, 3, len(y)))
    X = np.c_[shortcut + 0.1 * rng.randn(len(y)), y + 0.6 * rng.randn(len(y))].astype(np.float32)
    return X, y, (shortcut == y).astype(int)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))


def train(net, X, y, epochs=300):
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    Xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    with limit_threads(1):  # tiny tensors: threads only add synchronisation cost
        for _ in range(epochs):
            opt.zero_grad()
            nn.functional.cross_entropy(net(Xt), yt).backward()
            opt.step()
    return net


# ------------------------------------------------------------------ behaviour
def shortcut_spuriosity(X, y):
    """How strongly the shortcut (input feature 0) shows the class: the known spuriosity."""
    return -np.abs(X[:, 0] - y)


def test_only_the_head_changes_and_caller_untouched():
    X, y, _ = shortcut_data()
    Xv, yv, _ = shortcut_data(n_per_class=100, seed=1)
    net = train(mlp(), X, y)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ft = SpuriosityHeadFinetuner(net, max_accuracy_drop=None, k=10, max_epochs=20, lr=5e-2, target_gap=-1.0,
                                 random_state=0, device="cpu")
    with pytest.warns(ConvergenceWarning, match="did not fall below target_gap"):
        ft.fit(X, y, spuriosity=shortcut_spuriosity(X, y),
               validation_data=(Xv, yv, shortcut_spuriosity(Xv, yv)))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # caller's network untouched
    after = ft.module_.state_dict()
    assert ft.layer_ == "2"
    assert torch.equal(after["0.weight"], before["0.weight"])
    assert ft.best_epoch_ > 0 and not torch.equal(after["2.weight"], before["2.weight"])
    assert all(p.requires_grad for p in net.parameters())
    assert ft.n_epochs_ == 20 and len(ft.history_) == 20 and not ft.converged_
    assert ft.stop_reason_ == "max_epochs"
    # the kept head has the lowest validation gap; of equal gaps the highest validation
    # accuracy, of those the latest epoch
    gaps = [h["val_gap"] for h in ft.history_]
    ties = [h for h in ft.history_ if h["val_gap"] == min(gaps)]
    assert len(ties) > 1  # the tie rule is exercised
    top = max(h["val_accuracy"] for h in ties)
    assert ft.best_epoch_ == max(h["epoch"] for h in ties if h["val_accuracy"] == top)
    assert ft.gap_after_ == min(gaps) and ft.accuracy_after_ == top
    assert ft.gap_after_ == pytest.approx(
        spurious_gap(yv, ft.predict(Xv), shortcut_spuriosity(Xv, yv), k=10))


def test_low_spuriosity_samples_are_selected():
    X, y, aligned = shortcut_data()
    net = train(mlp(), X, y)
    # the shortcut feature 0 of the *input* is a proxy of spuriosity here: "aligned" samples high
    spur = -np.abs(X[:, 0] - y)
    ft = SpuriosityHeadFinetuner(net, k=3, max_epochs=1, validation_fraction=0.0,
                                 random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ft.fit(X, y, spuriosity=spur)
    sel = ft.selected_indices_
    assert len(sel) == 9 and np.all(np.bincount(y[sel]) == 3)
    assert aligned[sel].mean() < 0.2  # the least spurious are the misaligned samples
    rnd = clone(ft).set_params(baseline="random")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        rnd.fit(X, y, spuriosity=spur)
    assert aligned[rnd.selected_indices_].mean() > 0.6


def test_early_stopping_and_head_by_name():
    X, y, _ = shortcut_data()
    net = train(mlp(), X, y)
    ranker = SpuriosityRanker(spurious_features=[0])
    ft = SpuriosityHeadFinetuner(net, ranker=ranker, layer="2", target_gap=1.0,
                                 random_state=0, device="cpu").fit(X, y)
    assert ft.converged_ and ft.n_epochs_ == 0 and ft.gap_after_ == ft.gap_before_
    # a reachable target stops early
    ft = SpuriosityHeadFinetuner(net, ranker=ranker, target_gap=ft.gap_before_ + 1e-9,
                                 max_epochs=50, random_state=0, device="cpu")
    ft.fit(X, y)
    assert ft.converged_ and ft.n_epochs_ == 0
    # without a reachable target: all epochs run; with the best gap as target: stops there.
    # The spuriosity is the known shortcut strength (hidden unit 0 of the ranker above is an
    # arbitrary unit: the gap it defines need not move at all)
    Xv, yv, _ = shortcut_data(n_per_class=100, seed=1)
    fit_kw = dict(spuriosity=shortcut_spuriosity(X, y),
                  validation_data=(Xv, yv, shortcut_spuriosity(Xv, yv)))
    kw = dict(k=10, lr=5e-2, max_epochs=30, max_accuracy_drop=None, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        full = SpuriosityHeadFinetuner(net, target_gap=-1.0, **kw).fit(X, y, **fit_kw)
    gaps = [h["val_gap"] for h in full.history_]
    assert full.gap_before_ > 0.3  # the vanilla MLP relies on the shortcut
    assert full.n_epochs_ == 30 and min(gaps) < full.gap_before_ - 0.1  # fine-tuning lowers it
    best = int(np.argmin(gaps))
    stop = SpuriosityHeadFinetuner(net, target_gap=gaps[best] + 1e-9, **kw).fit(X, y, **fit_kw)
    assert stop.converged_ and stop.n_epochs_ == best + 1 and stop.stop_reason_ == "target_gap"
    assert [h["val_gap"] for h in stop.history_] == gaps[:best + 1]
    assert stop.best_epoch_ == best + 1 and stop.gap_after_ == gaps[best]


def test_accuracy_guard_keeps_only_admissible_heads():
    X, y, _ = shortcut_data()
    Xv, yv, _ = shortcut_data(n_per_class=100, seed=1)
    net = train(mlp(), X, y)
    fit_kw = dict(spuriosity=shortcut_spuriosity(X, y),
                  validation_data=(Xv, yv, shortcut_spuriosity(Xv, yv)))
    kw = dict(k=10, lr=2e-1, max_epochs=30, target_gap=-1.0, random_state=0, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        free = SpuriosityHeadFinetuner(net, max_accuracy_drop=None, **kw).fit(X, y, **fit_kw)
        guarded = SpuriosityHeadFinetuner(net, max_accuracy_drop=0.02, **kw).fit(X, y, **fit_kw)
    # unguarded, the large learning rate costs training accuracy, and the head with the lowest
    # gap is one of those epochs; the guard keeps an admissible one and trains on past the others
    floor = free.train_accuracy_before_ - 0.02
    assert free.train_accuracy_after_ < floor
    assert guarded.stop_reason_ == "max_epochs" and guarded.n_epochs_ == 30
    flags = [h["admissible"] for h in guarded.history_]
    assert flags == [h["train_accuracy"] >= floor for h in guarded.history_]
    assert not all(flags) and any(flags[flags.index(False):])  # training went on past a break
    # the first epochs break the guard, a later one is kept (a guard that stopped at the first
    # break would keep the original head)
    assert not flags[0] and guarded.best_epoch_ > flags.index(True)
    assert guarded.history_[guarded.best_epoch_ - 1]["admissible"]
    gaps = [h["val_gap"] for h in guarded.history_ if h["admissible"]]
    assert guarded.gap_after_ == min(gaps)
    assert guarded.train_accuracy_after_ >= floor
    assert guarded.train_accuracy_after_ == pytest.approx(np.mean(guarded.predict(X) == y))
    with pytest.raises(ValueError, match="max_accuracy_drop must be"):
        SpuriosityHeadFinetuner(net, max_accuracy_drop=1.5).fit(X, y, **fit_kw)


def test_validation_data_and_explicit_spuriosity():
    X, y, _ = shortcut_data()
    Xv, yv, _ = shortcut_data(seed=1)
    net = train(mlp(), X, y)
    ranker = SpuriosityRanker(spurious_features=[0])
    ft = SpuriosityHeadFinetuner(net, ranker=ranker, max_epochs=3, random_state=0,
                                 device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ft.fit(X, y, validation_data=(Xv, yv))
    assert ft.validation_indices_ is None and ft.ranker_ is not None
    assert set(ft.selected_indices_) <= set(range(len(y)))
    with pytest.raises(ValueError, match="validation_data needs it too"):
        ft.fit(X, y, spuriosity=np.zeros(len(y)), validation_data=(Xv, yv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ft.fit(X, y, spuriosity=X[:, 0], validation_data=(Xv, yv, Xv[:, 0]))
    assert ft.ranker_ is None


@pytest.mark.parametrize("kwargs, fit_kwargs, match", [
    ({"k": 100}, {}, "k=100 is larger than class 0"),
    ({"ranker": None}, {}, "No spuriosity"),
    ({"baseline": "lowest"}, {}, "baseline='lowest' is not valid"),
    ({"layer": "1"}, {}, "is a ReLU"),
    ({"layer": "0"}, {}, "is not the network's output"),
    ({"layer": "nope"}, {}, "Unknown layer 'nope'"),
    ({"target_gap": 2}, {}, r"target_gap must be a finite number >= -1 and <= 1, got 2"),
    ({"validation_fraction": 1.0}, {}, "validation_fraction must be"),
    ({}, {"validation_data": (1, 2, 3, 4)}, "validation_data must be"),
    ({}, {"spuriosity": np.zeros(3)}, "spuriosity has 3 entries"),
])
def test_errors(kwargs, fit_kwargs, match):
    X, y, _ = shortcut_data()
    params = dict(ranker=SpuriosityRanker(spurious_features=[0]), max_epochs=1, device="cpu")
    params.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SpuriosityHeadFinetuner(mlp(), **params).fit(X, y, **fit_kwargs)


def test_labels_must_be_network_outputs():
    X, y, _ = shortcut_data()
    ft = SpuriosityHeadFinetuner(mlp(), ranker=SpuriosityRanker(spurious_features=[0]),
                                 device="cpu")
    with pytest.raises(ValueError, match="not among the network's classes"):
        ft.fit(X, y + 3)


def test_head_finetuner_keeps_the_copys_flags_and_does_not_reseed_torch():
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


# ------------------------------------------------------------------ acceptance on colored digits
def test_acceptance_colored_digits_finetuning_closes_gap(colored95_fg):
    """Direction of issue 4's effect on one fast configuration.

    Issue 4's target (the gap halved for <= 3 points) is a benchmark row
    (benchmarks/spuriosity.py), met in one of six runs there. This fixture halves it on this CI
    machine's CPU (0.58 -> 0.24; 0.49 and 0.48 with avx2 / default kernels) but not on another
    CPU with another torch build (0.54 -> 0.36), so the test asserts what held everywhere: the
    gap falls by a quarter or more, for <= 3 points of in-distribution accuracy.
    """
    c95 = colored95_fg
    data, net, vi, ti = c95.data, c95.net, c95.val, c95.test
    ext = ActivationExtractor(net, "classifier.1", device="cpu").fit(data.X)
    A, A_unb = ext.transform(data.X), ext.transform(data.X_test)
    prop = propose_features(A_unb[vi], data.y_test[vi], net.module_.classifier[2], top=5)
    cv = data.concept_test[vi]
    feats = {c: [int(p.features[int(np.argmax([cv[t].mean() for t in p.top_samples]))])]
             for c, p in prop.items()}
    ranker = SpuriosityRanker(spurious_features=feats).fit(A, data.y)
    y_t = data.y_test[ti]
    s_t = ranker.score_samples(A_unb[ti], y_t)

    def measure(est):
        gap = spurious_gap(y_t, est.predict(data.X_test[ti]), s_t, k=10)
        return gap, np.mean(est.predict(data.X_test_biased[ti]) == y_t)

    gap0, acc0 = measure(net)
    # the settings of benchmarks/spuriosity.py: k=20 per class, early stopping on the val gap,
    # training accuracy guarded to 2 points
    kw = dict(ranker=ranker, layer="classifier.2", k=20, lr=1e-2, max_epochs=100,
              target_gap=0.05, max_accuracy_drop=0.02, device="cpu", random_state=0)
    val = (data.X_test[vi], data.y_test[vi])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        low = SpuriosityHeadFinetuner(net, **kw).fit(data.X, data.y, validation_data=val)
        rnd = SpuriosityHeadFinetuner(net, baseline="random", **kw).fit(
            data.X, data.y, validation_data=val)
    gap1, acc1 = measure(low)
    gap2, _ = measure(rnd)
    print("gaps vanilla / low-k / random-k:", gap0, gap1, gap2)
    assert gap0 >= 0.15, gap0
    assert gap1 <= 0.75 * gap0 and gap0 - gap1 >= 0.1, (gap0, gap1)
    assert acc1 >= acc0 - 0.03, (acc0, acc1)  # in-distribution (rho=0.95) accuracy
    assert not np.array_equal(np.sort(rnd.selected_indices_), np.sort(low.selected_indices_))
    assert low.train_accuracy_after_ >= low.train_accuracy_before_ - 0.02
    assert all(torch.equal(a, b) for a, b in zip(net.module_.state_dict().values(),
                                                  ext.module_.state_dict().values()))
