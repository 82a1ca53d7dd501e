"""SpuriosityRanker and propose_features."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from skdebias import CAVEstimator, SpuriosityRanker, propose_features
from skdebias.metrics import spurious_gap


def toy(n_per_class=30, n_features=6, seed=0):
    rng = np.random.RandomState(seed)
    y = np.repeat([0, 1, 2], n_per_class)
    A = rng.rand(len(y), n_features).astype(np.float32)
    return A, y


# ------------------------------------------------------------------ formula and ranking
def test_spuriosity_is_mean_z_score_within_class():
    A, y = toy()
    feats = {0: [1, 3], 1: [2], 2: [0, 4, 5]}
    s = SpuriosityRanker(spurious_features=feats).fit(A, y).score_samples(A, y)
    for c, f in feats.items():
        B = A[y == c][:, f].astype(np.float64)
        expected = ((B - B.mean(0)) / B.std(0)).mean(1)
        np.testing.assert_allclose(s[y == c], expected, rtol=1e-5, atol=1e-6)


def test_statistics_come_from_fit_data():
    A, y = toy()
    r = SpuriosityRanker(spurious_features=[2]).fit(A, y)
    B = A + 1.0  # shifted activations score higher than the fit data
    assert np.all(r.score_samples(B, y) > r.score_samples(A, y))


def test_rank_ascending_within_class_and_split_ends():
    A, y = toy()
    r = SpuriosityRanker(spurious_features={0: [1], 2: [3]}, k=4).fit(A, y)
    s = r.score_samples(A, y)
    order = r.rank(A, y)
    assert set(order) == {0, 2}  # class 1 has no spurious features: not ranked
    for c, idx in order.items():
        assert np.all(y[idx] == c) and len(idx) == np.sum(y == c)
        assert np.all(np.diff(s[idx]) >= 0)
    low, high = r.split(A, y)
    assert len(low) == len(high) == 8
    for c in (0, 2):
        lc, hc = low[y[low] == c], high[y[high] == c]
        # high is the right end of the ascending sort: it holds the maximum
        assert s[hc].max() == s[y == c].max() and s[lc].min() == s[y == c].min()
        assert s[lc].max() < s[hc].min()
    assert np.all(np.isnan(s[y == 1]))


def test_transform_pipeline_friendly():
    A, y = toy()
    r = SpuriosityRanker(spurious_features={0: [1], 1: [2], 2: [3]}).fit(A, y)
    T = r.transform(A)
    assert T.shape == (len(y), 3) and T.dtype == np.float32
    np.testing.assert_allclose(T[np.arange(len(y)), y], r.score_samples(A, y))
    np.testing.assert_allclose(r.transform(A, y=y)[:, 0], r.score_samples(A, y))
    assert list(r.get_feature_names_out()) == ["spuriosity_0", "spuriosity_1", "spuriosity_2"]
    pipe = Pipeline([("scale", StandardScaler()),
                     ("rank", SpuriosityRanker(spurious_features=[0]))])
    assert pipe.fit_transform(A, y).shape == (len(y), 3)


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.1, 50.0), shift=st.floats(-10.0, 10.0), seed=st.integers(0, 10_000))
def test_ranking_invariant_to_affine_rescaling(scale, shift, seed):
    A, y = toy(seed=seed)
    r1 = SpuriosityRanker(spurious_features=[1, 4]).fit(A, y)
    B = A.astype(np.float64) * scale + shift
    r2 = SpuriosityRanker(spurious_features=[1, 4]).fit(B, y)
    np.testing.assert_allclose(r1.score_samples(A, y), r2.score_samples(B, y), atol=1e-4)


def test_cav_modes_agree():
    A, y = toy(n_per_class=40)
    rng = np.random.RandomState(1)
    t = rng.randint(0, 2, len(y))
    A = A + 2.0 * t[:, None] * np.eye(A.shape[1], dtype=np.float32)[2]
    cav = CAVEstimator().fit(A, t)
    s_fitted = SpuriosityRanker(cav=cav).fit(A, y).score_samples(A, y)
    s_vec = SpuriosityRanker(cav=cav.cav_ * 3).fit(A, y).score_samples(A, y)
    s_unfitted = SpuriosityRanker(cav=CAVEstimator()).fit(A, y, concept_labels=t).score_samples(A, y)
    np.testing.assert_allclose(s_fitted, s_vec, atol=1e-6)
    np.testing.assert_allclose(s_fitted, s_unfitted, atol=1e-6)
    # concept samples rank high
    assert s_fitted[t == 1].mean() > s_fitted[t == 0].mean() + 1.0
    r = SpuriosityRanker(cav={1: cav.cav_}).fit(A, y)
    assert list(r.scored_classes_) == [1]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, match", [
    ({}, "needs spurious features"),
    ({"spurious_features": [0], "cav": np.ones(6)}, "not both"),
    ({"spurious_features": {0: []}}, r"spurious_features\[0\] has no spurious features"),
    ({"spurious_features": {7: [0]}}, "class 7, which is not among the classes"),
    ({"spurious_features": {0: [6]}}, "A has 6 features"),
    ({"spurious_features": {0: [0.5]}}, "integer feature indices"),
    ({"spurious_features": {}}, "empty dict"),
    ({"cav": np.ones(5)}, "has 5 entries, but A has 6 features"),
    ({"cav": np.zeros(6)}, "non-zero"),
    ({"cav": CAVEstimator()}, "unfitted CAVEstimator"),
    ({"spurious_features": [0], "k": 0}, "k must be a positive integer"),
])
def test_fit_errors(kwargs, match):
    A, y = toy()
    with pytest.raises(ValueError, match=match):
        SpuriosityRanker(**kwargs).fit(A, y)


def test_errors_after_fit():
    A, y = toy()
    r = SpuriosityRanker(spurious_features={0: [1]}).fit(A, y)
    with pytest.raises(ValueError, match="Class 1 has no spurious features"):
        r.rank(A, y, classes=[1])
    with pytest.raises(ValueError, match="k=31 is larger than class 0, which has 30 samples"):
        r.split(A, y, k=31)
    with pytest.raises(ValueError, match=r"classes \[5\] that were not seen in fit"):
        r.score_samples(A, np.where(y == 2, 5, y))
    with pytest.raises(ValueError, match="one label per sample"):
        r.score_samples(A, y[:-1])
    with pytest.warns(UserWarning, match="overlap"):
        r.split(A, y, k=20)


def test_clone_and_params():
    r = SpuriosityRanker(spurious_features={0: [1]}, k=3)
    r2 = clone(r)
    assert r2.get_params() == r.get_params() and not hasattr(r2, "mean_")


# ------------------------------------------------------------------ propose_features
def test_propose_features_importance_uses_correct_samples():
    rng = np.random.RandomState(0)
    y = np.repeat([0, 1], 20)
    A = rng.rand(40, 4)
    A[y == 0, 2] += 3.0  # feature 2 drives class 0
    W = np.array([[0.0, 0.0, 1.0, 0.5], [0.0, 1.0, 0.0, 0.0]])
    prop = propose_features(A, y, W, top=3, n_images=5)
    assert prop[0].features[0] == 2
    assert np.all(np.diff(prop[0].importance) <= 0)
    tops = prop[0].top_samples
    assert tops.shape == (3, 5) and np.all(y[tops] == 0)
    assert np.all(np.diff(A[tops[0], 2]) <= 0)
    # importance only averages correctly classified samples: make the best samples of
    # feature 3 "misclassified" and feature 3 drops below
    A2 = A.copy()
    A2[:10, 3] += 20.0
    y_pred = y.copy()
    y_pred[:10] = 1
    with_all = propose_features(A2, y, W, top=1, y_pred=np.zeros(40, dtype=int))[0].features
    only_correct = propose_features(A2, y, W, top=1, y_pred=y_pred)[0].features
    assert with_all[0] == 3 and only_correct[0] == 2


def test_propose_features_accepts_linear_and_errors():
    import torch

    A, y = toy(n_features=4)
    lin = torch.nn.Linear(4, 3)
    prop = propose_features(A, y, lin, top=2)
    assert set(prop) == {0, 1, 2} and prop[1].features.shape == (2,)
    with pytest.raises(ValueError, match=r"head_weight must have shape \(n_classes, 4\)"):
        propose_features(A, y, np.ones((3, 5)))
    with pytest.raises(ValueError, match="class indices of the head's outputs"):
        propose_features(A, y + 5, np.ones((3, 4)))
    with pytest.raises(ValueError, match="top must be a positive integer"):
        propose_features(A, y, np.ones((3, 4)), top=0)


# ------------------------------------------------------------------ acceptance on built-in data
def _labeller(proposals, concept):
    """The simulated person: the proposed feature whose top images most often show the concept."""
    return {c: [int(p.features[int(np.argmax([concept[t].mean() for t in p.top_samples]))])]
            for c, p in proposals.items()}


def _aligned_above_median(s, y, concept):
    hits = np.concatenate([s[(y == c) & (concept == 1)] > np.median(s[y == c])
                           for c in np.unique(y)])
    return hits.mean(), hits.size


def test_acceptance_colored_digits_ranking_and_gap(colored95_bg):
    from skdebias import ActivationExtractor

    c95 = colored95_bg
    data, net, vi, ti = c95.data, c95.net, c95.val, c95.test
    ext = ActivationExtractor(net, "classifier.1", device="cpu").fit(data.X)
    A, A_unb = ext.transform(data.X), ext.transform(data.X_test)
    prop = propose_features(A_unb[vi], data.y_test[vi], net.module_.classifier[2], top=5)
    ranker = SpuriosityRanker(spurious_features=_labeller(prop, data.concept_test[vi]))
    ranker.fit(A, data.y)
    s = ranker.score_samples(A_unb, data.y_test)
    share, n_aligned = _aligned_above_median(s, data.y_test, data.concept_test)
    assert n_aligned >= 30
    assert share >= 0.9, share
    # the gap of the vanilla network on the held-out half is large
    gap = spurious_gap(data.y_test[ti], net.predict(data.X_test[ti]), s[ti], k=10)
    assert gap >= 0.15, gap


@pytest.fixture(scope="module")
def brightness_digits():
    """Artifact digits where the vanilla net relies on the artifact: "brightness" in 90% of the
    class-0 training images (the attacked set, every image brightened, is classified as 0), and a
    SmallCNN trained on them (8 epochs). With the red patch in 30% of class 0 (the shared
    ``artifact_net``) the net barely uses the patch, so none of the penultimate features proposed
    for class 0 encodes it cleanly (best single feature: ~84% of the patched images above the
    class median): there is no spurious feature to find."""
    from skdebias.datasets import make_artifact_digits
    from skdebias.models import SmallCNN, make_classifier

    data = make_artifact_digits(target_class=0, p=0.9, artifact="brightness", random_state=0)
    net = make_classifier(SmallCNN, max_epochs=8, lr=2e-3, device="cpu", random_state=0)
    return data, net.fit(data.X, data.y)


def test_acceptance_artifact_digits_ranking(brightness_digits):
    from skdebias import ActivationExtractor

    data, net = brightness_digits
    # the vanilla net relies on the artifact: brightened images of other classes become 0
    attacked = net.predict(data.add_artifact(data.X_test))
    assert np.mean(attacked[data.y_test != 0] == 0) > 0.5
    ext = ActivationExtractor(net, "classifier.1", device="cpu").fit(data.X)
    A = ext.transform(data.X)
    # new images: a random half of the class-0 test images gets the artifact; features are
    # proposed and labelled on one half of the test set and the ranking is checked on the other
    rng = np.random.RandomState(0)
    X_mix, c_mix = data.X_test.copy(), np.zeros(len(data.y_test), dtype=int)
    zeros = np.flatnonzero(data.y_test == 0)
    poison = rng.choice(zeros, len(zeros) // 2, replace=False)
    X_mix[poison], c_mix[poison] = data.add_artifact(data.X_test[poison]), 1
    A_mix = ext.transform(X_mix)
    half = rng.rand(len(data.y_test)) < 0.5
    prop = propose_features(A_mix[half], data.y_test[half], net.module_.classifier[2], top=5,
                            classes=[0])
    ranker = SpuriosityRanker(spurious_features=_labeller(prop, c_mix[half])).fit(A, data.y)
    s_mix = ranker.score_samples(A_mix, data.y_test)
    m0 = (data.y_test == 0) & ~half
    share_test, n_art = _aligned_above_median(s_mix[m0], data.y_test[m0], c_mix[m0])
    assert n_art >= 10 and share_test >= 0.9, share_test
    # on the training images of class 0 (90% with the artifact, so the median criterion does not
    # apply): the artifact images rank above the clean ones
    from sklearn.metrics import roc_auc_score

    zero = data.y == 0
    s = ranker.score_samples(A[zero], data.y[zero])
    assert roc_auc_score(data.concept[zero], s) >= 0.9
