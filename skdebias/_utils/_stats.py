"""Tie-aware selection weights shared by the spurious-gap metric and the head fine-tuner."""

from __future__ import annotations

import numpy as np

__all__ = ["end_weights", "gap_weights"]


def end_weights(values, k):
    """Weights selecting the ``k`` samples with the lowest ``values`` (they sum to ``k``).

    Samples tied with the k-th value share the places left (the expected selection over random
    tie-breaking), so a mean over the selection does not depend on the order of the samples.
    Used by :func:`gap_weights`.
    """
    values = np.asarray(values)
    kth = np.sort(values)[k - 1]
    below, tied = values < kth, values == kth
    w = below.astype(np.float64)
    w[tied] = (k - below.sum()) / tied.sum()
    return w


def gap_weights(spuriosity, k):
    """Per-sample weights of one class's gap times ``k``: ``correct @ w / k`` is the accuracy of
    the ``k`` most spurious samples minus that of the ``k`` least spurious (ties shared, see
    :func:`end_weights`). Used by ``spurious_gap`` and the head fine-tuner."""
    return end_weights(-spuriosity, k) - end_weights(spuriosity, k)
