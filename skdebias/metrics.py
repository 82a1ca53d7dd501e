"""Bias metrics and sklearn scorers.

Sections are grouped by method family; every function takes plain arrays or a
network plus data, and returns floats or dicts of floats.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils.metadata_routing import UNUSED as _UNUSED
from sklearn.utils.metadata_routing import _MetadataRequester

from ._utils._data import check_input, first_batch, n_samples, take
from ._utils._hooks import check_network_input, layer_gradients
from ._utils._modules import get_module, network, network_classes, predict_proba
from ._utils._stats import gap_weights
from ._utils._validation import (
    check_choice,
    check_int,
    check_real,
    encode_y,
    unit_vector,
)
from .attribution import attribute

__all__ = ["concept_sensitivity", "attacked_accuracy", "artifact_relevance",
           "worst_group_accuracy", "make_debias_scorer", "DebiasScorer", "spurious_gap",
           "counterfactual_bias", "counterfactual_flip_rate"]

#: How :func:`concept_sensitivity` reduces the gradient over spatial positions.
GRADIENT_POOLINGS = ("mean", "max", "sum")


# ---------------------------------------------------------------- correction metrics (CAV / ClArC)
def _check_network_input(net, X, name="X"):
    """One sample of ``X`` through the network behind ``net`` (if it has one): a shape the
    network cannot take raises a ``ValueError`` naming ``name`` and the input it expects."""
    try:
        module = get_module(network(net))
    except TypeError:  # any classifier with predict: its own checks
        return
    check_network_input(module, first_batch(X), name)


def _predict_labels(net, X, batch_size=256):
    if not isinstance(net, torch.nn.Module) and hasattr(net, "predict"):
        return np.asarray(net.predict(X))
    return np.argmax(predict_proba(net, X, batch_size=batch_size), axis=1)


def concept_sensitivity(net, X, layer, cav, target=None, gradient_pooling="mean",
                        batch_size=128):
    """Directional derivative of a class logit along a CAV at a layer (TCAV-style).

    For each sample, ``g = d f_target / d a`` at ``layer`` (``a`` of shape
    ``(C, H, W)`` or ``(C,)``) is pooled over the spatial positions and
    projected on the unit CAV: ``s = v . pool(g)``.

    Parameters
    ----------
    net : torch.nn.Module, skorch NeuralNet or fitted corrector
        A module must output logits. Evaluated in eval mode on the device of
        its parameters; its parameters and flags are left as they were.
    X : array-like (n, C, H, W), tensor or Dataset
    layer : str
        Layer whose output the CAV lives in. For a P-ClArC network use the
        corrector's ``measure_layer_`` (the uncompensated activation).
    cav : array-like of shape (C,) or fitted CAVEstimator
    target : None, int or array-like of shape (n,), default=None
        Logit to differentiate: ``None`` the predicted class, an int that class
        for every sample, an array one class index per sample.
    gradient_pooling : {"mean", "max", "sum"}, default="mean"
        How the gradient is reduced over positions: ``"mean"``/``"sum"`` over positions (``"mean"`` is what RR-ClArC's
        ``l2_mean`` penalises); ``"max"`` takes each channel's gradient at the
        position of its maximal activation (the gradient with respect to the
        max-pooled activation the CAV was fitted on).
    batch_size : int, default=128

    Returns
    -------
    result : dict
        ``"mean_abs"``: mean ``|s|`` (the concept sensitivity), ``"tcav"``:
        fraction of samples with ``s > 0`` (the TCAV quotient), ``"mean"``:
        mean signed ``s``, ``"n"``: number of samples.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias.metrics import concept_sensitivity
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> with torch.no_grad():
    ...     _ = net[1].weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    >>> X = np.ones((4, 2), dtype="float32")
    >>> concept_sensitivity(net, X, "0", [1.0, 0.0], target=0)["mean_abs"]
    3.0
    """
    check_choice("gradient_pooling", gradient_pooling, GRADIENT_POOLINGS)
    check_int("batch_size", batch_size)
    v_np = unit_vector(cav)
    scores = []
    for a, g in layer_gradients(net, X, layer, target, batch_size, "concept_sensitivity"):
        if a.shape[1] != len(v_np):
            raise ValueError(
                f"cav has {len(v_np)} dimensions but layer {layer!r} has {a.shape[1]} channels.")
        flat = g.reshape(g.shape[0], g.shape[1], -1)
        if gradient_pooling == "mean":
            pooled = flat.mean(dim=2)
        elif gradient_pooling == "sum":
            pooled = flat.sum(dim=2)
        else:
            idx = a.reshape(a.shape[0], a.shape[1], -1).argmax(dim=2, keepdim=True)
            pooled = flat.gather(2, idx)[:, :, 0]
        v = torch.as_tensor(v_np, dtype=pooled.dtype, device=pooled.device)
        scores.append((pooled @ v).cpu().numpy().astype(np.float64))
    s = np.concatenate(scores)
    return {"mean_abs": float(np.abs(s).mean()), "tcav": float(np.mean(s > 0)),
            "mean": float(s.mean()), "n": int(len(s))}


def attacked_accuracy(net, X, y, add_artifact, batch_size=256):
    """Accuracy on the "attacked" set ``add_artifact(X)`` (the artifact in every image).

    Parameters
    ----------
    net : torch.nn.Module (logits), skorch NeuralNet or any fitted classifier with ``predict``
    X : array-like (n, C, H, W) or tensor
    y : array-like of shape (n,)
        Labels as ``net`` predicts them (class indices for a module).
    add_artifact : callable
        Returns a copy of ``X`` with the artifact inserted (e.g. the
        ``add_artifact`` of :func:`skdebias.datasets.make_artifact_digits`).
    batch_size : int, default=256

    Returns
    -------
    accuracy : float

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias.metrics import attacked_accuracy
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> X = np.zeros((3, 1, 2, 2), dtype="float32")
    >>> attacked_accuracy(net, X, [0, 0, 0], lambda X: X + 1.0) in (0.0, 1.0)
    True
    """
    if not callable(add_artifact):
        raise ValueError(f"add_artifact must be a callable returning the attacked X, got "
                         f"{add_artifact!r}.")
    check_int("batch_size", batch_size)
    X, _ = check_input(X)
    _check_network_input(net, X)
    X_att, _ = check_input(add_artifact(X), name="add_artifact(X)")
    _check_network_input(net, X_att, name="add_artifact(X)")
    y = np.asarray(y).ravel()
    pred = _predict_labels(net, X_att, batch_size=batch_size)
    if len(pred) != len(y):
        raise ValueError(f"y has {len(y)} labels but X has {len(pred)} samples.")
    return float(np.mean(pred == y))


def artifact_relevance(net, X, masks, target=None, method="lrp", composite="EpsilonPlusFlat",
                       batch_size=64, device="auto"):
    """Share of the absolute attribution that falls inside the artifact masks.

    ``share_i = sum(|R_i| * m_i) / sum(|R_i|)`` with ``R_i`` the attribution map
    (summed over channels) of sample ``i``, averaged over the samples with a
    non-empty mask and non-zero attribution. zennit LRP (``EpsilonPlusFlat``)
    by default, falling back to gradient x input when zennit cannot handle the
    network.

    Parameters
    ----------
    net : torch.nn.Module, skorch NeuralNet or fitted corrector
    X : array-like (n, C, H, W), tensor or Dataset
    masks : array-like of shape (n, H, W) or (H, W)
        1 inside the artifact (e.g. ``data.masks`` or ``data.artifact_mask``).
    target : None, int or array-like of shape (n,), default=None
        Class explained; ``None`` the predicted class.
    method : {"lrp", "gradient_x_input", "gradient"}, default="lrp"
    composite : str, default="EpsilonPlusFlat"
    batch_size : int, default=64
    device : str, default="auto"

    Returns
    -------
    share : float in [0, 1] (``nan`` when no sample has a mask)

    Examples
    --------
    >>> import numpy as np

    >>> from skdebias.models import SmallCNN
    >>> from skdebias.metrics import artifact_relevance
    >>> X = np.random.rand(2, 3, 28, 28).astype("float32")
    >>> mask = np.ones((28, 28))
    >>> round(artifact_relevance(SmallCNN(), X, mask, device="cpu"), 3)
    1.0
    """
    R = attribute(network(net), X, target=target, method=method, composite=composite,
                  batch_size=batch_size, device=device)
    R = np.abs(R.astype(np.float64))
    try:
        m = np.asarray(masks, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"masks must be numeric (1 inside the artifact) of shape {R.shape} or "
                         f"{R.shape[1:]}, got {masks!r}.") from exc
    if m.shape == R.shape[1:]:
        m = np.broadcast_to(m, R.shape)
    if m.shape != R.shape:
        raise ValueError(f"masks must have shape {R.shape} or {R.shape[1:]}, got {m.shape}.")
    inside = (R * m).reshape(len(R), -1).sum(axis=1)
    total = R.reshape(len(R), -1).sum(axis=1)
    valid = (total > 0) & (m.reshape(len(m), -1).sum(axis=1) > 0)
    if not valid.any():
        return float("nan")
    return float(np.mean(inside[valid] / total[valid]))


def worst_group_accuracy(y_true, y_pred, groups, return_groups=False):
    """Lowest accuracy over groups (e.g. class x bias attribute).

    Parameters
    ----------
    y_true, y_pred : array-like of shape (n,)
    groups : array-like of shape (n,) or (n, k)
        Group of each sample; with ``k`` columns each distinct row is a group
        (e.g. ``np.c_[y, concept]``).
    return_groups : bool, default=False
        Also return ``{group: accuracy}``.

    Returns
    -------
    worst : float
    per_group : dict, only with ``return_groups=True``

    Examples
    --------
    >>> from skdebias.metrics import worst_group_accuracy
    >>> worst_group_accuracy([0, 0, 1, 1], [0, 1, 1, 1], groups=[0, 0, 1, 1])
    0.5
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    g = np.asarray(groups)
    if g.ndim not in (1, 2):
        raise ValueError(f"groups must be 1-d or 2-d, got shape {g.shape}.")
    if len(y_true) != len(y_pred) or len(g) != len(y_true):
        raise ValueError(
            f"y_true, y_pred and groups must have the same length, got {len(y_true)}, "
            f"{len(y_pred)} and {len(g)}.")
    if len(y_true) == 0:
        raise ValueError("worst_group_accuracy needs at least one sample.")
    if g.ndim == 1:
        keys, inverse = np.unique(g, return_inverse=True)
        names = [k.item() if hasattr(k, "item") else k for k in keys]
    elif g.ndim == 2:
        keys, inverse = np.unique(g, axis=0, return_inverse=True)
        names = [tuple(k.tolist()) for k in keys]
    else:
        raise ValueError(f"groups must be 1-d or 2-d, got shape {g.shape}.")
    inverse = inverse.ravel()
    correct = y_true == y_pred
    per_group = {names[i]: float(correct[inverse == i].mean()) for i in range(len(names))}
    worst = min(per_group.values())
    return (worst, per_group) if return_groups else worst


