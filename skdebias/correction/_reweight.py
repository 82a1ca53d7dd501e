"""Group-balanced reweighting: a simple, strong baseline when bias labels are known.

Every (class, bias) group gets the same total weight, so the rare bias-conflicting
samples (e.g. a digit in another class's colour) count as much as the common
bias-aligned ones.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from skorch.dataset import ValidSplit
from torch import nn

from .._utils._data import n_samples
from .._utils._validation import check_group_labels
from ..base import BIAS_KEY, INPUT_KEY, DictInputClassifier

__all__ = ["group_balanced_weights", "GroupBalancedClassifier"]

WEIGHT_KEY = "sample_weight"


def group_balanced_weights(y, bias):
    """Sample weights inversely proportional to the size of each (class, bias) group.

    ``w_i = n / (n_groups * |g_i|)`` with ``g_i`` the group of sample ``i``: every
    non-empty group gets the same total weight and the weights average to 1.

    Parameters
    ----------
    y : array-like of shape (n,)
        Class labels.
    bias : array-like of shape (n,)
        Bias labels (any hashable values).

    Returns
    -------
    weights : ndarray of shape (n,), float32

    Examples
    --------
    >>> from skdebias.correction import group_balanced_weights
    >>> group_balanced_weights([0, 0, 0, 1], [0, 0, 1, 1]).tolist()
    [0.6666666865348816, 0.6666666865348816, 1.3333333730697632, 1.3333333730697632]
    """
    y = np.asarray(y).ravel()
    bias = np.asarray(bias).ravel()
    if len(y) != len(bias):
        raise ValueError(f"y and bias must have the same length, got {len(y)} and {len(bias)}.")
    if len(y) == 0:
        raise ValueError("y is empty.")
    _, y_idx = np.unique(y, return_inverse=True)
    _, b_idx = np.unique(bias, return_inverse=True)
    groups, group_idx, counts = np.unique(np.stack([y_idx.ravel(), b_idx.ravel()], axis=1),
                                          axis=0, return_inverse=True, return_counts=True)
    group_idx = group_idx.ravel()
    weights = len(y) / (len(groups) * counts[group_idx].astype(np.float64))
    return weights.astype(np.float32)


def _weights(values, n, name):
    w = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values,
                   dtype=np.float32)
    if w.ndim != 1 or len(w) != n:
        raise ValueError(f"{name} must be a 1-d array with one weight per sample ({n}), "
                         f"got shape {w.shape}.")
    bad = np.flatnonzero(~np.isfinite(w) | (w < 0))
    if len(bad):
        raise ValueError(f"{name} must be finite, >= 0 and not all zero; sample {bad[0]} is "
                         f"{w[bad[0]].item()}.")
    if not np.any(w > 0):
        raise ValueError(f"{name} must be finite, >= 0 and not all zero; all are 0.")
    return w


class GroupBalancedClassifier(DictInputClassifier):
    """A skorch classifier trained with group-balanced (or given) sample weights.

    ``fit(X, y, bias=...)`` weights every sample by :func:`group_balanced_weights`
    of its (class, bias) group; ``fit(X, y, sample_weight=...)`` uses the given
    weights. The loss of a batch is ``sum_i w_i CE_i / sum_i w_i``. A module
    instance is copied at every ``fit``: the caller's module keeps its weights.

    Parameters
    ----------
    module : torch.nn.Module class or instance
        Must output logits.
    *args, **kwargs
        Passed to :class:`skorch.NeuralNetClassifier`.
    criterion : default=torch.nn.CrossEntropyLoss
        Used with ``reduction="none"`` (set through ``criterion__reduction``).
    train_split : default=ValidSplit(5, stratified=True) (skorch's default);
        ``None`` trains on all data.

    Attributes
    ----------
    sample_weight_ : ndarray of shape (n,)
        The weights used in the last :meth:`fit`.

    Examples
    --------
    Two classes, three bias groups (e.g. colours), one epoch:

    >>> import numpy as np
    >>> from skdebias.correction import GroupBalancedClassifier
    >>> from skdebias.models import SmallCNN
    >>> X = np.random.rand(16, 3, 28, 28).astype("float32")
    >>> y, bias = np.arange(16) % 2, np.arange(16) % 3  # class, colour
    >>> clf = GroupBalancedClassifier(SmallCNN, module__n_classes=2, max_epochs=1,
    ...                               train_split=None, verbose=0)
    >>> clf.fit(X, y, bias=bias).predict(X).shape
    (16,)
    """

    extra_keys = (BIAS_KEY, WEIGHT_KEY)

    def __init__(self, module, *args, criterion=nn.CrossEntropyLoss,
                 train_split=ValidSplit(5, stratified=True), **kwargs):
        kwargs.setdefault("criterion__reduction", "none")
        super().__init__(module, *args, criterion=criterion, train_split=train_split, **kwargs)

    def fit(self, X, y, bias=None, sample_weight=None, **fit_params):
        """Train with group-balanced weights (from ``bias``) or the given ``sample_weight``.

        Parameters
        ----------
        X : array-like or tensor (n, C, H, W), or dict with key ``"X"``
            Converted to float32; NaN or infinity raise a ``ValueError``.
        y : array-like of shape (n,)
        bias : array-like of shape (n,), optional
            Bias labels; the weights become :func:`group_balanced_weights` ``(y, bias)``.
        sample_weight : array-like of shape (n,), optional
            Explicit weights (instead of ``bias``).

        Returns
        -------
        self : GroupBalancedClassifier
        """
        return super().fit(self._weighted(X, y, bias, sample_weight, "fit"), y, **fit_params)

    def partial_fit(self, X, y=None, classes=None, bias=None, sample_weight=None, **fit_params):
        """Continue training; ``bias`` or ``sample_weight`` as in :meth:`fit`."""
        return super().partial_fit(self._weighted(X, y, bias, sample_weight, "partial_fit"), y,
                                   classes=classes, **fit_params)

    def _weighted(self, X, y, bias, sample_weight, method):
        """``X`` as a dict input carrying the sample weights (from ``bias`` or given); also
        records them as ``sample_weight_``."""
        if bias is None and isinstance(X, Mapping) and BIAS_KEY in X:
            bias = X[BIAS_KEY]
            X = {k: v for k, v in X.items() if k != BIAS_KEY}
        if bias is not None and sample_weight is not None:
            raise ValueError("Pass either bias= (group-balanced weights) or sample_weight=, "
                             "not both.")
        if bias is not None:
            X = self._check_images(X)  # X is reported before the labels computed from it
            images = X[INPUT_KEY] if isinstance(X, Mapping) else X
            n = n_samples(images)
            bias = check_group_labels(bias, n)
            if y is None:
                raise ValueError(f"GroupBalancedClassifier.{method} with bias= needs the class "
                                 "labels y (one per sample), but y is None.")
            y_arr = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y)
            if y_arr.ndim != 1 or len(y_arr) != n:
                raise ValueError(f"y must be 1-d with one label per sample of X ({n}), got shape "
                                 f"{y_arr.shape}.")
            sample_weight = group_balanced_weights(y_arr, bias)
        packed = self._pack(X, WEIGHT_KEY, sample_weight, _weights)
        if packed is None:
            raise ValueError(
                f"GroupBalancedClassifier.{method} needs bias labels ({method}(X, y, bias=...)) "
                f"or sample weights ({method}(X, y, sample_weight=...)).")
        self.sample_weight_ = np.asarray(packed[WEIGHT_KEY])
        return packed

    def get_loss(self, y_pred, y_true, X=None, training=False):
        loss = super().get_loss(y_pred, y_true, X=X, training=training)
        if loss.ndim == 0:
            raise ValueError(
                "GroupBalancedClassifier needs a criterion with reduction='none' "
                "(criterion__reduction='none').")
        if isinstance(X, Mapping) and WEIGHT_KEY in X:
            w = torch.as_tensor(X[WEIGHT_KEY], dtype=loss.dtype, device=loss.device)
            return (loss * w).sum() / w.sum().clamp_min(torch.finfo(loss.dtype).tiny)
        return loss.mean()
