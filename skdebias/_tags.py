"""sklearn tags shared by the estimators that wrap a network."""

from __future__ import annotations

__all__ = ["NetworkInputMixin"]


class NetworkInputMixin:
    """Tags of an estimator whose input goes through a network: images ``(n, C, H, W)`` are
    accepted, and results are deterministic (seeded or seed-free). Place it left of the other
    mixins and ``BaseEstimator``; subclasses extend the tags with ``super().__sklearn_tags__()``.
    """

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.non_deterministic = False
        return tags