class DebiasScorer(_MetadataRequester):
    """Scorer ``scorer(estimator, X, y, **metadata)`` trading accuracy against concept sensitivity.

    ``score = (1 - w) * accuracy + w * (1 - min(s / s_ref, 1))`` with ``s`` the
    concept sensitivity (:func:`concept_sensitivity`, ``"mean_abs"``) of the
    estimator at its layer and ``s_ref`` the sensitivity of a reference: by
    default the *uncorrected* network of a fitted corrector
    (``estimator.estimator`` at ``estimator.layer``) on the same samples, so
    the second term is the fraction of the sensitivity removed. Higher is
    better. Build it with :func:`make_debias_scorer`.

    Metadata (with ``sklearn.set_config(enable_metadata_routing=True)``):
    ``concept_labels`` is requested by default: the sensitivity is measured
    on the samples whose concept label is not -1 (all samples if none is);
    ``sample_weight`` weights the accuracy once requested with
    ``set_score_request(sample_weight=True)``.

    Parameters
    ----------
    layer, cav, reference, sensitivity_weight, target, gradient_pooling, batch_size
        As in :func:`make_debias_scorer`.
    """

    # ``estimator`` is the scored object, not metadata
    __metadata_request__score = {"estimator": _UNUSED, "concept_labels": True}

    def __init__(self, layer=None, cav=None, reference=None, sensitivity_weight=0.5,
                 target=None, gradient_pooling="mean", batch_size=128):
        self.layer = layer
        self.cav = cav
        self.reference = reference
        self.sensitivity_weight = sensitivity_weight
        self.target = target
        self.gradient_pooling = gradient_pooling
        self.batch_size = batch_size

    def __repr__(self):
        return (f"make_debias_scorer(layer={self.layer!r}, sensitivity_weight="
                f"{self.sensitivity_weight!r}, reference={self.reference!r})")

    def _check_params(self):
        """Check the parameters (messages name them); returns ``sensitivity_weight``."""
        w = check_real("sensitivity_weight", self.sensitivity_weight, low=0, high=1)
        check_choice("gradient_pooling", self.gradient_pooling, GRADIENT_POOLINGS)
        check_int("batch_size", self.batch_size)
        if self.reference is not None:
            check_real("reference", self.reference, low=0)
        return w

    def __call__(self, estimator, X, y, **metadata):
        return self.score(estimator, X, y, **metadata)

    def score(self, estimator, X, y, sample_weight=None, concept_labels=None):
        """The score of ``estimator`` on ``(X, y)``; see the class docstring."""
        from sklearn.metrics import accuracy_score
        from sklearn.pipeline import Pipeline

        w = self._check_params()
        final, Xt = estimator, X
        if isinstance(estimator, Pipeline):
            final = estimator[-1]
            if len(estimator) > 1:
                Xt = estimator[:-1].transform(X)
        acc = float(accuracy_score(np.asarray(y).ravel(), final.predict(Xt),
                                   sample_weight=sample_weight))
        if w == 0.0:
            return acc
        layer = self.layer if self.layer is not None else getattr(final, "measure_layer_", None)
        cav = self.cav if self.cav is not None else getattr(final, "cav_", None)
        if layer is None or cav is None:
            raise ValueError(
                "make_debias_scorer needs layer= and cav= unless the scored estimator is a fitted "
                "corrector (with measure_layer_ and cav_).")
        X_s, target = Xt, self.target
        if concept_labels is not None:
            idx = np.flatnonzero(np.asarray(concept_labels).ravel() != -1)
            if 0 < len(idx) < len(np.asarray(concept_labels).ravel()):
                X_s = take(Xt, idx)
                if target is not None and np.ndim(target) > 0:
                    target = np.asarray(target)[idx]
        s = concept_sensitivity(final, X_s, layer, cav, target=target, gradient_pooling=self.gradient_pooling,
                                batch_size=self.batch_size)["mean_abs"]
        if self.reference is not None:
            ref = float(self.reference)
        else:
            original = getattr(final, "estimator", None)
            ref_layer = getattr(final, "layer", None)
            if original is None or ref_layer is None:
                raise ValueError(
                    "reference= (the sensitivity of the uncorrected network) is needed unless "
                    "the scored estimator is a corrector with estimator and layer.")
            ref = concept_sensitivity(original, X_s, ref_layer, cav, target=target,
                                      gradient_pooling=self.gradient_pooling, batch_size=self.batch_size)["mean_abs"]
        if ref > 0:
            removed = 1.0 - min(s / ref, 1.0)
        else:  # nothing to remove: full credit only if the scored model has none either
            removed = 1.0 if s == 0 else 0.0
        return (1.0 - w) * acc + w * removed


