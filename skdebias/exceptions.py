"""Exceptions and warnings that skdebias raises."""

__all__ = ["DivergenceError"]


class DivergenceError(RuntimeError):
    """A training run diverged: its loss or weights went non-finite, or its predictions
    collapsed to one class.

    The message names the parameters to change (e.g. ``lr``, ``penalty``,
    ``max_grad_norm``). The estimator is left as it was before ``fit``; in a
    ``GridSearchCV`` the candidate gets ``error_score`` (NaN by default) and is
    ranked last.

    Examples
    --------
    >>> from skdebias.exceptions import DivergenceError
    >>> issubclass(DivergenceError, RuntimeError)
    True
    """
