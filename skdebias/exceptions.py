"""Exceptions and warnings that skdebias raises."""

__all__ = ["ChanceLevelWarning", "CleanAccuracyWarning", "ConfidenceOnlyWarning",
           "DivergenceError", "SaturatedPenaltyWarning", "UntrainedNetworkWarning",
           "WeakClustersWarning"]


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


class UntrainedNetworkWarning(UserWarning):
    """The network given to a corrector is not better than always predicting the most
    frequent class on its training data, so the correction's result cannot be judged.

    Raised (as a warning) by the correctors that fine-tune a trained network, before the
    first epoch. Such a network was not trained on the task (or on these labels): train it
    first, for example with more ``max_epochs``.

    Examples
    --------
    >>> from skdebias.exceptions import UntrainedNetworkWarning
    >>> issubclass(UntrainedNetworkWarning, UserWarning)
    True
    """


class ChanceLevelWarning(UserWarning):
    """A network trained by an estimator ends its training no better than always predicting
    the most frequent class on its training samples (within 0.1), or with less than a quarter
    of the accuracy above that level that its best epoch had.

    Issued at the end of ``fit`` by the classifiers that train a network (``EnDClassifier``,
    ``GroupBalancedClassifier``); the message says which parameters to change (for EnD a
    regulariser that outweighs the classification: lower ``alpha`` or ``beta``).

    Examples
    --------
    >>> from skdebias.exceptions import ChanceLevelWarning
    >>> issubclass(ChanceLevelWarning, UserWarning)
    True
    """


class CleanAccuracyWarning(UserWarning):
    """A projection that should leave samples without the concept alone changes their
    predictions: P-ClArC costs accuracy on the training samples not labelled with the concept.

    Issued by ``ClassArtifactCompensator(mode="projective")`` when that accuracy falls by more
    than 5 points; the message suggests ``pooling="flatten"`` or another ``layer``.

    Examples
    --------
    >>> from skdebias.exceptions import CleanAccuracyWarning
    >>> issubclass(CleanAccuracyWarning, UserWarning)
    True
    """


class ConfidenceOnlyWarning(UserWarning):
    """A bias measured on probabilities fell mainly because the network grew less confident,
    while its decisions still follow the bias attribute.

    The counterfactual bias ``mean |p_y(x) - p_y(x_cf)|`` shrinks whenever the probabilities
    move towards uniform, even if the predicted class still changes with the bias attribute as
    often as before. Issued by ``FastModelDebiaser`` when its bias cut on the held-out pairs is
    less than half visible in their prediction flip rate
    (:func:`skdebias.metrics.counterfactual_flip_rate`) and the mean top-class probability
    fell; the message gives both and the parameter to change.

    Examples
    --------
    >>> from skdebias.exceptions import ConfidenceOnlyWarning
    >>> issubclass(ConfidenceOnlyWarning, UserWarning)
    True
    """


class SaturatedPenaltyWarning(UserWarning):
    """A regulariser stayed at the value where its gradient vanishes, so it could not act.

    EnD's disentangling term ``R_perp`` reaches 1 when the bottleneck features of every bias
    group point in one direction, and there the gradient of the plain term is zero: a network
    whose features encode the bias attribute from the start (average-pooled features on a
    background colour, for example) keeps encoding it. Issued by ``EnDClassifier`` and
    ``EnDRegularizer`` when the mean ``R_perp`` of the last training epoch is 0.95 or more with
    ``alpha > 0``; the message names ``perp_loss="log"``, whose gradient does not vanish there,
    and ``alpha``.

    Examples
    --------
    >>> from skdebias.exceptions import SaturatedPenaltyWarning
    >>> issubclass(SaturatedPenaltyWarning, UserWarning)
    True
    """


class WeakClustersWarning(UserWarning):
    """A class's attribution maps were split into clusters that barely separate.

    ``SpectralRelevanceAnalysis`` keeps the partition of each class with the best mean
    silhouette on the maps (its ``confidence_``). Below 0.25 the clusters most often cut one
    continuous strategy (more or less relevance on one region) rather than separate distinct
    ones, and a cluster used as concept labels need not match the images that show an
    artifact. The message names the classes and their confidence, and the parameters that give
    another partition (``n_clusters``, ``map_size``, ``composite``).

    Examples
    --------
    >>> from skdebias.exceptions import WeakClustersWarning
    >>> issubclass(WeakClustersWarning, UserWarning)
    True
    """