def make_debias_scorer(layer=None, cav=None, reference=None, sensitivity_weight=0.5, target=None,
                       gradient_pooling="mean", batch_size=128):
    """A scorer for ``GridSearchCV`` combining accuracy and removed concept sensitivity.

    ``score = (1 - w) * accuracy + w * (1 - min(s / s_ref, 1))``; see
    :class:`DebiasScorer`. With the defaults the layer, the CAV and the
    reference come from the fitted corrector being scored, so
    ``GridSearchCV(GradientPenaltyCorrector(...), {"penalty": [...]},
    scoring=make_debias_scorer())`` needs nothing else.

    Parameters
    ----------
    layer : str or None, default=None
        Layer for the sensitivity; ``None``: the estimator's ``measure_layer_``.
    cav : array-like, fitted CAVEstimator or None, default=None
        ``None``: the estimator's ``cav_``.
    reference : float or None, default=None
        Sensitivity that counts as "nothing removed"; ``None``: the
        sensitivity of the estimator's uncorrected network.
    sensitivity_weight : float in [0, 1], default=0.5
        ``w``; 0 gives plain accuracy.
    target : None, int or array-like, default=None
        Logit for the sensitivity (``None``: predicted class).
    gradient_pooling : {"mean", "max", "sum"}, default="mean"
        As in :func:`concept_sensitivity`.
    batch_size : int, default=128

    Returns
    -------
    scorer : DebiasScorer
        Callable as ``scorer(estimator, X, y, **metadata)``; has
        ``set_score_request`` for metadata routing.

    Examples
    --------
    >>> from skdebias.metrics import make_debias_scorer
    >>> make_debias_scorer(sensitivity_weight=0.3)
    make_debias_scorer(layer=None, sensitivity_weight=0.3, reference=None)
    """
    scorer = DebiasScorer(layer=layer, cav=cav, reference=reference,
                          sensitivity_weight=sensitivity_weight, target=target,
                          gradient_pooling=gradient_pooling, batch_size=batch_size)
    scorer._check_params()
    return scorer


