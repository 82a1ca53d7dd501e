"""Concept Activation Vectors (CAVs).

The *pattern* CAV (Pahde et al. 2023) is the covariance between activations
and concept labels divided by the label variance; for 0/1 labels it equals the
difference of the class-conditional means. The *filter* CAVs (SVM, ridge,
lasso, logistic) are the normalised weights of a linear classifier; they can
point away from the concept direction when distractor noise is correlated
across features.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import (
    _check_sample_weight,
    check_array,
    check_is_fitted,
    validate_data,
)

import torch

from ._utils._data import check_input, first_batch, is_dataset, iter_batches, n_samples
from ._utils._hooks import capture_output, check_network_input, stop_after
from ._utils._modules import find_layer, get_module, module_device, network, preserve_mode
from ._utils._runtime import autocast, check_precision
from ._utils._validation import (
    check_choice,
    check_int,
    check_labels,
    check_real,
    check_seed,
    check_target,
    named_errors,
    unit_vector,
)
from .metrics import concept_sensitivity

__all__ = ["CAVEstimator", "CAV_METHODS", "cav_alignment", "concept_sensitivity",
           "spatial_mean_tcav", "tcav_score"]

CAV_METHODS = ("pattern", "mean_diff", "svm", "ridge", "lasso", "logistic")


def _unit(v: np.ndarray, what: str) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm <= np.finfo(np.float64).tiny:
        raise ValueError(
            f"The {what} is zero: the concept is not linearly visible in these activations "
            "(for method='lasso' try a smaller alpha)."
        )
    return v / norm


def cav_alignment(cav, A_with, A_without):
    """Alignment of a CAV with the true latent artifact direction.

    For paired activations of images with and without the artifact,
    ``d_i = A_with[i] - A_without[i]``.

    Returns
    -------
    dict with ``"cos_mean_diff"`` = cos(mean_i d_i, cav) and
    ``"mean_cos"`` = mean_i cos(d_i, cav) (pairs with d_i = 0 are skipped).
    """
    cav = unit_vector(cav, name="cav")
    pairs = []
    for name, A in (("A_with", A_with), ("A_without", A_without)):
        with named_errors(name):
            A = check_array(A, dtype=np.float64, input_name=name)
        if A.shape[1] != cav.shape[0]:
            raise ValueError(
                f"Paired activations must have shape (n, {cav.shape[0]}) to match cav; {name} "
                f"has shape {A.shape}.")
        pairs.append(A)
    if pairs[0].shape != pairs[1].shape:
        raise ValueError(
            f"Paired activations must have shape (n, {cav.shape[0]}), one row per pair; A_with "
            f"has shape {pairs[0].shape}, A_without {pairs[1].shape}.")
    D = pairs[0] - pairs[1]
    mean_d = D.mean(axis=0)
    norms = np.linalg.norm(D, axis=1)
    keep = norms > 0
    return {
        "cos_mean_diff": float(mean_d @ cav / max(np.linalg.norm(mean_d), 1e-300)),
        "mean_cos": float(np.mean(D[keep] @ cav / norms[keep])) if keep.any() else float("nan"),
    }


class CAVEstimator(ClassifierMixin, TransformerMixin, BaseEstimator):
    """Fit a Concept Activation Vector on activations and 0/1 concept labels.

    Parameters
    ----------
    method : {"pattern", "mean_diff", "svm", "ridge", "lasso", "logistic"}, default="pattern"
        ``"pattern"``: closed-form ``cov(A, t) / var(t)`` (no solver, robust to
        correlated noise). ``"mean_diff"``: difference of the two class means
        (the same direction as the pattern for binary labels, computed
        directly). The others fit a linear model and use its normalised weights.
    C : float, default=1.0
        Inverse regularisation of ``"svm"`` and ``"logistic"``.
    alpha : float, default=1.0
        Regularisation of ``"ridge"`` and ``"lasso"``.
    class_weight : "balanced", dict or None, default="balanced"
        Class weights of the linear-model methods (ignored by pattern/mean_diff,
        which are balanced by construction).
    fit_intercept : bool, default=True
        Whether the linear models fit an intercept.
    standardize : bool, default=False
        Standardise activations before fitting a linear model; the CAV is then
        mapped back to activation space (``coef / scale``).
    max_iter : int, default=1000
        Solver iterations for the linear models.
    random_state : int, RandomState or None, default=None
        Seed for the stochastic solvers.

    Attributes
    ----------
    cav_ : ndarray of shape (n_features,)
        Unit-norm concept direction, pointing towards ``classes_[1]``.
    mean_ : ndarray of shape (n_features,)
        Mean activation of the training samples.
    classes_ : ndarray of shape (2,)
    threshold_ : float
        Decision threshold on the projection: midpoint between the mean
        projections of the two classes.
    class_means_ : ndarray of shape (2, n_features)
        Mean activation of each concept class.
    n_features_in_ : int
    n_iter_ : int
        Solver iterations (1 for the closed-form methods).

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias import CAVEstimator
    >>> rng = np.random.RandomState(0)
    >>> t = rng.randint(0, 2, 200)
    >>> A = rng.randn(200, 5) + 3 * t[:, None] * np.eye(5)[0]
    >>> cav = CAVEstimator(method="pattern").fit(A, t)
    >>> round(float(cav.cav_[0]), 1)
    1.0
    """

    def __init__(self, method="pattern", C=1.0, alpha=1.0, class_weight="balanced",
                 fit_intercept=True, standardize=False, max_iter=1000, random_state=None):
        self.method = method
        self.C = C
        self.alpha = alpha
        self.class_weight = class_weight
        self.fit_intercept = fit_intercept
        self.standardize = standardize
        self.max_iter = max_iter
        self.random_state = random_state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False
        return tags

    # ------------------------------------------------------------------ fit
    def _check_params(self):
        if self.method not in CAV_METHODS:
            raise ValueError(f"method={self.method!r} is not valid; choose one of {CAV_METHODS}.")
        for name in ("C", "alpha"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not value > 0 \
                    or not np.isfinite(value):
                raise ValueError(f"{name} must be a positive number (finite, > 0), got {value!r}.")
        check_int("max_iter", self.max_iter)

    def fit(self, A, concept_labels, sample_weight=None):
        """Fit the CAV.

        Parameters
        ----------
        A : array-like of shape (n_samples, n_features)
            Activations (e.g. from :class:`ActivationExtractor`).
        concept_labels : array-like of shape (n_samples,)
            Two distinct labels (usually 0/1); ``classes_[1]`` is "concept present".
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        self : CAVEstimator
        """
        self._check_params()
        if concept_labels is None:
            raise ValueError(
                "CAVEstimator requires y to be passed, but the target y is None: concept_labels "
                "(0/1 per sample) are required to fit a CAV."
            )
        with named_errors("A"):
            A = validate_data(self, A, dtype=(np.float64, np.float32))
        t = check_labels(concept_labels, A.shape[0], name="concept_labels", other="A")
        sw = None
        if sample_weight is not None:
            sw = _check_sample_weight(sample_weight, A, dtype=np.float64)
            if not np.any(sw > 0):
                raise ValueError("sample_weight is zero for every sample; nothing to fit.")
            A, t, sw = A[sw > 0], t[sw > 0], sw[sw > 0]
        kind = type_of_target(t, input_name="concept_labels", raise_unknown=True)
        self.classes_, t_idx = np.unique(t, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"concept_labels contain one class only ({self.classes_.tolist()}); a CAV needs "
                "samples with and without the concept."
            )
        if len(self.classes_) != 2 or kind != "binary":
            raise ValueError(
                "Only binary classification is supported. The type of the target is "
                f"{kind}: concept_labels must hold two classes (e.g. 0/1), got "
                f"{len(self.classes_)}."
            )

        # one pass of matrix-vector products (no centred copy of A): per-class weighted sums
        w_s = np.ones(A.shape[0]) if sw is None else sw
        onehot = np.stack([w_s * (t_idx == 0), w_s * (t_idx == 1)]).astype(A.dtype)
        totals = onehot.sum(axis=1)
        self.class_means_ = (onehot @ A).astype(np.float64) / totals[:, None]
        self.mean_ = totals @ self.class_means_ / totals.sum()
        self.n_iter_ = 1
        if self.method == "pattern":
            w = self._pattern(A, t_idx, sw)
        elif self.method == "mean_diff":
            w = self.class_means_[1] - self.class_means_[0]
        else:
            w = self._filter(A, t_idx, sw)
        self.cav_ = _unit(w, f"{self.method} CAV")
        centred = self.class_means_ - self.mean_
        self.threshold_ = float(centred.mean(axis=0) @ self.cav_)
        return self

    @staticmethod
    def _pattern(A, t_idx, sw):
        """``cov(A, t) / var(t)``: one matrix-vector product, no centred copy of ``A``.

        ``sum_i w_i (t_i - t_bar)(a_i - a_bar) = sum_i w_i (t_i - t_bar) a_i`` because the
        weighted deviations of t sum to zero.
        """
        w_s = np.ones(len(t_idx)) if sw is None else sw
        t = t_idx.astype(np.float64)
        t_c = t - np.average(t, weights=w_s)
        return ((w_s * t_c).astype(A.dtype) @ A).astype(np.float64) / np.sum(w_s * t_c ** 2)

    def _class_weight_by_index(self):
        """``class_weight`` for the internal 0/1 labels (a dict is keyed by the user's labels)."""
        if not isinstance(self.class_weight, dict):
            return self.class_weight
        missing = [c for c in self.classes_.tolist() if c not in self.class_weight]
        if missing:
            raise ValueError(
                f"class_weight has no weight for the concept label(s) {missing}; its keys must be "
                f"the labels passed to fit ({self.classes_.tolist()}), got "
                f"{sorted(self.class_weight, key=str)}.")
        return {i: self.class_weight[c] for i, c in enumerate(self.classes_.tolist())}

    def _filter(self, A, t_idx, sw):
        from sklearn.linear_model import Lasso, LogisticRegression, RidgeClassifier
        from sklearn.svm import LinearSVC

        scale = np.ones(A.shape[1])
        if self.standardize:
            scale = A.std(axis=0)
            scale[scale == 0] = 1.0
        Z = (A - self.mean_) / scale
        common = dict(fit_intercept=self.fit_intercept)
        class_weight = self._class_weight_by_index()
        if self.method == "svm":
            model = LinearSVC(C=self.C, class_weight=class_weight, max_iter=self.max_iter,
                              random_state=self.random_state, **common)
        elif self.method == "logistic":
            model = LogisticRegression(C=self.C, class_weight=class_weight,
                                       max_iter=self.max_iter, **common)
        elif self.method == "ridge":
            model = RidgeClassifier(alpha=self.alpha, class_weight=class_weight,
                                    random_state=self.random_state, **common)
        else:  # lasso: least squares on +-1 targets with class-balanced sample weights
            model = Lasso(alpha=self.alpha, max_iter=self.max_iter,
                          random_state=self.random_state, **common)
            weights = compute_sample_weight(class_weight, t_idx) if class_weight else None
            if sw is not None:
                weights = sw if weights is None else weights * sw
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(Z, 2.0 * t_idx - 1.0, sample_weight=weights)
            self.n_iter_ = int(np.max(model.n_iter_))
            return np.ravel(model.coef_) / scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(Z, t_idx, sample_weight=sw)
        n_iter = getattr(model, "n_iter_", None)
        self.n_iter_ = 1 if n_iter is None else int(np.max(n_iter))
        return np.ravel(model.coef_) / scale

    # ------------------------------------------------------------------ use
    def transform(self, A):
        """Projection of ``A - mean_`` on ``cav_``, shape ``(n_samples, 1)``."""
        check_is_fitted(self, "cav_")
        with named_errors("A"):
            A = validate_data(self, A, dtype=(np.float64, np.float32), reset=False)
        return (A @ self.cav_ - self.mean_ @ self.cav_)[:, None]

    def decision_function(self, A):
        """Signed distance along ``cav_`` from the midpoint of the two class means."""
        return self.transform(A)[:, 0] - self.threshold_

    def predict(self, A):
        """``classes_[1]`` where the decision function is positive, else ``classes_[0]``."""
        check_is_fitted(self, "cav_")
        return self.classes_[(self.decision_function(A) > 0).astype(int)]

    def get_feature_names_out(self, input_features=None):
        """One output feature: ``["cav_projection"]``."""
        check_is_fitted(self, "cav_")
        return np.asarray(["cav_projection"], dtype=object)


def spatial_mean_tcav(net, X, layer, cav, target=None, batch_size=128):
    """Share of samples whose ``target`` logit grows along a *channel* CAV, with the gradient
    averaged over spatial positions.

    ``mean_x 1[v . mean_{h,w} grad_a f_target(x)[:, h, w] > 0]`` for a CAV ``v`` of shape
    ``(C,)`` (e.g. fitted on max-pooled activations). This is **not** TCAV as Kim et al.
    (2018) define it (see :func:`tcav_score`): averaging the gradient over positions mixes
    the positions where the concept lives with all others, so for a localized concept (a
    patch, a timestamp) it can have the opposite sign of the per-sample directional
    derivative in the flattened activation space. It is the quantity RR-ClArC's ``l2_mean``
    penalty acts on; for the magnitude use :func:`skdebias.metrics.concept_sensitivity`,
    which this wraps. Until 0.1.0 this was called ``tcav_score``.

    Parameters
    ----------
    net : torch.nn.Module, skorch NeuralNet or fitted corrector
    X : array-like of shape (n, C, H, W), tensor or Dataset
    layer : str
    cav : array-like of shape (C,) or fitted CAVEstimator
    target : None, int or array-like of shape (n,), default=None
        ``None``: the predicted class of each sample.
    batch_size : int, default=128

    Returns
    -------
    score : float in [0, 1]

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias.concepts import spatial_mean_tcav
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> X = np.random.RandomState(0).rand(8, 2).astype("float32")
    >>> 0.0 <= spatial_mean_tcav(net, X, "0", [1.0, 0.0], target=0) <= 1.0
    True
    """
    return float(concept_sensitivity(net, X, layer, cav, target=target,
                                     batch_size=batch_size)["tcav"])


def _layer_activations(net, sets, layers, batch_size, precision="float32"):
    """Flattened activations of every layer in ``layers`` for each ``(name, X)`` in ``sets``.

    Returns ``out[i][j]``, a float64 array for set ``i`` and layer ``j``. One forward pass per
    batch records all layers and stops after the last of them to be called; the network is
    checked once, on the first sample of the first set.
    """
    module = get_module(network(net))
    device = module_device(module)
    mods = [find_layer(module, layer) for layer in layers]
    checked = []
    for name, X in sets:
        X, _ = check_input(X, name=name)
        if n_samples(X) < 2:
            raise ValueError(f"{name} needs at least 2 samples to fit a CAV, got {n_samples(X)}.")
        checked.append(X)
    check_network_input(module, first_batch(checked[0]), sets[0][0])
    last = None  # index of the layer called last, found on the first batch
    out = [[[] for _ in layers] for _ in sets]
    with preserve_mode(module, train=False), torch.no_grad(), autocast(precision, device):
        for i, X in enumerate(checked):
            for xb in iter_batches(X, batch_size=batch_size, device=device):
                with contextlib.ExitStack() as stack:
                    stores = [stack.enter_context(capture_output(m, stop=j == last))
                              for j, m in enumerate(mods)]
                    stack.enter_context(stop_after())
                    order = []
                    for j, m in enumerate(mods):
                        if last is None:
                            stack.enter_context(_record_call(m, order, j))
                    module(xb)
                if last is None:
                    missing = [layers[j] for j, st in enumerate(stores) if not st]
                    if missing:
                        raise ValueError(
                            f"Layer {missing[0]!r} is not called in the forward pass.")
                    last = order[-1]
                for j, st in enumerate(stores):
                    a = st[-1]
                    out[i][j].append(a.reshape(a.shape[0], -1).to("cpu", torch.float64))
    return [[torch.cat(parts).numpy() for parts in per_set] for per_set in out]


@contextlib.contextmanager
def _record_call(module, order, index):
    """Append ``index`` to ``order`` whenever ``module``'s forward ends."""
    handle = module.register_forward_hook(lambda *_: order.append(index))
    try:
        yield
    finally:
        handle.remove()


def _random_sets(random_X, n_random, random_size, n_concept, rng):
    """The random sets: ``(sets, draws)``; ``sets`` is ``[(name, X)]`` to run through the
    network and ``draws`` ``None`` for a given list, or the index arrays of ``n_random``
    subsets of the pool (the single set in ``sets``)."""
    if isinstance(random_X, (list, tuple)):
        if len(random_X) < 2:
            raise ValueError(
                f"random_X must hold at least 2 random sets (the random-vs-random runs pair them), "
                f"got {len(random_X)}; or pass one array as a pool to draw n_random sets from.")
        if n_random is not None and n_random != len(random_X):
            raise ValueError(
                f"n_random={n_random!r} does not match the {len(random_X)} random sets in "
                "random_X; leave n_random=None when random_X is a list of sets.")
        if random_size is not None:
            raise ValueError("random_size applies to a pool of random images; leave "
                             "random_size=None when random_X is a list of sets.")
        return [(f"random_X[{i}]", R) for i, R in enumerate(random_X)], None
    n_random = 10 if n_random is None else check_int("n_random", n_random, low=2)
    pool, _ = check_input(random_X, name="random_X")
    n_pool = n_samples(pool)
    size = min(n_concept, n_pool - 1) if random_size is None else random_size
    size = check_int("random_size", size, low=2)
    if size >= n_pool:
        raise ValueError(
            f"random_size={size} must be smaller than the pool random_X ({n_pool} samples) so "
            "that the random sets differ.")
    return [("random_X", pool)], [rng.choice(n_pool, size, replace=False)
                                  for _ in range(n_random)]


def tcav_score(net, X, layer, concept_X, random_X, target=None, *, n_random=None,
               random_size=None, cav_method="logistic", C=1.0, alpha=0.05, batch_size=128,
               random_state=None, precision="float32"):
    """TCAV (Kim et al. 2018): how often the concept raises the ``target`` logit, with a
    significance test against random concepts.

    For each random set ``R_i`` a linear CAV ``v_i`` is fitted on the *flattened* activations
    of ``layer`` (all ``C*H*W`` entries), concept images (label 1) against ``R_i`` (label 0).
    For every input ``x`` of ``X`` the directional derivative
    ``S_i(x) = grad_a f_target(x) . v_i`` (the gradient over all entries of the flattened
    activation) gives ``TCAV_i = mean_x 1[S_i(x) > 0]``. The same is done with the random set
    ``R_{i+1}`` in place of the concept (random-vs-random runs); a two-sided t-test
    (:func:`scipy.stats.ttest_ind`) of the concept's ``TCAV_i`` against the random ones says
    whether the concept matters. A score near 1 (near 0) means the concept consistently raises
    (lowers) the logit. :func:`spatial_mean_tcav` is a different quantity (a channel CAV and
    the spatially averaged gradient) that can flip the sign for a localized concept.

    Several layers (``layer`` a list) share the work: each batch of every image set goes
    through the network once for all layers, and each batch of ``X`` once forward and once
    backward for the gradients at all layers; every CAV of a layer is scored with one matrix
    product over all inputs.

    Parameters
    ----------
    net : torch.nn.Module, skorch NeuralNet or fitted corrector
        A module must output logits; its parameters and flags are left as they were.
    X : array-like of shape (n, C, H, W), tensor or Dataset
        The inputs to explain, usually images of class ``target``.
    layer : str or list of str
        Layer whose (flattened) output the CAVs live in; a list scores every layer in it.
    concept_X : array-like of shape (n_concept, C, H, W), tensor or Dataset
        Images showing the concept.
    random_X : list of arrays, or one array-like
        A list (or tuple) of at least two random (non-concept) image sets, used as given;
        or one pool of random images from which ``n_random`` sets of ``random_size`` images
        are drawn (without replacement within a set).
    target : None, int or array-like of shape (n,), default=None
        Logit to differentiate: ``None`` the predicted class, an int that class for every
        sample (Kim et al.: class ``k`` for class-``k`` inputs), an array one index per sample.
    n_random : int >= 2 or None, default=None
        Number of random sets drawn from a pool (``None``: 10). With a list of sets it must be
        ``None`` or the list's length.
    random_size : int >= 2 or None, default=None
        Size of each set drawn from a pool (``None``: the number of concept images, at most
        the pool size minus one).
    cav_method : {"logistic", "svm", "pattern", "mean_diff", "ridge", "lasso"}, default="logistic"
        :class:`CAVEstimator` method of the CAVs (Kim et al. use a linear classifier).
    C : float, default=1.0
        Inverse regularisation of the ``"logistic"`` and ``"svm"`` CAVs.
    alpha : float in (0, 1), default=0.05
        Significance level of the t-test.
    batch_size : int, default=128
    random_state : int, RandomState or None, default=None
        Seeds the draws of random sets from a pool and the CAV solvers.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        Arithmetic of the forward and backward passes (torch autocast); ``"float16"`` needs
        CUDA. Activations and gradients are scored in float64.

    Returns
    -------
    result : sklearn.utils.Bunch, or dict of them
        For a list ``layer``, ``{layer: Bunch}``; each Bunch holds
        ``scores`` (n_random,): TCAV of the concept per random set; ``mean``, ``std``;
        ``random_scores`` (n_random,): random-vs-random TCAV, ``random_mean``, ``random_std``;
        ``p_value``: two-sided t-test of ``scores`` against ``random_scores`` (NaN when both
        are constant and equal); ``significant``: ``p_value < alpha``; ``alpha``;
        ``directional_derivatives`` (n_random, n): ``S_i(x)``; ``cavs``
        (n_random, C*H*W) and ``random_cavs``: the unit CAVs.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias import tcav_score
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
    ...                           torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 2))
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(20, 1, 6, 6).astype("float32")
    >>> concept = X[:10] + 1.0
    >>> res = tcav_score(net, X, "1", concept, rng.rand(40, 1, 6, 6).astype("float32"),
    ...                  target=0, n_random=3, random_state=0)
    >>> res.scores.shape, 0.0 <= res.mean <= 1.0
    ((3,), True)
    """
    from scipy.stats import ttest_ind
    from sklearn.utils import Bunch, check_random_state

    if not is_dataset(concept_X) and np.ndim(concept_X) == 1:
        raise TypeError(
            "concept_X must hold concept images (n, C, H, W), got a 1-d array; to score a "
            "given channel CAV with the spatially averaged gradient use spatial_mean_tcav(net, "
            "X, layer, cav).")
    layers = [layer] if isinstance(layer, str) else (
        list(layer) if isinstance(layer, (list, tuple)) else None)
    if not layers or not all(isinstance(name, str) for name in layers):
        raise ValueError(f"layer must be a layer name (str) or a non-empty list of layer names, "
                        f"got {layer!r}.")
    check_choice("cav_method", cav_method, CAV_METHODS)
    check_real("alpha", alpha, low=0, high=1, low_open=True, high_open=True)
    check_real("C", C, low=0, low_open=True)
    check_int("batch_size", batch_size)
    X, _ = check_input(X)  # fail before the CAVs are fitted
    rng = check_random_state(check_seed("random_state", random_state))
    check_precision(precision, module_device(get_module(network(net))))
    concept_X, _ = check_input(concept_X, name="concept_X")
    random_sets, draws = _random_sets(random_X, n_random, random_size, n_samples(concept_X), rng)
    acts = _layer_activations(net, [("concept_X", concept_X)] + random_sets, layers, batch_size,
                              precision)
    grads = _flat_gradients(net, X, layers, target, batch_size, precision)
    results = {}
    for j, name in enumerate(layers):
        A_concept = acts[0][j]
        if draws is None:
            randoms = [per_set[j] for per_set in acts[1:]]
        else:
            randoms = [acts[1][j][idx] for idx in draws]
        results[name] = _tcav_layer(A_concept, randoms, grads[j], cav_method, C, alpha, rng,
                                    ttest_ind, Bunch)
    return results[layer] if isinstance(layer, str) else results


def _flat_gradients(net, X, layers, target, batch_size, precision):
    """``d f_target / d a`` at every layer in ``layers`` for ``X``, flattened (float64, CPU):
    one forward and one backward pass per batch for all layers."""
    module = get_module(network(net))
    device = module_device(module)
    mods = [find_layer(module, name) for name in layers]
    n = n_samples(X)
    if n == 0:
        raise ValueError("X is empty: tcav_score needs at least one sample.")
    target = check_target(target, n)
    check_network_input(module, first_batch(X), "X")
    out = [[] for _ in layers]
    start = 0
    with preserve_mode(module, train=False):
        for xb in iter_batches(X, batch_size=batch_size, device=device):
            with torch.enable_grad(), contextlib.ExitStack() as stack:
                stores = [stack.enter_context(capture_output(m, detach=False, requires_grad=True))
                          for m in mods]
                with autocast(precision, device):
                    logits = module(xb)
                if isinstance(logits, (tuple, list)):
                    logits = logits[0]
                missing = [layers[j] for j, st in enumerate(stores) if not st]
                if missing:
                    raise ValueError(f"Layer {missing[0]!r} is not called in the forward pass.")
                if target is None:
                    t = logits.detach().argmax(dim=1)
                elif np.ndim(target) == 0:
                    t = torch.full((xb.shape[0],), target, dtype=torch.long, device=logits.device)
                else:
                    t = torch.as_tensor(target[start:start + xb.shape[0]], device=logits.device)
                if int(t.min()) < 0 or int(t.max()) >= logits.shape[1]:
                    raise ValueError(
                        f"target must hold class indices in [0, {logits.shape[1] - 1}].")
                grads = torch.autograd.grad(logits.gather(1, t[:, None]).sum(),
                                            [st[-1] for st in stores])
            for j, g in enumerate(grads):
                out[j].append(g.reshape(g.shape[0], -1).to("cpu", torch.float64))
            start += xb.shape[0]
    return [torch.cat(parts) for parts in out]


def _tcav_layer(A_concept, randoms, G, cav_method, C, alpha, rng, ttest_ind, Bunch):
    """The TCAV result of one layer from its activations and its input gradients ``G``."""
    n_runs = len(randoms)

    def fit(A_pos, A_neg):
        A = np.vstack([A_pos, A_neg])
        t = np.r_[np.ones(len(A_pos), int), np.zeros(len(A_neg), int)]
        seed = int(rng.randint(np.iinfo(np.int32).max))
        return CAVEstimator(method=cav_method, C=C, random_state=seed).fit(A, t).cav_

    cavs = np.stack([fit(A_concept, R) for R in randoms])
    random_cavs = np.stack([fit(randoms[(i + 1) % n_runs], R) for i, R in enumerate(randoms)])
    V = np.vstack([cavs, random_cavs])
    if G.shape[1] != V.shape[1]:  # pragma: no cover - same layer, same flattening
        raise ValueError(f"the gradients have {G.shape[1]} entries, the CAVs {V.shape[1]}.")
    S = (G @ torch.from_numpy(V.T)).numpy().T  # (2 * n_runs, n)
    scores = np.mean(S[:n_runs] > 0, axis=1)
    random_scores = np.mean(S[n_runs:] > 0, axis=1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p_value = float(ttest_ind(scores, random_scores).pvalue)
    return Bunch(
        scores=scores, mean=float(scores.mean()), std=float(scores.std()),
        random_scores=random_scores, random_mean=float(random_scores.mean()),
        random_std=float(random_scores.std()), p_value=p_value,
        significant=bool(np.isfinite(p_value) and p_value < alpha), alpha=float(alpha),
        directional_derivatives=S[:n_runs], cavs=cavs, random_cavs=random_cavs,
    )
