"""Spuriosity ranking of samples within their class (Moayeri et al., NeurIPS 2023).

A neural feature (a unit of the penultimate layer, or the projection on a CAV)
is *spurious* for class ``c`` when it encodes something that co-occurs with
``c`` without being ``c`` (a colour, a watermark, a background). The
*spuriosity* of a sample ``x`` of class ``c`` is the mean z-score of the
spurious features of ``c``, z-scored over the samples of ``c``::

    s_c(x) = 1/|S(c)| * sum_{i in S(c)} (r_i(x) - mu_ic) / sigma_ic

Sorting each class by spuriosity puts the samples where the spurious cue is
strongest at the end (*high*) and those without it at the start (*low*);
the accuracy gap between the two ends measures how much a classifier relies
on the cue (:func:`skdebias.metrics.spurious_gap`).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.utils import Bunch
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from ._utils._validation import check_int, check_labels, named_errors, unit_vector
from .concepts import CAVEstimator

__all__ = ["SpuriosityRanker", "propose_features"]


def _feature_indices(value, n_features, where):
    """Validate a sequence of feature indices (non-empty, integers in [0, n_features))."""
    if isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, bool):
        value = [value]
    try:
        idx = np.asarray(value)
    except Exception as exc:  # pragma: no cover - exotic objects
        raise ValueError(f"{where} must be a sequence of feature indices, got {value!r}.") from exc
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(
            f"{where} has no spurious features ({value!r}); give at least one feature index "
            f"in [0, {n_features}), or leave the class out to not score it.")
    if idx.dtype.kind not in "iu":
        if idx.dtype.kind == "f" and np.all(np.isfinite(idx)) and np.all(idx == np.round(idx)):
            idx = idx.astype(np.int64)
        else:
            raise ValueError(f"{where} must hold integer feature indices, got {value!r}.")
    if idx.min() < 0 or idx.max() >= n_features:
        raise ValueError(
            f"{where} holds feature indices {idx.tolist()}, but A has {n_features} features "
            f"(valid indices 0..{n_features - 1}).")
    return np.unique(idx.astype(np.int64))


def _class_key(classes, c, what):
    """The element of ``classes`` equal to ``c`` (raises naming the valid classes)."""
    matches = [k for k in classes.tolist() if k == c]
    if not matches:
        raise ValueError(
            f"{what} names class {c!r}, which is not among the classes seen in fit "
            f"{classes.tolist()}.")
    return matches[0]


class SpuriosityRanker(TransformerMixin, BaseEstimator):
    """Rank samples within their class by how strongly they show spurious features.

    Spurious features per class are either given as feature indices
    (``spurious_features``) or as a concept direction (``cav``); see
    :func:`propose_features` for finding candidates to label. For class ``c``
    with spurious features ``S(c)``, the spuriosity of a class-``c`` sample is
    ``s_c(x) = mean_{i in S(c)} (r_i(x) - mu_ic) / sigma_ic``, with the mean
    ``mu_ic`` and standard deviation ``sigma_ic`` of feature ``i`` over the
    class-``c`` samples seen in :meth:`fit`. With a CAV, ``r(x)`` is the
    projection ``a(x) . cav`` (one "feature").

    The per-sample spuriosity needs the class of each sample, so the primary
    method is :meth:`score_samples(A, y) <score_samples>`. For use inside a
    :class:`~sklearn.pipeline.Pipeline` (where ``transform`` gets no ``y``),
    :meth:`transform(A) <transform>` returns the spuriosity of every sample under
    every class's spurious features, ``(n_samples, n_classes)``;
    ``transform(A, y=y)`` returns the column of each sample's own class.

    Parameters
    ----------
    spurious_features : dict, sequence of int or None, default=None
        ``{class: [feature indices]}``, or one sequence of indices used for every
        class. Classes left out of the dict are not scored (their spuriosity is
        NaN and :meth:`rank` / :meth:`split` skip them).
    cav : CAVEstimator, array-like of shape (n_features,), dict or None, default=None
        A concept direction instead of feature indices: a fitted
        :class:`~skdebias.CAVEstimator`, an unfitted one (cloned and fitted in
        :meth:`fit` on ``concept_labels``), a vector, or ``{class: vector}``.
        A single direction is used for every class.
    k : int, default=10
        Default number of samples per class taken from each end by :meth:`split`.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Classes seen in :meth:`fit`.
    scored_classes_ : ndarray
        The classes that have spurious features.
    spurious_features_ : dict or None
        ``{class: ndarray of feature indices}`` (feature mode).
    cav_ : dict or None
        ``{class: unit vector (n_features,)}`` (CAV mode).
    mean_ : dict
        ``{class: ndarray}``, mean of each spurious signal over the class.
    scale_ : dict
        ``{class: ndarray}``, its standard deviation (1 where it is 0).
    n_features_in_ : int

    See Also
    --------
    propose_features : Candidate spurious features per class, to be labelled.
    skdebias.metrics.spurious_gap : Accuracy gap between the two ends of the ranking.

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias import SpuriosityRanker
    >>> rng = np.random.RandomState(0)
    >>> y = np.repeat([0, 1], 20)
    >>> A = rng.rand(40, 4)
    >>> ranker = SpuriosityRanker(spurious_features={0: [2], 1: [3]}, k=3).fit(A, y)
    >>> s = ranker.score_samples(A, y)
    >>> low, high = ranker.split(A, y)
    >>> bool(s[high].mean() > s[low].mean()), len(low), len(high)
    (True, 6, 6)
    """

    def __init__(self, spurious_features=None, cav=None, k=10):
        self.spurious_features = spurious_features
        self.cav = cav
        self.k = k

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        tags.input_tags.allow_nan = False
        return tags

    # ------------------------------------------------------------------ fit
    def _resolve_cav(self, A, concept_labels):
        cav = self.cav
        n_features = A.shape[1]

        def vector(v, where):
            if isinstance(v, CAVEstimator):
                try:
                    check_is_fitted(v, "cav_")
                    v = v.cav_
                except Exception:
                    if concept_labels is None:
                        raise ValueError(
                            f"{where} is an unfitted CAVEstimator: pass "
                            "fit(A, y, concept_labels=c) so it can be fitted, or pass a "
                            "fitted one or a vector.") from None
                    v = clone(v).fit(A, concept_labels).cav_
            v = unit_vector(v, name=where)
            if v.shape != (n_features,):
                raise ValueError(
                    f"{where} has {v.size} entries, but A has {n_features} features.")
            return v

        if isinstance(cav, Mapping):
            if not cav:
                raise ValueError("cav is an empty dict: give {class: vector} for at least one class.")
            return {_class_key(self.classes_, c, "cav"): vector(v, f"cav[{c!r}]")
                    for c, v in cav.items()}
        v = vector(cav, "cav")
        return {c: v for c in self.classes_.tolist()}

    def _resolve_features(self, n_features):
        sf = self.spurious_features
        if isinstance(sf, Mapping):
            if not sf:
                raise ValueError(
                    "spurious_features is an empty dict: give {class: [feature indices]} for at "
                    "least one class.")
            out = {}
            for c, idx in sf.items():
                key = _class_key(self.classes_, c, "spurious_features")
                out[key] = _feature_indices(idx, n_features, f"spurious_features[{c!r}]")
            return out
        idx = _feature_indices(sf, n_features, "spurious_features")
        return {c: idx for c in self.classes_.tolist()}

    def _signals(self, A, c):
        """Raw spurious signals of class ``c`` for every row of ``A``: (n, m)."""
        if self.spurious_features_ is not None:
            return np.asarray(A[:, self.spurious_features_[c]], dtype=np.float64)
        return (np.asarray(A, dtype=np.float64) @ self.cav_[c])[:, None]

    def fit(self, A, y, concept_labels=None):
        """Learn the per-class statistics of the spurious features.

        Parameters
        ----------
        A : array-like of shape (n_samples, n_features)
            Neural features, e.g. penultimate-layer activations from
            :class:`~skdebias.ActivationExtractor`.
        y : array-like of shape (n_samples,)
            Class labels.
        concept_labels : array-like of shape (n_samples,), optional
            0/1 concept labels; only used to fit an unfitted ``cav``.

        Returns
        -------
        self : SpuriosityRanker
        """
        check_int("k", self.k)
        if y is None:
            raise ValueError(
                "SpuriosityRanker requires y to be passed, but the target y is None.")
        with named_errors("A"):
            A = validate_data(self, A, dtype=(np.float64, np.float32))
        y = check_labels(y, A.shape[0], name="y", other="A")
        with named_errors("y"):
            check_classification_targets(y)
        self.classes_ = np.unique(y)
        has_sf, has_cav = self.spurious_features is not None, self.cav is not None
        if has_sf and has_cav:
            raise ValueError("Give either spurious_features or cav, not both.")
        if not has_sf and not has_cav:
            raise ValueError(
                "SpuriosityRanker needs spurious features: pass "
                "spurious_features={class: [feature indices]} (or one list for all classes) or "
                "cav=<CAVEstimator or vector>. propose_features(A, y, head_weight) lists "
                "candidate features per class with their top-activating samples to label.")
        if concept_labels is not None:
            concept_labels = np.asarray(concept_labels)
            if concept_labels.shape != (A.shape[0],):
                raise ValueError(
                    f"concept_labels must have one entry per sample ({A.shape[0]}), got shape "
                    f"{concept_labels.shape}.")
        if has_sf:
            self.spurious_features_, self.cav_ = self._resolve_features(A.shape[1]), None
            keys = self.spurious_features_
        else:
            self.spurious_features_, self.cav_ = None, self._resolve_cav(A, concept_labels)
            keys = self.cav_
        self.scored_classes_ = np.asarray([c for c in self.classes_.tolist() if c in keys],
                                          dtype=self.classes_.dtype)
        self.mean_, self.scale_ = {}, {}
        for c in self.scored_classes_.tolist():
            sig = self._signals(A[y == c], c)
            mu, sd = sig.mean(axis=0), sig.std(axis=0)
            sd[~(sd > np.finfo(np.float64).eps * (1 + np.abs(mu)))] = 1.0
            self.mean_[c], self.scale_[c] = mu, sd
        return self

    # ------------------------------------------------------------------ scoring
    def _check_y(self, y, n):
        y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
        if y.ndim != 1 or len(y) != n:
            raise ValueError(
                f"y must be 1-d with one label per sample of A ({n}), got shape {y.shape}.")
        unknown = [c for c in np.unique(y).tolist() if c not in set(self.classes_.tolist())]
        if unknown:
            raise ValueError(
                f"y contains classes {unknown[:10]} that were not seen in fit "
                f"(classes_: {self.classes_.tolist()}).")
        return y

    def _class_spuriosity(self, A, c):
        z = (self._signals(A, c) - self.mean_[c]) / self.scale_[c]
        return z.mean(axis=1)

    def score_samples(self, A, y):
        """Spuriosity of each sample with respect to its own class.

        Parameters
        ----------
        A : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)

        Returns
        -------
        spuriosity : ndarray of shape (n_samples,)
            Same float dtype as ``A``; NaN for samples of classes without
            spurious features.
        """
        check_is_fitted(self, "mean_")
        with named_errors("A"):
            A = validate_data(self, A, reset=False, dtype=(np.float64, np.float32))
        y = self._check_y(y, A.shape[0])
        out = np.full(A.shape[0], np.nan, dtype=A.dtype)
        for c in self.scored_classes_.tolist():
            mask = y == c
            if mask.any():
                out[mask] = self._class_spuriosity(A[mask], c)
        return out

    def transform(self, A, y=None):
        """Spuriosity as features.

        Parameters
        ----------
        A : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,), optional
            With ``y``: each sample's spuriosity for its own class,
            ``(n_samples, 1)`` (the same values as :meth:`score_samples`).
            Without (as in a Pipeline): the spuriosity of every sample under
            the spurious features of every class, ``(n_samples, n_classes)``,
            columns in the order of ``classes_``, NaN columns for classes
            without spurious features.

        Returns
        -------
        S : ndarray of shape (n_samples, n_classes) or (n_samples, 1)
        """
        if y is not None:
            return self.score_samples(A, y)[:, None]
        check_is_fitted(self, "mean_")
        with named_errors("A"):
            A = validate_data(self, A, reset=False, dtype=(np.float64, np.float32))
        out = np.full((A.shape[0], len(self.classes_)), np.nan, dtype=A.dtype)
        scored = set(self.scored_classes_.tolist())
        for j, c in enumerate(self.classes_.tolist()):
            if c in scored:
                out[:, j] = self._class_spuriosity(A, c)
        return out

    def get_feature_names_out(self, input_features=None):
        """``"spuriosity_<class>"`` for each column of :meth:`transform` without ``y``."""
        check_is_fitted(self, "mean_")
        return np.asarray([f"spuriosity_{c}" for c in self.classes_.tolist()], dtype=object)

    # ------------------------------------------------------------------ ranking
    def _selected_classes(self, classes):
        if classes is None:
            return self.scored_classes_.tolist()
        scored = set(self.scored_classes_.tolist())
        out = []
        for c in np.atleast_1d(np.asarray(classes, dtype=object)).tolist():
            key = _class_key(self.classes_, c, "classes")
            if key not in scored:
                raise ValueError(
                    f"Class {c!r} has no spurious features, so it cannot be ranked; classes "
                    f"with spurious features: {self.scored_classes_.tolist()}.")
            out.append(key)
        return out

    def rank(self, A, y, classes=None):
        """Sample indices of each class, sorted by ascending spuriosity.

        Parameters
        ----------
        A : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        classes : sequence, optional
            Classes to rank; default: every class with spurious features.
            Naming a class without spurious features raises ``ValueError``.

        Returns
        -------
        order : dict
            ``{class: ndarray of indices into A}``, lowest spuriosity first
            (stable sort: ties keep their input order). Classes absent from
            ``y`` map to empty arrays.
        """
        s = self.score_samples(A, y)
        y = np.asarray(y)
        out = {}
        for c in self._selected_classes(classes):
            idx = np.flatnonzero(y == c)
            out[c] = idx[np.argsort(s[idx], kind="stable")]
        return out

    def split(self, A, y, k=None, classes=None):
        """The ``k`` lowest- and ``k`` highest-spuriosity samples of each class.

        Parameters
        ----------
        A : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        k : int, optional
            Samples per class from each end; default ``self.k``. Must not
            exceed the size of any ranked class (the two ends overlap when a
            class has fewer than ``2 k`` samples).
        classes : sequence, optional
            As in :meth:`rank`.

        Returns
        -------
        low_idx, high_idx : ndarray of int
            Indices into ``A``, class by class; ``high_idx`` is the last ``k``
            of each ascending sort (highest spuriosity last).
        """
        k = check_int("k", self.k if k is None else k)
        order = self.rank(A, y, classes=classes)
        low, high = [], []
        for c, idx in order.items():
            if len(idx) == 0:
                continue
            if k > len(idx):
                raise ValueError(
                    f"k={k} is larger than class {c!r}, which has {len(idx)} samples; use "
                    f"k <= {len(idx)}.")
            if 2 * k > len(idx):
                warnings.warn(
                    f"Class {c!r} has {len(idx)} < 2k={2 * k} samples: its low and high "
                    "samples overlap.", UserWarning, stacklevel=2)
            low.append(idx[:k])
            high.append(idx[len(idx) - k:])
        if not low:
            raise ValueError("None of the ranked classes occurs in y.")
        return np.concatenate(low), np.concatenate(high)


# ---------------------------------------------------------------------- proposals
def _head_params(head_weight, head_bias):
    try:
        import torch
        from torch import nn

        if isinstance(head_weight, nn.Linear):
            bias = head_weight.bias
            W = head_weight.weight.detach().cpu().numpy()
            b = None if bias is None else bias.detach().cpu().numpy()
            return W.astype(np.float64), (b if head_bias is None else head_bias)
        if isinstance(head_weight, torch.Tensor):
            head_weight = head_weight.detach().cpu().numpy()
        if isinstance(head_bias, torch.Tensor):
            head_bias = head_bias.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    return np.asarray(head_weight, dtype=np.float64), head_bias


def propose_features(A, y, head_weight, top=5, n_images=10, head_bias=None, y_pred=None,
                     classes=None):
    """Candidate spurious features per class, with the samples that activate them most.

    Following Moayeri et al. (2023), the importance of feature ``i`` for class
    ``c`` is its mean activation over the correctly classified samples of ``c``
    times the head weight ``W[c, i]``. The ``top`` most important features of
    each class are returned with the indices of their ``n_images``
    top-activating samples of that class, so a person can look at them and
    label each feature as *core* (the object) or *spurious* (anything else);
    the spurious ones go to :class:`SpuriosityRanker`.

    Parameters
    ----------
    A : array-like of shape (n_samples, n_features)
        Inputs of the classification head (penultimate features).
    y : array-like of int of shape (n_samples,)
        Class labels, as indices of the head's outputs.
    head_weight : array-like or tensor of shape (n_classes, n_features), or torch.nn.Linear
        The head's weight matrix (a Linear layer also provides the bias).
    top : int, default=5
        Features proposed per class.
    n_images : int, default=10
        Top-activating samples listed per feature (fewer if the class is smaller).
    head_bias : array-like of shape (n_classes,), optional
        Used with ``head_weight`` to predict when ``y_pred`` is not given.
    y_pred : array-like of shape (n_samples,), optional
        Predicted classes; default ``argmax(A @ W.T + b)``.
    classes : sequence of int, optional
        Classes to propose for; default: all classes in ``y``.

    Returns
    -------
    proposals : dict
        ``{class: Bunch(features, importance, top_samples)}`` with ``features``
        (``top`` feature indices, most important first), their ``importance``
        and ``top_samples`` (``(top, n_images)`` indices into ``A``, highest
        activation first). If no sample of a class is classified correctly,
        all its samples are used for the importance.

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias import propose_features
    >>> rng = np.random.RandomState(0)
    >>> A, y = rng.rand(30, 6), np.repeat([0, 1, 2], 10)
    >>> W = np.eye(3, 6) * 5
    >>> prop = propose_features(A, y, W, top=2, n_images=3)
    >>> int(prop[1].features[0]), prop[1].top_samples.shape
    (1, (2, 3))
    """
    top, n_images = check_int("top", top), check_int("n_images", n_images)
    A = check_array(A, dtype=(np.float64, np.float32), input_name="A")
    y = check_array(y, ensure_2d=False, dtype=None, input_name="y")
    if y.ndim != 1 or len(y) != A.shape[0]:
        raise ValueError(f"y must be 1-d with one label per row of A ({A.shape[0]}), got shape {y.shape}.")
    W, b = _head_params(head_weight, head_bias)
    if W.ndim != 2 or W.shape[1] != A.shape[1]:
        raise ValueError(
            f"head_weight must have shape (n_classes, {A.shape[1]}) to match A, got {W.shape}.")
    n_out = W.shape[0]
    if y.dtype.kind not in "iu" or y.min() < 0 or y.max() >= n_out:
        raise ValueError(
            f"y must hold integer class indices of the head's outputs (0..{n_out - 1}), got "
            f"{np.unique(y)[:10].tolist()}.")
    if y_pred is None:
        logits = A.astype(np.float64) @ W.T
        if b is not None:
            logits = logits + np.asarray(b, dtype=np.float64).ravel()
        y_pred = logits.argmax(axis=1)
    else:
        y_pred = np.asarray(y_pred).ravel()
        if len(y_pred) != len(y):
            raise ValueError(f"y_pred has {len(y_pred)} entries, expected {len(y)}.")
    top = min(top, A.shape[1])
    if classes is None:
        classes = np.unique(y).tolist()
    out = {}
    for c in np.atleast_1d(classes).tolist():
        members = np.flatnonzero(y == c)
        if len(members) == 0:
            raise ValueError(f"Class {c!r} has no samples in y.")
        correct = members[y_pred[members] == c]
        use = correct if len(correct) else members
        importance = A[use].astype(np.float64).mean(axis=0) * W[c]
        feats = np.argsort(-importance, kind="stable")[:top]
        m = min(n_images, len(members))
        top_samples = np.stack([
            members[np.argsort(-A[members, f], kind="stable")[:m]] for f in feats])
        out[c] = Bunch(features=feats, importance=importance[feats], top_samples=top_samples)
    return out