# ---------------------------------------------------------------- spuriosity metrics






def spurious_gap(y_true, y_pred, spuriosity, y=None, k=10, return_per_class=False):
    """Accuracy gap between the most and the least spurious samples of each class.

    For each class ``c`` (Moayeri et al., NeurIPS 2023), the class's samples are
    sorted by ascending ``spuriosity``; the gap is the accuracy on the last ``k``
    (highest spuriosity) minus the accuracy on the first ``k`` (lowest). A
    classifier that relies on the spurious cue is right when the cue is present
    and wrong when it is missing: a large positive gap.

    Usable as a scorer with metadata routing (lower is better)::

        sklearn.set_config(enable_metadata_routing=True)
        scorer = make_scorer(spurious_gap, greater_is_better=False, k=5)
        scorer.set_score_request(spuriosity=True)
        cross_val_score(clf, A, y, scoring=scorer, params={"spuriosity": s})

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        True labels.
    y_pred : array-like of shape (n_samples,)
        Predicted labels.
    spuriosity : array-like of shape (n_samples,)
        Spuriosity per sample (e.g. :meth:`SpuriosityRanker.score_samples
        <skdebias.SpuriosityRanker.score_samples>`); classes whose samples are
        all NaN are skipped.
    y : array-like of shape (n_samples,), optional
        Class used to group the samples; default ``y_true``.
    k : int, default=10
        Samples per class at each end (the paper uses 10 validation images
        per class). The two ends overlap for classes with fewer than ``2 k``
        samples. Samples tied at the k-th value count with equal shares (the
        expected accuracy over random tie-breaking), so the gap does not depend
        on the order of the samples.
    return_per_class : bool, default=False
        Also return ``{class: gap}``.

    Returns
    -------
    gap : float
        Mean of the per-class gaps, in [-1, 1].
    per_class : dict
        Only with ``return_per_class=True``.

    Raises
    ------
    ValueError
        If ``k`` exceeds the size of a scored class, if no class has spuriosity
        values, or if a class mixes NaN and finite spuriosity.

    Examples
    --------
    >>> import numpy as np

    >>> from skdebias.metrics import spurious_gap
    >>> y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    >>> s = np.array([0., 1., 2., 3., 0., 1., 2., 3.])
    >>> pred = np.array([1, 1, 0, 0, 1, 1, 1, 1])   # class 0 right only when spurious
    >>> spurious_gap(y, pred, s, k=2, return_per_class=True)
    (0.5, {0: 1.0, 1: 0.0})
    """
    check_int("k", k)
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    try:
        s = np.asarray(spuriosity, dtype=np.float64).ravel()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spuriosity must hold one number per sample, got {spuriosity!r}.") \
            from exc
    groups = y_true if y is None else np.asarray(y).ravel()
    n = len(y_true)
    for name, arr in (("y_pred", y_pred), ("spuriosity", s), ("y", groups)):
        if len(arr) != n:
            raise ValueError(f"{name} has {len(arr)} entries but y_true has {n}.")
    correct = y_true == y_pred
    per_class = {}
    for c in np.unique(groups).tolist():
        idx = np.flatnonzero(groups == c)
        finite = np.isfinite(s[idx])
        if not finite.any():
            continue
        if not finite.all():
            raise ValueError(
                f"spuriosity of class {c!r} mixes NaN (or infinite) and finite values; give "
                "every sample of a scored class a finite spuriosity.")
        if k > len(idx):
            raise ValueError(
                f"k={k} is larger than class {c!r}, which has {len(idx)} samples; use "
                f"k <= {len(idx)}.")
        per_class[c] = float(gap_weights(s[idx], k) @ correct[idx] / k)
    if not per_class:
        raise ValueError("spuriosity is NaN for every sample: no class has spurious features.")
    gap = float(np.mean(list(per_class.values())))
    return (gap, per_class) if return_per_class else gap

