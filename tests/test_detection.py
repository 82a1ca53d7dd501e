"""SpectralRelevanceAnalysis (SpRAy): eigengap, clustering, concept labels from clusters."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402
from torch import nn  # noqa: E402

from _nets import AnyWidth  # noqa: E402
from skdebias import ActivationExtractor, CAVEstimator, SpectralRelevanceAnalysis  # noqa: E402
from skdebias.detection import spectral_embedding_eigengap  # noqa: E402
from skdebias.exceptions import WeakClustersWarning  # noqa: E402
from skdebias.plotting import plot_spray_embedding  # noqa: E402


def two_strategies(n=60, seed=0):
    """A linear 'network' with unit weights: a third of the samples are explained by feature 0."""
    rng = np.random.RandomState(seed)
    net = nn.Linear(6, 2)
    with torch.no_grad():
        net.weight.fill_(1.0)
        net.bias.zero_()
    X = rng.rand(n, 6).astype(np.float32)
    concept = np.zeros(n, dtype=int)
    concept[: n // 3] = 1
    X[concept == 1, 0] += 8.0
    return net, X, np.zeros(n, dtype=int), concept


# ------------------------------------------------------------------ eigengap and clustering
def test_eigengap_counts_components():
    blocks = [np.ones((k, k)) - np.eye(k) for k in (4, 5, 6)]
    A = np.zeros((15, 15))
    start = 0
    for b in blocks:
        A[start:start + len(b), start:start + len(b)] = b
        start += len(b)
    k, vals, vecs = spectral_embedding_eigengap(A, max_clusters=6)
    assert k == 3 and np.allclose(vals[:3], 0, atol=1e-10) and vals[3] > 0.5
    assert vecs.shape == (15, 7)
    assert spectral_embedding_eigengap(A, n_clusters=2)[0] == 2


def test_spray_separates_a_strategy_on_synthetic_maps():
    net, X, y, concept = two_strategies()
    spray = SpectralRelevanceAnalysis(net, method="gradient_x_input", n_neighbors=5,
                                      random_state=0, device="cpu").fit(X, y)
    assert spray.n_clusters_[0] >= 2
    assert adjusted_rand_score(concept, spray.labels_) > 0.8
    member = spray.labels_[0]
    labels = spray.concept_labels_for(member)
    assert labels.dtype == np.int64 and labels.shape == (len(y),)
    assert np.array_equal(labels, (spray.labels_ == member).astype(int))
    rows = spray.summary()
    assert sum(r["size"] for r in rows) == len(y)
    sep = {r["cluster"]: r["separability"] for r in rows}
    assert all(0 <= v <= 1 for v in sep.values()) and sep[member] > 0.8
    # fixed number of clusters
    fixed = clone(spray).set_params(n_clusters=3).fit(X, y)
    assert fixed.n_clusters_[0] == 3


def test_concept_labels_scopes_and_errors():
    net, X, y, concept = two_strategies()
    y = y.copy()
    y[::2] = 1  # two classes
    spray = SpectralRelevanceAnalysis(net, method="gradient_x_input", classes=[0, 1],
                                      n_neighbors=4, random_state=0, device="cpu").fit(X, y)
    assert set(spray.classes_) == {0, 1}
    assert np.all(spray.labels_ >= 0)
    full = spray.concept_labels_for(0, class_=1)
    inside = spray.concept_labels_for(0, class_=1, scope="class")
    assert full.shape == (len(y),) and inside.shape == (np.sum(y == 1),)
    assert np.array_equal(full[spray.indices_[1]], inside) and full[y == 0].sum() == 0
    with pytest.raises(ValueError, match="Several classes were analysed"):
        spray.concept_labels_for(0)
    with pytest.raises(ValueError, match="class_=7 was not analysed"):
        spray.concept_labels_for(0, class_=7)
    with pytest.raises(ValueError, match=r"cluster \[99\] does not exist for class 1"):
        spray.concept_labels_for(99, class_=1)
    with pytest.raises(ValueError, match="scope='x' is not valid"):
        spray.concept_labels_for(0, class_=1, scope="x")


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "saliency"}, "method='saliency' is not valid"),
    ({"normalize": "l1"}, "normalize='l1' is not valid"),
    ({"n_neighbors": 0}, "n_neighbors must be a positive integer"),
    ({"map_size": 0}, "map_size must be a positive integer"),
    ({"n_clusters": 0}, "n_clusters must be a positive integer"),
    ({"classes": [5]}, r"classes \[5\] have no samples in y"),
])
def test_spray_errors(kwargs, match):
    net, X, y, _ = two_strategies()
    with pytest.raises(ValueError, match=match):
        SpectralRelevanceAnalysis(net, **kwargs).fit(X, y)


def test_spray_labels_must_be_network_outputs():
    net, X, y, _ = two_strategies()
    with pytest.raises(ValueError, match="not among the network's classes"):
        SpectralRelevanceAnalysis(net, method="gradient").fit(X, y + 4)


def test_spray_cluster_errors_name_the_given_value():
    rng = np.random.RandomState(0)
    X = np.r_[rng.randn(15, 2) + 4, rng.randn(15, 2) - 4].astype("float32")
    y = np.zeros(30, dtype=int)
    spray = SpectralRelevanceAnalysis(AnyWidth(), method="gradient_x_input", n_clusters=2,
                                      n_neighbors=5, device="cpu", random_state=0).fit(X, y)
    for bad in (0.7, -1, 2, True):
        with pytest.raises(ValueError, match=rf"cluster \[{bad!r}\] does not exist"):
            spray.concept_labels_for(bad)


# ------------------------------------------------------------------ acceptance on artifact digits
def test_acceptance_spray_artifact_class(artifact_data, artifact_net):
    module = artifact_net.module_
    before = {k: v.clone() for k, v in module.state_dict().items()}
    spray = SpectralRelevanceAnalysis(artifact_net, classes=[0], method="lrp",
                                      composite="EpsilonPlusFlat", device="cpu",
                                      random_state=0).fit(artifact_data.X, artifact_data.y)
    idx = spray.indices_[0]
    truth = artifact_data.concept[idx]
    assert spray.method_ == "lrp"
    assert spray.n_clusters_[0] >= 2
    ari = adjusted_rand_score(truth, spray.labels_[idx])
    assert ari >= 0.8, ari
    assert np.all(spray.labels_[artifact_data.y != 0] == -1)
    # zennit hooks removed, network untouched
    for m in module.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    # the artifact cluster feeds a CAV within the class: it matches the CAV of the true labels
    art = int(np.bincount(spray.labels_[idx][truth == 1]).argmax())
    c_class = spray.concept_labels_for(art, class_=0, scope="class")
    ext = ActivationExtractor(artifact_net, "features.7", device="cpu").fit(artifact_data.X)
    A0 = ext.transform(artifact_data.X[idx])
    cav_spray = CAVEstimator().fit(A0, c_class).cav_
    cav_true = CAVEstimator().fit(A0, truth).cav_
    assert cav_spray @ cav_true > 0.95
    # plots
    fig = plot_spray_embedding(spray, class_=0, concept=artifact_data.concept)
    assert len(fig.axes) == 2 and len(fig.axes[0].collections) >= 2


# ------------------------------------------------------------------ choosing the number of clusters
def _artifact_linear_net(strength):
    """A linear classifier on the 28 px artifact digits (red patch in 70 % of class 0) whose
    class-0 weights are the clean class-0 template plus ``strength`` times its largest weight on
    the patch: gradient x input puts a fixed share of the relevance on the patch."""
    from skdebias.datasets import make_artifact_digits

    d = make_artifact_digits(target_class=0, p=0.7, artifact="patch", random_state=0)
    n_pix = int(np.prod(d.X.shape[1:]))
    W = np.stack([d.X[(d.y == k) & (d.concept == 0)].mean(0).ravel() - d.X.mean(0).ravel()
                  for k in range(10)]).astype("float32")
    mask = np.repeat(d.artifact_mask[None], 3, 0).ravel().astype("float32")
    W[0] += strength * mask * np.abs(W[0]).max()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_pix, 10))
    with torch.no_grad():
        net[1].weight.copy_(torch.from_numpy(W))
        net[1].bias.zero_()
    idx = np.flatnonzero(d.y == 0)
    R = np.abs(d.X[idx].reshape(len(idx), -1) * W[0])
    art = d.concept[idx] == 1
    share = float(((R * mask).sum(1) / R.sum(1))[art].mean())
    return net, d, idx, art, share


def test_silhouette_finds_a_local_artifact_that_the_eigengap_misses():
    from sklearn.metrics import adjusted_rand_score

    net, d, idx, art, share = _artifact_linear_net(2.0)
    assert 0.15 < share < 0.3  # about a fifth to a quarter of the relevance on the patch
    kw = dict(classes=[0], method="gradient_x_input", random_state=0)
    eigengap = SpectralRelevanceAnalysis(net, cluster_selection="eigengap", **kw).fit(d.X, d.y)
    default = SpectralRelevanceAnalysis(net, **kw).fit(d.X, d.y)
    # the eigengap splits the class in three and mixes the artifact images into two of them
    assert eigengap.n_clusters_[0] != 2
    assert adjusted_rand_score(art, eigengap.labels_[idx]) < 0.8
    assert default.n_clusters_[0] == 2
    assert adjusted_rand_score(art, default.labels_[idx]) >= 0.8
    assert default.confidence_[0] > eigengap.confidence_[0]
    assert default.confidence_[0] > 0.4 and default.affinity_[0] in ("knn", "maps")
    rows = default.summary()
    assert [r["confidence"] for r in rows] == [default.confidence_[0]] * 2


def test_silhouette_keeps_one_cluster_without_structure_and_honours_n_clusters():
    rng = np.random.RandomState(0)
    # one strategy: maps on a line through the origin (every silhouette <= 0 after normalising)
    X = np.ones((30, 4), dtype="float32")
    y = np.zeros(30, dtype=int)
    net = torch.nn.Linear(4, 2)
    spray = SpectralRelevanceAnalysis(net, method="gradient_x_input", random_state=0).fit(X, y)
    assert spray.n_clusters_[0] == 1 and spray.confidence_[0] == 0.0
    X = rng.rand(60, 6).astype("float32")
    fixed = SpectralRelevanceAnalysis(net.__class__(6, 2), method="gradient_x_input",
                                      n_clusters=3, random_state=0).fit(X, np.zeros(60, int))
    assert fixed.n_clusters_[0] == 3
    with pytest.raises(ValueError, match="cluster_selection"):
        SpectralRelevanceAnalysis(net, cluster_selection="gap").fit(X[:, :4], np.zeros(60, int))


def test_a_weak_partition_warns_and_a_clear_one_does_not():
    import warnings

    # one continuous strategy: maps scattered around a single direction
    rng = np.random.RandomState(0)
    X = (rng.randn(60, 6) + 3).astype("float32")
    net = nn.Linear(6, 2)
    nn.init.ones_(net.weight)
    with pytest.warns(WeakClustersWarning,
                      match=r"class 0: \d clusters, confidence 0\.[0-2]\d.*set n_clusters, "
                            r"map_size or composite"):
        weak = SpectralRelevanceAnalysis(net, method="gradient_x_input",
                                         random_state=0).fit(X, np.zeros(60, int))
    assert weak.n_clusters_[0] > 1 and weak.confidence_[0] < 0.25 and weak.weak_classes_ == [0]
    net, X, y, _ = two_strategies()
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakClustersWarning)
        clear = SpectralRelevanceAnalysis(net, method="gradient_x_input", n_neighbors=5,
                                          random_state=0).fit(X, y)
    assert clear.n_clusters_[0] == 2 and clear.confidence_[0] >= 0.25
    assert clear.weak_classes_ == []


def test_default_composite_keeps_a_timestamp_strategy_apart():
    """LRP with the z+ rule in the first layer (the default) separates the timestamp images of
    a SmallCNN whose flat-first-layer maps the best partition does not separate."""
    from skdebias.datasets import make_artifact_digits
    from skdebias.models import make_classifier, make_zoo_model

    module, _, _ = make_zoo_model("small_cnn", random_state=1)
    data = make_artifact_digits(target_class=0, p=0.7, artifact="timestamp", random_state=1)
    net = make_classifier(module, device="cpu", random_state=1, max_epochs=6, lr=2e-3,
                          batch_size=64).fit(data.X, data.y)
    idx = np.flatnonzero(data.y == 0)
    art = data.concept[idx] == 1
    kw = dict(classes=[0], device="cpu", random_state=1)
    default = SpectralRelevanceAnalysis(net, **kw).fit(data.X, data.y)
    ari = adjusted_rand_score(art, default.labels_[idx])
    flat = SpectralRelevanceAnalysis(net, composite="EpsilonPlusFlat", **kw).fit(data.X, data.y)
    assert default.n_clusters_[0] == 2 and ari >= 0.8, ari
    assert ari > adjusted_rand_score(art, flat.labels_[idx])

