"""CAVEstimator: direction robustness (pattern vs filters), invariances, errors, sklearn API."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone

from skdebias import CAVEstimator, cav_alignment
from skdebias.concepts import CAV_METHODS


def make_concept_data(n, dims, signal, distractor_scale, correlation, seed, iso=0.1):
    """Activations = signal * t * v_true + distractor noise along d + small isotropic noise.

    ``d`` has cosine ``correlation`` with ``v_true``; the distractor noise is the
    same random amplitude on every feature along d, i.e. correlated across features.
    """
    rng = np.random.RandomState(seed)
    v = rng.randn(dims)
    v /= np.linalg.norm(v)
    u = rng.randn(dims)
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    d = correlation * v + np.sqrt(1 - correlation ** 2) * u
    t = rng.randint(0, 2, n)
    A = (signal * t[:, None] * v + distractor_scale * rng.randn(n, 1) * d
         + iso * rng.randn(n, dims))
    return A, t, v


# --------------------------------------------------------------------- direction properties
@settings(deadline=None, max_examples=20)
@given(
    dims=st.integers(2, 32),
    distractor=st.floats(1.0, 3.0),
    correlation=st.floats(0.5, 0.9),
    seed=st.integers(0, 10_000),
)
def test_pattern_robust_filters_diverge_under_correlated_noise(dims, distractor, correlation, seed):
    # n grows with the distractor variance so the pattern's sampling error stays small
    n = int(2000 * distractor ** 2)
    A, t, v = make_concept_data(n, dims, 1.0, distractor, correlation, seed)
    pattern = CAVEstimator(method="pattern").fit(A, t).cav_ @ v
    assert pattern > 0.97
    for method in ("svm", "ridge"):
        filt = CAVEstimator(method=method, random_state=0).fit(A, t).cav_ @ v
        # a filter cancels the distractor, so it tilts away from v_true by about
        # arccos(sqrt(1 - correlation**2)); the pattern does not
        assert filt < 0.95, (method, filt)
        assert filt < pattern - 0.02, (method, filt, pattern)


@settings(deadline=None, max_examples=10)
@given(dims=st.integers(2, 64), seed=st.integers(0, 10_000))
def test_pattern_alignment_improves_with_n(dims, seed):
    cosines = []
    for n in (50, 500, 20_000):
        A, t, v = make_concept_data(n, dims, 1.0, 1.0, 0.7, seed, iso=0.3)
        cosines.append(CAVEstimator().fit(A, t).cav_ @ v)
    assert cosines[-1] > 0.99
    assert cosines[-1] >= cosines[0] - 1e-9


def test_pattern_equals_mean_difference():
    A, t, _ = make_concept_data(300, 8, 1.0, 1.0, 0.5, 0)
    p = CAVEstimator(method="pattern").fit(A, t).cav_
    m = CAVEstimator(method="mean_diff").fit(A, t).cav_
    w = A[t == 1].mean(0) - A[t == 0].mean(0)
    cov = ((A - A.mean(0)) * (t - t.mean())[:, None]).sum(0) / ((t - t.mean()) ** 2).sum()
    np.testing.assert_allclose(cov, w, atol=1e-12)
    np.testing.assert_allclose(p, m, atol=1e-12)
    np.testing.assert_allclose(p, w / np.linalg.norm(w), atol=1e-12)


# --------------------------------------------------------------------- invariances
@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100.0), dims=st.integers(2, 20))
def test_pattern_invariances(seed, scale, dims):
    A, t, _ = make_concept_data(200, dims, 1.0, 1.0, 0.5, seed)
    base = CAVEstimator().fit(A, t).cav_
    perm = np.random.RandomState(seed).permutation(len(t))
    np.testing.assert_allclose(CAVEstimator().fit(A[perm], t[perm]).cav_, base, atol=1e-10)
    np.testing.assert_allclose(CAVEstimator().fit(A * scale, t).cav_, base, atol=1e-8)
    np.testing.assert_allclose(CAVEstimator().fit(A + 3.0, t).cav_, base, atol=1e-8)
    np.testing.assert_allclose(CAVEstimator().fit(A, 1 - t).cav_, -base, atol=1e-10)


@pytest.mark.parametrize("method", ["svm", "ridge", "logistic", "lasso"])
def test_filters_flip_and_scale(method):
    A, t, _ = make_concept_data(400, 6, 2.0, 0.5, 0.3, 1)
    kw = {"alpha": 1e-3} if method == "lasso" else {}
    base = CAVEstimator(method=method, random_state=0, **kw).fit(A, t).cav_
    flipped = CAVEstimator(method=method, random_state=0, **kw).fit(A, 1 - t).cav_
    assert np.linalg.norm(base) == pytest.approx(1.0)
    assert flipped @ base < -0.99


@pytest.mark.parametrize("method", CAV_METHODS)
def test_every_method_finds_clean_concept(method):
    A, t, v = make_concept_data(500, 10, 3.0, 0.0, 0.0, 2, iso=0.5)
    kw = {"alpha": 1e-3} if method == "lasso" else {}
    est = CAVEstimator(method=method, random_state=0, **kw).fit(A, t)
    assert est.cav_ @ v > 0.9
    assert np.linalg.norm(est.cav_) == pytest.approx(1.0)
    assert est.transform(A).shape == (500, 1)
    assert est.score(A, t) > 0.9
    assert set(est.predict(A)) <= set(est.classes_)


def test_transform_is_centred_projection():
    A, t, _ = make_concept_data(100, 4, 1.0, 0.0, 0.0, 3)
    est = CAVEstimator().fit(A, t)
    np.testing.assert_allclose(est.transform(A)[:, 0], (A - A.mean(0)) @ est.cav_)
    np.testing.assert_allclose(est.decision_function(A), est.transform(A)[:, 0] - est.threshold_)


def test_string_labels_and_classes():
    A, t, v = make_concept_data(200, 4, 3.0, 0.0, 0.0, 4)
    labels = np.where(t == 1, "ruler", "clean")
    est = CAVEstimator().fit(A, labels)
    # classes_ sorted: "clean" < "ruler", so the CAV points towards "ruler"
    assert list(est.classes_) == ["clean", "ruler"]
    assert est.cav_ @ v > 0.9


def test_cav_alignment():
    rng = np.random.RandomState(0)
    clean = rng.randn(50, 5)
    v = np.eye(5)[2]
    art = clean + 2 * v + 0.01 * rng.randn(50, 5)
    res = cav_alignment(v, art, clean)
    assert res["cos_mean_diff"] > 0.99 and res["mean_cos"] > 0.99
    assert cav_alignment(-v, art, clean)["cos_mean_diff"] < -0.99
    with pytest.raises(ValueError, match="Paired activations must have shape"):
        cav_alignment(np.ones(3), art, clean)


# --------------------------------------------------------------------- errors
def test_error_one_class():
    with pytest.raises(ValueError, match="one class only"):
        CAVEstimator().fit(np.random.rand(10, 3), np.ones(10))


def test_error_more_than_two_classes():
    with pytest.raises(ValueError, match="Only binary classification is supported"):
        CAVEstimator().fit(np.random.rand(9, 3), np.arange(9) % 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_error_nan_inf(bad):
    A = np.random.rand(10, 3)
    A[2, 1] = bad
    with pytest.raises(ValueError, match="NaN|infinity"):
        CAVEstimator().fit(A, np.arange(10) % 2)


def test_error_length_mismatch():
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        CAVEstimator().fit(np.random.rand(10, 3), np.arange(9) % 2)


def test_error_unknown_method():
    with pytest.raises(ValueError, match=r"method='pca' is not valid; choose one of"):
        CAVEstimator(method="pca").fit(np.random.rand(10, 3), np.arange(10) % 2)


@pytest.mark.parametrize("name,value", [("C", 0), ("alpha", -1.0), ("C", "big")])
def test_error_bad_regularisation(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a positive number"):
        CAVEstimator(**{name: value}).fit(np.random.rand(10, 3), np.arange(10) % 2)


def test_error_missing_labels():
    with pytest.raises(ValueError, match="concept_labels .0/1 per sample. are required"):
        CAVEstimator().fit(np.random.rand(10, 3), None)


def test_error_zero_lasso_cav():
    A, t, _ = make_concept_data(100, 4, 0.1, 0.0, 0.0, 5)
    with pytest.raises(ValueError, match="CAV is zero.*smaller alpha"):
        CAVEstimator(method="lasso", alpha=100.0).fit(A, t)


def test_error_transform_wrong_features():
    est = CAVEstimator().fit(np.random.rand(10, 3), np.arange(10) % 2)
    with pytest.raises(ValueError, match="X has 4 features"):
        est.transform(np.random.rand(5, 4))


# --------------------------------------------------------------------- sklearn API
def test_clone_and_params_round_trip():
    est = CAVEstimator(method="svm", C=0.5, random_state=3)
    cloned = clone(est)
    assert cloned.get_params() == est.get_params()
    cloned.set_params(method="ridge", alpha=2.0)
    assert cloned.get_params()["method"] == "ridge" and est.method == "svm"
    A, t, _ = make_concept_data(100, 4, 2.0, 0.0, 0.0, 6)
    fitted = est.fit(A, t)
    assert fitted is est
    assert not hasattr(clone(est), "cav_")


def test_spatial_mean_tcav_is_the_share_of_positive_directional_derivatives():
    import torch

    from skdebias import spatial_mean_tcav as tcav_score

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -1.0]]))
    X = np.random.RandomState(0).rand(6, 2).astype("float32")
    # d logit_0 / d a = (3, 0): positive along +e0, negative along -e0
    assert tcav_score(net, X, "0", [1.0, 0.0], target=0) == 1.0
    assert tcav_score(net, X, "0", [-1.0, 0.0], target=0) == 0.0
    # d logit_1 / d a = (0, -1)
    assert tcav_score(net, X, "0", [0.0, 1.0], target=1) == 0.0


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


@pytest.mark.parametrize("method", ["pattern", "mean_diff", "svm", "logistic"])
def test_sample_weight_equals_repeating_samples(method):
    # sklearn's check_sample_weight_equivalence passes y= by keyword, which fit calls
    # concept_labels: the same property, checked positionally
    rng = np.random.RandomState(0)
    A = rng.rand(40, 6)
    t = (rng.rand(40) < 0.3).astype(int)
    w = rng.randint(0, 5, 40)
    repeated = CAVEstimator(method=method, random_state=0).fit(A.repeat(w, 0), t.repeat(w))
    weighted = CAVEstimator(method=method, random_state=0).fit(A, t, w)
    np.testing.assert_allclose(weighted.cav_, repeated.cav_, atol=1e-6)
    np.testing.assert_allclose(weighted.decision_function(A), repeated.decision_function(A),
                               atol=1e-6)


# ---------------------------------------------------------------- TCAV (Kim et al. 2018)
def _localized_net():
    """Conv(1->2, 1x1) -> ReLU -> Flatten -> Linear(128, 2): the logit-0 weight is -4 on the
    top-left 2x2 patch and +1 elsewhere (logit 1 is its negative)."""
    import torch

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(2 * 8 * 8, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, 0.5]).reshape(2, 1, 1, 1))
        net[0].bias.zero_()
        w = torch.ones(2, 8, 8)
        w[:, :2, :2] = -4.0
        net[3].weight.copy_(torch.stack([w.flatten(), -w.flatten()]))
        net[3].bias.zero_()
    return net


def _images(n, rng, patch=False):
    X = rng.uniform(-0.5, 1.0, (n, 1, 8, 8)).astype("float32")
    if patch:
        X[:, :, :2, :2] = 1.0
    return X


def _hand_directional_derivatives(net, X, cavs, k, layer):
    """``grad_a f_k(x) . v`` by hand for ``_localized_net`` at layer "0" (conv output, the
    gradient is ``W_k * 1[z > 0]``) or "1" (ReLU output, the gradient is ``W_k``)."""
    import torch

    with torch.no_grad():
        z = net[0](torch.as_tensor(X)).numpy().reshape(len(X), -1)
    W = net[3].weight.detach().numpy()[k]
    G = W * (z > 0) if layer == "0" else np.broadcast_to(W, z.shape)
    return cavs @ G.T


@pytest.mark.parametrize("layer", ["0", "1"])
def test_tcav_directional_derivative_matches_a_hand_computation(layer):
    from skdebias import tcav_score

    rng = np.random.RandomState(0)
    net = _localized_net()
    X = _images(25, rng)
    res = tcav_score(net, X, layer, _images(20, rng, patch=True),
                     [_images(20, rng) for _ in range(3)], target=0, random_state=0)
    assert res.cavs.shape == (3, 128) and res.directional_derivatives.shape == (3, 25)
    np.testing.assert_allclose(np.linalg.norm(res.cavs, axis=1), 1.0, rtol=1e-9)
    hand = _hand_directional_derivatives(net, X, res.cavs, 0, layer)
    np.testing.assert_allclose(res.directional_derivatives, hand, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(res.scores, np.mean(hand > 0, axis=1))
    hand_random = _hand_directional_derivatives(net, X, res.random_cavs, 0, layer)
    np.testing.assert_array_equal(res.random_scores, np.mean(hand_random > 0, axis=1))


def test_tcav_follows_the_sign_of_a_localized_concept_where_spatial_mean_flips():
    """The patch lowers logit 0 (weight -4 there), but the weights elsewhere are positive, so
    the spatially averaged gradient along the channel CAV is positive: the two disagree."""
    import torch

    from skdebias import ActivationExtractor, spatial_mean_tcav, tcav_score

    rng = np.random.RandomState(0)
    net = _localized_net()
    X, concept, pool = _images(60, rng), _images(30, rng, patch=True), _images(200, rng)
    with torch.no_grad():  # ground truth: inserting the patch lowers logit 0 on every image
        patched = X.copy()
        patched[:, :, :2, :2] = 1.0
        effect = (net(torch.as_tensor(patched)) - net(torch.as_tensor(X)))[:, 0].numpy()
    assert np.mean(effect < 0) == 1.0
    res = tcav_score(net, X, "1", concept, pool, target=0, n_random=10, random_state=0)
    hand = _hand_directional_derivatives(net, X, res.cavs, 0, "1")
    assert res.mean == np.mean(hand > 0) < 0.5
    assert res.mean == 0.0
    A = ActivationExtractor(net, "1", pooling="max").fit(concept).transform(
        np.concatenate([concept, pool[:30]]))
    channel_cav = CAVEstimator().fit(A, np.r_[np.ones(30), np.zeros(30)]).cav_
    assert spatial_mean_tcav(net, X, "1", channel_cav, target=0) > 0.5  # the opposite sign


def test_tcav_t_test_separates_a_concept_that_matters_from_a_random_one():
    from skdebias import tcav_score

    rng = np.random.RandomState(0)
    net = _localized_net()
    X, concept, pool = _images(60, rng), _images(30, rng, patch=True), _images(200, rng)
    res = tcav_score(net, X, "1", concept, pool, target=0, n_random=10, random_state=0)
    assert res.p_value < 0.05 and res.significant
    assert res.scores.shape == res.random_scores.shape == (10,)
    assert res.std == pytest.approx(np.std(res.scores))
    assert res.random_mean == pytest.approx(np.mean(res.random_scores))
    from scipy.stats import ttest_ind

    assert res.p_value == pytest.approx(ttest_ind(res.scores, res.random_scores).pvalue)
    # a "concept" drawn from the random distribution itself is not significant
    null = tcav_score(net, X, "1", _images(30, rng), pool, target=0, n_random=10,
                      random_state=0)
    assert null.p_value > 0.05 and not null.significant
    # seeded: the same result twice
    again = tcav_score(net, X, "1", concept, pool, target=0, n_random=10, random_state=0)
    np.testing.assert_array_equal(again.cavs, res.cavs)


@pytest.mark.parametrize("kwargs,name", [
    (dict(concept_X=np.ones(128)), "concept_X"),
    (dict(concept_X=np.ones((1, 1, 8, 8), dtype="float32")), "concept_X"),
    (dict(random_X=[np.ones((5, 1, 8, 8), dtype="float32")]), "random_X"),
    (dict(n_random=3), "n_random"),
    (dict(random_size=4), "random_size"),
    (dict(random_X=np.zeros((6, 1, 8, 8), dtype="float32"), random_size=6), "random_size"),
    (dict(random_X=np.zeros((6, 1, 8, 8), dtype="float32"), n_random=1), "n_random"),
    (dict(alpha=1.5), "alpha"),
    (dict(C=0.0), "C"),
    (dict(cav_method="pca"), "cav_method"),
    (dict(random_state="seed"), "random_state"),
    (dict(batch_size=0), "batch_size"),
    (dict(layer="nope"), "nope"),
])
def test_tcav_bad_input_names_the_argument(kwargs, name):
    import re

    from skdebias import tcav_score

    rng = np.random.RandomState(0)
    args = dict(net=_localized_net(), X=_images(5, rng), layer="1",
                concept_X=_images(5, rng, patch=True),
                random_X=[_images(5, rng), _images(5, rng)], target=0)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=rf"(?<![\w.]){re.escape(name)}"):
        tcav_score(**args)


def test_tcav_agrees_in_sign_with_captum():
    captum_concept = pytest.importorskip("captum.concept")
    import tempfile
    import warnings

    import torch

    from skdebias import tcav_score

    rng = np.random.RandomState(0)
    net = _localized_net()
    X, concept = _images(40, rng), _images(30, rng, patch=True)
    random_sets = [_images(30, rng) for _ in range(3)]

    def loader(A):
        return torch.utils.data.DataLoader(torch.as_tensor(A), batch_size=64)

    c = captum_concept.Concept(0, "patch", loader(concept))
    rs = [captum_concept.Concept(i + 1, f"random{i}", loader(R))
          for i, R in enumerate(random_sets)]
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = captum_concept.TCAV(net, layers=["1"], save_path=d).interpret(
            torch.as_tensor(X), [[c, r] for r in rs], target=0)
    captum_scores = np.array([v["1"]["sign_count"][0].item() for v in out.values()])
    ours = tcav_score(net, X, "1", concept, random_sets, target=0, random_state=0)
    assert np.all(captum_scores < 0.5) and np.all(ours.scores < 0.5)
    np.testing.assert_allclose(ours.scores, captum_scores, atol=0.1)


def test_tcav_several_layers_at_once_equal_one_call_per_layer():
    """A list of layers shares the forward and backward passes; each layer's result is the one
    a call for that layer alone gives (same seed, same random sets)."""
    from skdebias import tcav_score

    rng = np.random.RandomState(0)
    net = _localized_net()
    X, concept, pool = _images(30, rng), _images(20, rng, patch=True), _images(60, rng)
    both = tcav_score(net, X, ["0", "1"], concept, pool, target=0, n_random=4, random_state=0)
    assert list(both) == ["0", "1"]
    # the second layer's CAV seeds follow the first layer's in one call: compare the
    # directional derivatives with the hand computation instead of a separate call for "1"
    alone = tcav_score(net, X, "0", concept, pool, target=0, n_random=4, random_state=0)
    np.testing.assert_array_equal(both["0"].cavs, alone.cavs)
    np.testing.assert_allclose(both["0"].directional_derivatives,
                               alone.directional_derivatives, rtol=1e-12)
    for layer in ("0", "1"):
        hand = _hand_directional_derivatives(net, X, both[layer].cavs, 0, layer)
        np.testing.assert_allclose(both[layer].directional_derivatives, hand, rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match="layer must be a layer name"):
        tcav_score(net, X, [], concept, pool, target=0)


def test_tcav_counts_forward_passes():
    """One forward pass per batch of every image set for all layers, and one per batch of X
    for the gradients (plus one single-sample check of each input): no pass per layer or per
    random set."""
    from skdebias import tcav_score

    rng = np.random.RandomState(0)
    net = _localized_net()
    calls = []
    net.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    X, concept = _images(12, rng), _images(10, rng, patch=True)
    randoms = [_images(10, rng) for _ in range(3)]
    tcav_score(net, X, ["0", "1"], concept, randoms, target=0, batch_size=64, random_state=0)
    # two single-sample checks, 4 image sets, X once
    assert sorted(calls) == [1, 1, 10, 10, 10, 10, 12]


def test_tcav_bfloat16_scores_match_float32():
    from skdebias import tcav_score

    rng = np.random.RandomState(0)
    net = _localized_net()
    X, concept, pool = _images(40, rng), _images(20, rng, patch=True), _images(80, rng)
    kw = dict(target=0, n_random=5, random_state=0)
    a = tcav_score(net, X, "1", concept, pool, **kw)
    b = tcav_score(net, X, "1", concept, pool, precision="bfloat16", **kw)
    assert abs(a.mean - b.mean) <= 0.05
    with pytest.raises(ValueError, match="precision"):
        tcav_score(net, X, "1", concept, pool, precision="float64", **kw)