# ---------------------------------------------------------------- counterfactual / group metrics


def counterfactual_bias(net, X, X_cf, y, *, signed=False, batch_size=256):
    """Mean change of the true-class probability when only the bias attribute changes.

    For counterfactual pairs ``(x_i, x_cf_i)`` that differ only in the bias
    attribute (same class ``y_i``), the bias of Fast Model Debiasing
    (Chen et al., NeurIPS 2023) is ``mean_i |p_y(x_i) - p_y(x_cf_i)|``.

    Parameters
    ----------
    net : torch.nn.Module or fitted skorch NeuralNet
        The classifier; a module must output logits (softmax is applied).
    X : array-like or tensor of shape (n, C, H, W)
        The factual images.
    X_cf : array-like or tensor of the same shape as ``X``
        The counterfactual images, ``X_cf[i]`` = ``X[i]`` with another bias attribute.
    y : array-like of shape (n,)
        Class labels (the same for both images of a pair).
    signed : bool, default=False
        Return the signed mean ``mean_i (p_y(x_i) - p_y(x_cf_i))`` instead of the
        mean absolute difference. Positive values mean the factual images
        (e.g. with their training colour) get more confidence.
    batch_size : int, default=256

    Returns
    -------
    bias : float
        In [0, 1] (``signed=False``) or [-1, 1]; 0 means the prediction does not
        depend on the bias attribute.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias.metrics import counterfactual_bias
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    >>> X = np.random.rand(8, 3, 2, 2).astype("float32")
    >>> counterfactual_bias(net, X, X, np.zeros(8, dtype=int))
    0.0
    """
    X, X_cf, n = _check_pairs(net, X, X_cf, batch_size)
    y = np.asarray(y).ravel()
    if len(y) != n:
        raise ValueError(f"y has {len(y)} labels but X has {n} samples.")
    p = predict_proba(net, X, batch_size=batch_size)
    p_cf = predict_proba(net, X_cf, batch_size=batch_size)
    y = encode_y(y, network_classes(net, p.shape[1]))  # labels -> output columns
    rows = np.arange(n)
    diff = p[rows, y].astype(np.float64) - p_cf[rows, y].astype(np.float64)
    return float(diff.mean() if signed else np.abs(diff).mean())


