"""sklearn tags shared by the estimators that wrap a network."""

from __future__ import annotations

__all__ = ["NetworkInputMixin"]


class NetworkInputMixin:
    """Tags of an estimator whose input goes through a network: images ``(n, C, H, W)`` are
    accepted, and results are deterministic (seeded or seed-free). Place it left of the other
    mixins and ``BaseEstimator``; subclasses extend the tags with ``super().__sklearn_tags__()``.
    Also records ``n_features_in_`` for vector input (:meth:`_set_n_features_in`).
    """

    def _set_n_features_in(self, shape):
        """``n_features_in_`` for per-sample shape ``(d,)``; removed for images (and unknown
        shapes), so a refit on other input leaves no stale value."""
        if shape is not None and len(shape) == 1:
            self.n_features_in_ = int(shape[0])
        elif hasattr(self, "n_features_in_"):
            del self.n_features_in_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        tags.non_deterministic = False
        return tags
