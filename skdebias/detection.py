"""Spectral Relevance Analysis (SpRAy; Lapuschkin et al. 2019, Anders et al. 2022).

Per class, the attribution maps of the class's samples are downsized,
normalised and clustered: by default the number of clusters and the affinity
(k-means on the spectral embedding of a k-nearest-neighbour graph, or k-means
on the maps themselves) are the ones whose partition has the largest mean
silhouette on the maps; the *eigengap* of the graph Laplacian (the original
SpRAy criterion) is kept as an option. A small, well separated cluster is a
candidate "Clever Hans" strategy; its members become concept labels for a CAV
or a corrector (:meth:`SpectralRelevanceAnalysis.concept_labels_for`).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import laplacian
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.neighbors import kneighbors_graph
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._utils._data import first_batch, n_samples, take
from ._utils._modules import get_module, n_outputs, network_classes
from ._utils._validation import check_choice, check_int, check_seed, check_y, encode_y
from .attribution import ATTRIBUTION_METHODS, attribute
from .base import BaseNetworkEstimator, atomic_fit
from .exceptions import WeakClustersWarning

__all__ = ["SpectralRelevanceAnalysis", "spectral_embedding_eigengap", "CLUSTER_SELECTIONS",
           "WEAK_CONFIDENCE"]

_NORMALIZE = ("l2", "max", None)
#: How the number of clusters per class is chosen.
CLUSTER_SELECTIONS = ("silhouette", "eigengap")
#: Largest number of maps the silhouette is computed on (a seeded subsample beyond it):
#: the silhouette costs O(n^2).
_SILHOUETTE_SAMPLES = 2000
#: Below this mean silhouette (``confidence_``) a partition most often cuts one continuous
#: strategy: ``fit`` issues a ``WeakClustersWarning`` and the audit report names the class.
WEAK_CONFIDENCE = 0.25


def spectral_embedding_eigengap(affinity, max_clusters=8, n_clusters=None):
    """Eigen-decomposition of the normalised Laplacian of an affinity graph.

    Parameters
    ----------
    affinity : sparse or dense array of shape (n, n)
        Symmetric, non-negative.
    max_clusters : int, default=8
        Largest number of clusters the eigengap may suggest.
    n_clusters : int or None, default=None
        Force the number of clusters instead of using the eigengap.

    Returns
    -------
    n_clusters : int
        ``argmax_i (lambda_{i+1} - lambda_i) + 1`` over the smallest
        ``max_clusters + 1`` eigenvalues (or the given number).
    eigenvalues : ndarray of shape (m,)
        The smallest ``m = min(n, max_clusters + 1)`` eigenvalues, ascending.
    eigenvectors : ndarray of shape (n, m)
        Their eigenvectors (of the normalised Laplacian).

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.detection import spectral_embedding_eigengap
    >>> A = np.kron(np.eye(2), np.ones((3, 3))) - np.eye(6)  # two triangles
    >>> spectral_embedding_eigengap(A)[0]
    2
    """
    n = affinity.shape[0]
    if n == 1:
        return 1, np.zeros(1), np.ones((1, 1))
    L = laplacian(sp.csr_matrix(affinity, dtype=np.float64), normed=True)
    m = min(n, int(max_clusters) + 1)
    if n <= 4000:
        vals, vecs = scipy.linalg.eigh(L.toarray(), subset_by_index=[0, m - 1])
    else:  # largest eigenvalues of 2I - L = smallest of L (spectrum of L is in [0, 2])
        from scipy.sparse.linalg import eigsh

        shifted = 2.0 * sp.identity(n, format="csr") - L
        vals, vecs = eigsh(shifted, k=m, which="LA")
        vals = 2.0 - vals
        order = np.argsort(vals)
        vals, vecs = vals[order], vecs[:, order]
    vals = np.clip(vals, 0.0, None)
    if n_clusters is None:
        gaps = np.diff(vals)
        n_clusters = int(np.argmax(gaps[:int(max_clusters)]) + 1) if len(gaps) else 1
    return int(min(n_clusters, n)), vals, vecs


class SpectralRelevanceAnalysis(BaseNetworkEstimator):
    """SpRAy: cluster the attribution maps of each class to find distinct strategies.

    For each analysed class ``c`` the maps ``R(x)`` of its samples (the
    relevance of output ``c``; zennit LRP by composite name, gradient x input
    as fallback, via :func:`skdebias.attribution.attribute`) are summed over
    channels, average-pooled to ``map_size x map_size``, flattened and
    normalised. A k-nearest-neighbour graph (connectivity, symmetrised)
    defines the affinity; the smallest eigenvalues of its normalised Laplacian
    give the eigengap and the spectral embedding, on which k-means assigns the
    clusters. Each cluster gets a *separability*: the fraction of its members'
    graph edges that stay inside it (1 for an isolated group).

    Parameters
    ----------
    estimator : torch.nn.Module or skorch.NeuralNet
        The classifier; never modified (attributions run on a copy, and the
        zennit hooks are removed after every batch).
    classes : sequence or None, default=None
        Classes to analyse; default every class in ``y``.
    method : {"lrp", "gradient_x_input", "gradient"}, default="lrp"
    composite : str, zennit Composite class or instance, default="EpsilonPlus"
        zennit composite (``method="lrp"``); see :func:`skdebias.attribution.attribute`.
        The default differs from :func:`~skdebias.attribution.attribute`'s
        ``"EpsilonPlusFlat"`` in the first layer only: the z+ rule there keeps the
        relevance on the input values that carry it, where the flat rule spreads it
        evenly over each first-layer receptive field. On 38 SmallCNNs that put at
        least 10 % of their relevance on a timestamp in 70 % of a class, two
        clusters matched the timestamp images (ARI >= 0.8) in 28 runs with
        ``"EpsilonPlus"`` and in 24 with ``"EpsilonPlusFlat"``.
    map_size : int, default=14
        Side of the pooled maps (maps smaller than that are kept). Ignored for
        2-d input ``(n, n_features)``, whose maps are used as they are.
    normalize : {"l2", "max", None}, default="l2"
        Per-map normalisation: unit L2 norm, or division by the largest
        absolute value.
    n_neighbors : int, default=10
        Neighbours of the affinity graph (clipped to the class size - 1).
    n_clusters : int or None, default=None
        Fixed number of clusters per class; ``None`` chooses it by
        ``cluster_selection``.
    max_clusters : int, default=8
        Largest number of clusters that may be chosen.
    cluster_selection : {"silhouette", "eigengap"}, default="silhouette"
        ``"silhouette"``: for every ``k`` in ``2 .. max_clusters``, two
        partitions are tried (k-means on the spectral embedding of the
        k-nearest-neighbour graph, and k-means on the maps themselves); the
        one with the largest mean silhouette on the maps wins (with a given
        ``n_clusters``, the better of the two at that ``k``). A class stays one
        cluster only when no partition reaches a positive silhouette.
        ``"eigengap"``: the largest gap between consecutive eigenvalues of the
        graph Laplacian (original SpRAy) and the spectral partition. The
        eigengap can miss a strategy that the maps separate cleanly (a local
        artifact with ~20 % of the relevance in 70 % of a class: eigengap 1 or
        3 clusters, silhouette 2 clusters matching the artifact).
    batch_size : int, default=64
    device : str or torch.device, default="auto"
    num_workers : int, default=0
        DataLoader worker processes that read a Dataset input (0: read in this
        process); arrays and tensors are sliced per batch. See docs/parameters.md.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        Arithmetic of the attribution passes (torch autocast); ``"float16"`` needs CUDA.
    random_state : int, RandomState instance or None, default=None
        Seeds k-means.
    verbose : int, default=0
        0: silent; 1 or more: progress bars over the long steps (tqdm).

    Attributes
    ----------
    classes_ : ndarray
        The analysed classes.
    labels_ : ndarray of int of shape (n_samples,)
        Cluster of each sample within its class; -1 for samples of classes
        that were not analysed.
    indices_ : dict
        ``{class: indices into X}`` of the analysed samples.
    n_clusters_ : dict
        ``{class: number of clusters}``.
    eigenvalues_ : dict
        ``{class: smallest eigenvalues of the normalised Laplacian}``.
    embedding_ : dict
        ``{class: (n_c, m) eigenvectors}``, column 0 the trivial one.
    separability_ : dict
        ``{class: (n_clusters,) separability per cluster}``.
    confidence_ : dict
        ``{class: mean silhouette of the class's partition}`` on the maps, in
        [-1, 1] (0 for a single cluster). Near 1: the strategies are clearly
        distinct; below 0.25 the clusters most often split one continuous
        strategy and should not be read as distinct ones: ``fit`` then
        issues a :class:`~skdebias.exceptions.WeakClustersWarning`.
    weak_classes_ : list
        The classes split into two or more clusters with a ``confidence_``
        below 0.25 (``WEAK_CONFIDENCE``): the clusters barely separate.
    affinity_ : dict
        ``{class: "knn" or "maps"}``: whether the partition came from the
        spectral embedding of the neighbour graph or from the maps directly.
    cluster_sizes_ : dict
        ``{class: (n_clusters,) members per cluster}``.
    maps_ : dict
        ``{class: (n_c, n_pixels) pooled, normalised maps}``.
    method_ : str
        The attribution method used (``"gradient_x_input"`` after a fallback).
    n_samples_fit_ : int
    n_features_in_ : int
        Only for 2-d input.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias import SpectralRelevanceAnalysis
    >>> net = torch.nn.Linear(6, 2)
    >>> _ = torch.nn.init.ones_(net.weight)
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(40, 6).astype("float32"); X[:10, 0] += 5   # a strategy on feature 0
    >>> y = np.zeros(40, dtype=int)
    >>> spray = SpectralRelevanceAnalysis(net, method="gradient_x_input", n_neighbors=5,
    ...                                   random_state=0)
    >>> labels = spray.fit(X, y).labels_
    >>> spray.n_clusters_[0]
    2
    >>> c = spray.concept_labels_for(labels[0], class_=0)
    >>> c.shape, int(c[:10].sum())
    ((40,), 10)
    """

    def __init__(self, estimator, classes=None, method="lrp", composite="EpsilonPlus",
                 map_size=14, normalize="l2", n_neighbors=10, n_clusters=None, max_clusters=8,
                 cluster_selection="silhouette",
                 batch_size=64, device="auto", random_state=None, verbose=0,
                 precision="float32", num_workers=0):
        super().__init__(estimator, batch_size, device, verbose, precision=precision,
                         num_workers=num_workers)
        self.classes = classes
        self.method = method
        self.composite = composite
        self.map_size = map_size
        self.normalize = normalize
        self.n_neighbors = n_neighbors
        self.n_clusters = n_clusters
        self.max_clusters = max_clusters
        self.cluster_selection = cluster_selection
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def _check_params(self):
        if self.method not in ATTRIBUTION_METHODS:
            raise ValueError(
                f"method={self.method!r} is not valid; choose one of {ATTRIBUTION_METHODS}.")
        if self.normalize not in _NORMALIZE:
            raise ValueError(f"normalize={self.normalize!r} is not valid; choose one of "
                             f"{_NORMALIZE}.")
        check_int("map_size", self.map_size)
        check_int("n_neighbors", self.n_neighbors)
        check_int("max_clusters", self.max_clusters)
        check_choice("cluster_selection", self.cluster_selection, CLUSTER_SELECTIONS)
        check_int("batch_size", self.batch_size)
        if self.n_clusters is not None:
            check_int("n_clusters", self.n_clusters)
        check_seed("random_state", self.random_state)

    def _prepare(self, R):
        R = torch.as_tensor(R, dtype=torch.float32)
        if R.ndim == 3 and max(R.shape[1:]) > self.map_size:
            R = torch.nn.functional.adaptive_avg_pool2d(
                R[:, None], (min(self.map_size, R.shape[1]), min(self.map_size, R.shape[2])))[:, 0]
        F = R.reshape(R.shape[0], -1).double().numpy()
        if self.normalize == "l2":
            norm = np.linalg.norm(F, axis=1, keepdims=True)
        elif self.normalize == "max":
            norm = np.abs(F).max(axis=1, keepdims=True)
        else:
            return F
        return F / np.where(norm > 0, norm, 1.0)

    def _cluster(self, F, rng):
        """Partition one class's maps; returns (labels, k, eigenvalues, embedding, affinity,
        confidence, affinity name)."""
        n = F.shape[0]
        if n < 3:
            labels = np.zeros(n, dtype=np.int64)
            return labels, 1, np.zeros(min(n, 1)), np.ones((n, 1)) / np.sqrt(max(n, 1)), \
                np.ones((n, n)) - np.eye(n), 0.0, "knn"
        nn_ = min(int(self.n_neighbors), n - 1)
        G = kneighbors_graph(F, n_neighbors=nn_, mode="connectivity", include_self=False)
        A = G.maximum(G.T).tocsr()
        forced = self.n_clusters
        if self.cluster_selection == "eigengap":
            k, vals, vecs = spectral_embedding_eigengap(A, self.max_clusters, forced)
            if k <= 1:
                return np.zeros(n, dtype=np.int64), 1, vals, vecs, A, 0.0, "knn"
            labels = self._spectral_labels(vecs, k, rng)
            return (*self._renumber(labels), vals, vecs, A,
                    self._silhouette(F, labels, rng), "knn")
        m = max(int(self.max_clusters), int(forced or 1))
        _, vals, vecs = spectral_embedding_eigengap(A, m, n_clusters=1)
        # k-means cannot make more clusters than there are distinct maps
        n_distinct = len(np.unique(F, axis=0))
        ks = [int(forced)] if forced is not None else range(2, min(m, n - 1, n_distinct) + 1)
        best = (0.0, np.zeros(n, dtype=np.int64), "knn")
        for k in ks:
            if k <= 1:
                continue
            for name, labels in (("knn", self._spectral_labels(vecs, k, rng)),
                                 ("maps", self._kmeans(F, k, rng))):
                score = self._silhouette(F, labels, rng)
                # ties go to the smaller k and to the graph (first tried)
                if score > best[0] + 1e-12 or (forced is not None and best[0] == 0.0
                                                and len(np.unique(labels)) > 1):
                    best = (score, labels, name)
        labels, k = self._renumber(best[1])
        return labels, k, vals, vecs, A, float(best[0]) if k > 1 else 0.0, best[2]

    @staticmethod
    def _kmeans(U, k, rng):
        km = KMeans(n_clusters=k, n_init=10, random_state=rng.randint(np.iinfo(np.int32).max))
        return km.fit_predict(U).astype(np.int64)

    def _spectral_labels(self, vecs, k, rng):
        U = vecs[:, :k]
        norms = np.linalg.norm(U, axis=1, keepdims=True)
        return self._kmeans(U / np.where(norms > 0, norms, 1.0), k, rng)

    @staticmethod
    def _silhouette(F, labels, rng):
        """Mean silhouette of ``labels`` on the maps (0 when there are fewer than 2 clusters)."""
        n_labels = len(np.unique(labels))
        if n_labels < 2 or n_labels >= len(labels):
            return 0.0
        size = _SILHOUETTE_SAMPLES if len(labels) > _SILHOUETTE_SAMPLES else None
        return float(silhouette_score(F, labels, sample_size=size,
                                      random_state=rng.randint(np.iinfo(np.int32).max)))

    @staticmethod
    def _renumber(labels):
        """Clusters numbered by decreasing size, ties by first member; returns (labels, k)."""
        ids, counts = np.unique(labels, return_counts=True)
        first = np.array([np.flatnonzero(labels == i)[0] for i in ids])
        order = ids[np.lexsort((first, -counts))]
        remap = np.zeros(int(ids.max()) + 1, dtype=np.int64)
        remap[order] = np.arange(len(order))
        return remap[labels], len(order)

    @staticmethod
    def _separability(A, labels, k):
        A = sp.csr_matrix(A)
        deg = np.asarray(A.sum(axis=1)).ravel()
        out = np.ones(k)
        for j in range(k):
            members = labels == j
            vol = deg[members].sum()
            if vol > 0:
                out[j] = A[members][:, members].sum() / vol
        return out

    @atomic_fit
    def fit(self, X, y):
        """Compute attributions per class and cluster them.

        Parameters
        ----------
        X : array-like or tensor of shape (n, C, H, W) (or (n, n_features)), or Dataset
        y : array-like of shape (n,)
            Class labels (the network's classes); the relevance of each
            sample's own class is analysed.

        Returns
        -------
        self : SpectralRelevanceAnalysis
        """
        self._check_params()
        X = self._validate_X(X, reset=True)
        shape = self.input_shape_
        n = n_samples(X)
        y = check_y(y, n)
        out_classes = network_classes(
            self.estimator, n_outputs(get_module(self.estimator), first_batch(X)))
        y_idx = encode_y(y, out_classes)
        present = np.unique(y)
        if self.classes is None:
            classes = present
        else:
            classes = np.atleast_1d(np.asarray(self.classes))
            missing = [c for c in classes.tolist() if c not in set(present.tolist())]
            if missing:
                raise ValueError(
                    f"classes {missing} have no samples in y (classes in y: {present.tolist()}).")
        self.classes_ = classes
        rng = check_random_state(self.random_state)
        self.labels_ = np.full(n, -1, dtype=np.int64)
        self.indices_, self.n_clusters_, self.eigenvalues_ = {}, {}, {}
        self.embedding_, self.separability_, self.cluster_sizes_, self.maps_ = {}, {}, {}, {}
        self.confidence_, self.affinity_ = {}, {}
        self.method_ = self.method
        two_d = shape is not None and len(shape) == 1
        for c in classes.tolist():
            idx = np.flatnonzero(y == c)
            target = int(y_idx[idx[0]])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", RuntimeWarning)
                R = attribute(self.estimator, take(X, idx), target=target, method=self.method_,
                              composite=self.composite, batch_size=self.batch_size,
                              device=self.device, reduce_channels=not two_d,
                              verbose=self.verbose, precision=self.precision)
            for w in caught:
                if "falling back to gradient x input" in str(w.message):
                    self.method_ = "gradient_x_input"
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            F = self._prepare(R)
            labels, k, vals, vecs, A, confidence, affinity = self._cluster(F, rng)
            self.labels_[idx] = labels
            self.indices_[c] = idx
            self.n_clusters_[c] = int(k)
            self.eigenvalues_[c] = vals
            self.embedding_[c] = vecs
            self.cluster_sizes_[c] = np.bincount(labels, minlength=k)
            self.separability_[c] = self._separability(A, labels, k)
            self.confidence_[c] = confidence
            self.affinity_[c] = affinity
            self.maps_[c] = F.astype(np.float32)
        self.n_samples_fit_ = n
        self.weak_classes_ = [c for c in classes.tolist()
                              if self.n_clusters_[c] > 1 and self.confidence_[c] < WEAK_CONFIDENCE]
        self._warn_weak()
        return self

    def _warn_weak(self):
        if not self.weak_classes_:
            return
        listed = ", ".join(f"class {c!r}: {self.n_clusters_[c]} clusters, confidence "
                           f"{self.confidence_[c]:.2f}" for c in self.weak_classes_)
        warnings.warn(
            f"The clusters of {len(self.weak_classes_)} class(es) barely separate ({listed}; "
            f"mean silhouette below {WEAK_CONFIDENCE}): they most often cut one continuous "
            f"strategy rather than separate distinct ones, so check a cluster against the "
            f"images (summary(), maps_) before using it as concept labels. Another partition "
            f"may separate better: set n_clusters, map_size or composite.",
            WeakClustersWarning, stacklevel=4)

    def fit_predict(self, X, y):
        """Fit and return ``labels_`` (cluster within class, -1 for classes not analysed)."""
        return self.fit(X, y).labels_

    def _class_key(self, class_):
        check_is_fitted(self, "labels_")
        if class_ is None:
            if len(self.classes_) != 1:
                raise ValueError(
                    f"Several classes were analysed ({self.classes_.tolist()}); name one with "
                    "class_=...")
            return self.classes_.tolist()[0]
        for c in self.classes_.tolist():
            if c == class_:
                return c
        raise ValueError(
            f"class_={class_!r} was not analysed; analysed classes: {self.classes_.tolist()}.")

    def concept_labels_for(self, cluster, class_=None, scope="all"):
        """0/1 labels marking the members of one cluster (e.g. a Clever-Hans strategy).

        Parameters
        ----------
        cluster : int or sequence of int
            Cluster id(s) within the class (see ``labels_``).
        class_ : class label, optional
            Required when several classes were analysed.
        scope : {"all", "class"}, default="all"
            ``"all"``: one label per sample of the ``X`` given to :meth:`fit`
            (0 outside the class), ready for the correctors'
            ``concept_labels``; ``"class"``: one label per sample of the class,
            in the order of ``indices_[class_]``, e.g. to fit a
            :class:`~skdebias.CAVEstimator` within the class.

        Returns
        -------
        concept_labels : ndarray of int64
        """
        c = self._class_key(class_)
        if scope not in ("all", "class"):
            raise ValueError(f"scope={scope!r} is not valid; choose 'all' or 'class'.")
        clusters = np.atleast_1d(np.asarray(cluster))
        k = self.n_clusters_[c]
        bad = [j for j in clusters.tolist() if isinstance(j, bool)
               or not (isinstance(j, numbers.Integral) and 0 <= j < k)]
        if bad:
            raise ValueError(
                f"cluster {bad!r} does not exist for class {c!r}, which has {k} clusters "
                f"(0..{k - 1}).")
        idx = self.indices_[c]
        member = np.isin(self.labels_[idx], clusters).astype(np.int64)
        if scope == "class":
            return member
        out = np.zeros(self.n_samples_fit_, dtype=np.int64)
        out[idx] = member
        return out

    def summary(self):
        """One dict per (class, cluster): ``class``, ``cluster``, ``size``, ``fraction``,
        ``separability`` and the class's ``confidence``; the smallest well separated clusters
        of confident classes are Clever-Hans candidates."""
        check_is_fitted(self, "labels_")
        rows = []
        for c in self.classes_.tolist():
            total = len(self.indices_[c])
            for j in range(self.n_clusters_[c]):
                rows.append({"class": c, "cluster": j, "size": int(self.cluster_sizes_[c][j]),
                             "fraction": float(self.cluster_sizes_[c][j] / total),
                             "separability": float(self.separability_[c][j]),
                             "confidence": float(self.confidence_[c])})
        return rows