def counterfactual_flip_rate(net, X, X_cf, *, batch_size=256):
    """Share of counterfactual pairs whose predicted class changes with the bias attribute.

    The decision-level companion of :func:`counterfactual_bias`, independent of
    how confident the network is. A network that only grows less confident
    (its logits divided by a temperature, say) has a smaller
    ``counterfactual_bias`` but the same flip rate: its decisions still follow
    the bias attribute.

    Parameters
    ----------
    net : torch.nn.Module or fitted skorch NeuralNet
        The classifier; a module must output logits.
    X : array-like or tensor of shape (n, C, H, W)
        The factual images.
    X_cf : array-like or tensor of the same shape as ``X``
        The counterfactual images, ``X_cf[i]`` = ``X[i]`` with another bias attribute.
    batch_size : int, default=256

    Returns
    -------
    rate : float
        In [0, 1]: the fraction of pairs with ``argmax p(x_i) != argmax p(x_cf_i)``.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias.metrics import counterfactual_flip_rate
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2, bias=False))
    >>> _ = net[1].weight.data.copy_(torch.tensor([[1., 0, 0, 0], [0, 1, 0, 0]]))
    >>> X = np.array([[[[1., 0], [0, 0]]], [[[0, 1], [0, 0]]]], dtype="float32")
    >>> counterfactual_flip_rate(net, X, X[::-1].copy())   # swapped: both predictions change
    1.0
    >>> counterfactual_flip_rate(net, X, X / 4)           # only less confident: none changes
    0.0
    """
    X, X_cf, _ = _check_pairs(net, X, X_cf, batch_size)
    p = predict_proba(net, X, batch_size=batch_size)
    p_cf = predict_proba(net, X_cf, batch_size=batch_size)
    return float(np.mean(p.argmax(axis=1) != p_cf.argmax(axis=1)))


def _check_pairs(net, X, X_cf, batch_size):
    """Checked counterfactual pairs ``(X, X_cf, n)`` for a network (``check_input`` rejects
    an empty ``X``)."""
    check_int("batch_size", batch_size)
    X, _ = check_input(X)
    X_cf, _ = check_input(X_cf, name="X_cf")
    _check_network_input(net, X)
    n, n_cf = n_samples(X), n_samples(X_cf)
    shape = tuple(getattr(X, "shape", ())[1:])
    shape_cf = tuple(getattr(X_cf, "shape", ())[1:])
    if n != n_cf or shape != shape_cf:
        raise ValueError(
            f"X_cf must have the same shape as X (one counterfactual per sample); got X with "
            f"{n} samples of shape {shape} and X_cf with {n_cf} samples of shape {shape_cf}.")
    return X, X_cf, n
