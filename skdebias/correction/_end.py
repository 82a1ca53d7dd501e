"""EnD: Entangling and Disentangling deep representations for bias correction.

Tartaglione, Barbano and Grangetto, CVPR 2021. A regulariser on the features of a
bottleneck layer: samples that share the bias attribute are pushed apart
(disentangling term), samples of the same class with different bias attributes
are pulled together (entangling term).

Bias labels reach every batch through the data: the input is a dict
``{"X": images, "bias": labels}`` (or a :class:`skorch.helper.SliceDict`), which
skorch slices into batches together with ``y``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit
from torch import nn

from .._utils._modules import find_layer, get_module, last_linear
from .._utils._validation import check_choice, check_group_labels, check_real
from ..base import BIAS_KEY, INPUT_KEY, DictInputClassifier, HookedLossMixin, LayerCapture
from ..exceptions import SaturatedPenaltyWarning

__all__ = ["end_terms", "EnDRegularizer", "EnDClassifier", "IgnoreBiasInput"]

PERP_LOSSES = ("linear", "log")
#: mean ``R_perp`` of the last training epoch from which the term counts as saturated
SATURATED_PERP = 0.95
# ``-log(1 - R_perp)`` is evaluated at ``R_perp <= 1 - _LOG_EPS`` (at most about 13.8)
_LOG_EPS = 1e-6


# ------------------------------------------------------------------ the two terms
def end_terms(features, y, bias, center=False):
    """The disentangling and entangling terms of EnD for one batch.

    With ``D`` the batch features flattened (with ``center=True`` minus their
    batch mean), L2-normalised per sample, and ``G = D D^T``:

    - ``R_perp = sum_b |sum_{i<j, b_i=b_j=b} G_ij| / #pairs`` over all pairs
      ``i<j`` that share a bias label (0 when there are none);
    - ``R_par = 1 - mean_{i<j, y_i=y_j, b_i!=b_j} (1 + G_ij) / 2`` (0 when the
      batch holds no pair of the same class with different bias labels).

    A term without pairs is a zero that is still part of the graph, so a batch
    without pairs (e.g. a last batch of one sample) back-propagates zero.

    Parameters
    ----------
    features : torch.Tensor of shape (B, ...)
        Bottleneck features; every axis after the first is flattened.
    y : torch.Tensor or array-like of shape (B,)
        Class labels.
    bias : torch.Tensor or array-like of shape (B,)
        Bias labels (e.g. colour index).
    center : bool, default=False
        Subtract the batch mean of the features before the normalisation.
        ``False`` gives the terms of the paper. Features that are never
        negative (after a ReLU or a pooling of ReLU maps) have ``G_ij >= 0``,
        so ``R_perp`` cannot reach 0 without switching features off; centred
        features have signed similarities, and ``R_perp`` then measures how
        far the mean of each bias group lies from the batch mean.

    Returns
    -------
    r_perp, r_par : torch.Tensor
        Scalars, differentiable with respect to ``features``.

    Examples
    --------
    >>> import torch
    >>> from skdebias.correction import end_terms
    >>> f = torch.tensor([[1., 0.], [1., 0.], [0., 1.], [1., 0.]])
    >>> r_perp, r_par = end_terms(f, [0, 0, 1, 1], [0, 0, 1, 0])
    >>> float(r_perp), float(r_par)
    (1.0, 0.5)
    """
    D = features.reshape(features.shape[0], -1)
    if center:
        D = D - D.mean(dim=0, keepdim=True)
    D = nn.functional.normalize(D, p=2, dim=1)
    G = D @ D.T
    device = G.device
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y, device=device)
    bias = torch.as_tensor(np.asarray(bias) if not isinstance(bias, torch.Tensor) else bias,
                           device=device)
    if y.shape[0] != G.shape[0] or bias.shape[0] != G.shape[0]:
        raise ValueError(
            f"features, y and bias must have the same length; got {G.shape[0]}, "
            f"{y.shape[0]} and {bias.shape[0]}.")
    upper = torch.ones_like(G, dtype=torch.bool).triu(diagonal=1)
    same_bias = (bias[:, None] == bias[None, :]) & upper
    n_perp = int(same_bias.sum())
    if n_perp:
        r_perp = G.new_zeros(())
        for b in torch.unique(bias[same_bias.any(dim=1)]):
            mask = same_bias & (bias[:, None] == b)
            r_perp = r_perp + G[mask].sum().abs()
        r_perp = r_perp / n_perp
    else:
        # +0.0 (the diagonal is >= 0) with a graph: backward() works on a batch without pairs
        r_perp = G.diagonal().sum() * 0.0
    entangle = (y[:, None] == y[None, :]) & (bias[:, None] != bias[None, :]) & upper
    if bool(entangle.any()):
        r_par = 1.0 - ((1.0 + G[entangle]) / 2.0).mean()
    else:
        r_par = G.diagonal().sum() * 0.0
    return r_perp, r_par


def _weighted_end_terms(features, y, bias, alpha, beta, center=False, perp_loss="linear"):
    """The weighted terms of one batch as ``{name: (weight, term)}``, the labels moved to the
    features' device: the one term computation behind the classifier's loss,
    :meth:`EnDRegularizer.penalty` and the callback's gradient.

    ``"end_perp"`` and ``"end_par"`` are ``R_perp`` and ``R_par``. With ``perp_loss="log"``
    the disentangling term enters as ``"end_perp_log"``, ``-log(1 - R_perp)`` with weight
    ``alpha``, and ``"end_perp"`` is kept, with weight 0, to be logged."""
    device = features.device
    r_perp, r_par = end_terms(features, torch.as_tensor(y, device=device),
                              torch.as_tensor(bias, device=device), center=center)
    if perp_loss == "log":
        # d/dR -log(1 - R) = 1 / (1 - R): the gradient of R_perp, which vanishes where the
        # features of each bias group point one way (R_perp -> 1), is scaled up by as much
        log_perp = -torch.log1p(-r_perp.clamp(max=1.0 - _LOG_EPS))
        return {"end_perp": (0.0, r_perp), "end_par": (float(beta), r_par),
                "end_perp_log": (float(alpha), log_perp)}
    return {"end_perp": (float(alpha), r_perp), "end_par": (float(beta), r_par)}


def _penalty(terms):
    """The penalty ``sum weight * term`` of :func:`_weighted_end_terms` (``alpha * R_perp +
    beta * R_par``, or ``-alpha * log(1 - R_perp) + beta * R_par``)."""
    return sum(weight * term for weight, term in terms.values())


def _warn_saturated(history, alpha, perp_loss):
    """Issue :class:`~skdebias.exceptions.SaturatedPenaltyWarning` when the mean ``R_perp``
    of the last training epoch in ``history`` is at least :data:`SATURATED_PERP`."""
    if not alpha or not len(history):
        return
    values = [b["end_perp"] for b in history[-1]["batches"] if "end_perp" in b]
    mean = float(np.mean(values)) if values else 0.0
    if mean < SATURATED_PERP:
        return
    advice = ("set perp_loss='log', whose gradient does not vanish there, or raise alpha"
              if perp_loss == "linear" else "raise alpha")
    warnings.warn(
        f"EnD's disentangling term R_perp averaged {mean:.3f} over the last "
        f"training epoch (1: the bottleneck features of each bias group all point one way). "
        f"Its gradient vanishes there, so the regulariser could not remove the bias from "
        f"these features; {advice} (now {alpha}).", SaturatedPenaltyWarning, stacklevel=2)


def _check_weights(est):
    """Validate ``alpha``, ``beta``, ``center`` and ``perp_loss`` of an EnD estimator or
    callback."""
    check_real("alpha", est.alpha, low=0)
    check_real("beta", est.beta, low=0)
    check_choice("center", est.center, (True, False))
    check_choice("perp_loss", est.perp_loss, PERP_LOSSES)


def _resolve_bottleneck(module, layer):
    """``(layer_module, capture_input)`` for ``layer`` (None: input of the last Linear)."""
    if layer is None:
        return find_layer(module, last_linear(module, "layer")), True
    return find_layer(module, layer), False


class EnDRegularizer(Callback):
    """The EnD regulariser ``alpha * R_perp + beta * R_par`` at a bottleneck layer.

    Usable three ways:

    1. **Loss term in a torch loop**: ``with reg.attach(model) as store:`` records
       the bottleneck features of the forward pass; add
       ``reg.penalty(store[-1], y, bias)`` to the loss.
    2. **skorch callback on any** :class:`skorch.NeuralNet`: pass it in
       ``callbacks=[...]`` and fit on ``X = {"X": images, "bias": bias_labels}``
       (a dict or :class:`skorch.helper.SliceDict`). Each training batch adds the
       gradient of the penalty at the bottleneck (exactly as if the penalty were
       part of the loss; the logged ``train_loss`` stays the plain loss, the terms
       are logged per batch as ``end_perp`` / ``end_par``). skorch passes every
       key of a dict input to ``module.forward``, so the module must accept the
       ``bias`` keyword: wrap it in :class:`IgnoreBiasInput`. The hook lives for
       one forward pass of a training batch and is removed when that forward
       pass ends, also when it (or the loss after it) raises.
    3. Inside :class:`EnDClassifier`, which does all of this for you and adds the
       penalty to the loss.

    Parameters
    ----------
    layer : str or None, default=None
        Bottleneck whose *output* is regularised, a name from
        ``dict(module.named_modules())``. ``None`` uses the *input* of the last
        :class:`torch.nn.Linear` layer (the penultimate features).
    alpha : float >= 0, default=1.0
        Weight of the disentangling term ``R_perp``.
    beta : float >= 0, default=3.0
        Weight of the entangling term ``R_par``.
    center : bool, default=True
        Centre the bottleneck features on their batch mean before the
        normalisation (see :func:`end_terms`); ``False`` gives the paper's
        terms, which leave networks with ReLU features as biased as without
        the regulariser (see the EnD section of the documentation).
    perp_loss : {"linear", "log"}, default="linear"
        How the disentangling term enters the loss: ``"linear"`` adds
        ``alpha * R_perp`` (the paper); ``"log"`` adds ``-alpha * log(1 - R_perp)``,
        equal near 0 and with a gradient that does not vanish where ``R_perp``
        nears 1 (every bias group's features point one way, as they do from
        the start for average-pooled features of a background colour). The
        logged ``end_perp`` is ``R_perp`` either way; ``"log"`` also logs
        ``end_perp_log``.

    See Also
    --------
    end_terms : The two terms for one batch.
    EnDClassifier : A skorch classifier trained with this regulariser.

    Examples
    --------
    >>> import torch
    >>> from skdebias.correction import EnDRegularizer
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> reg = EnDRegularizer(alpha=1.0, beta=0.5)
    >>> x, y, bias = torch.randn(6, 4), torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 1, 0])
    >>> with reg.attach(model) as store:
    ...     logits = model(x)
    >>> loss = torch.nn.functional.cross_entropy(logits, y) + reg.penalty(store[-1], y, bias)
    >>> loss.backward()
    """

    def __init__(self, layer=None, alpha=1.0, beta=3.0, center=True, perp_loss="linear"):
        self.layer = layer
        self.alpha = alpha
        self.beta = beta
        self.center = center
        self.perp_loss = perp_loss

    # ---------------------------------------------------------------- loss-term use
    def penalty(self, features, y, bias):
        """``alpha * R_perp + beta * R_par`` for one batch (``perp_loss="log"``:
        ``-alpha * log(1 - R_perp) + beta * R_par``), differentiable."""
        _check_weights(self)
        return _penalty(_weighted_end_terms(features, y, bias, self.alpha, self.beta,
                                            self.center, self.perp_loss))

    @contextlib.contextmanager
    def attach(self, module):
        """Record the bottleneck features (with their graph) of forward passes through ``module``.

        Yields a list; each forward appends the batch features. The hook is removed on exit.
        """
        layer, capture_input = _resolve_bottleneck(get_module(module), self.layer)
        with LayerCapture(layer, capture_input) as capture:
            yield capture.store

    # ---------------------------------------------------------------- callback use
    def initialize(self):
        self._close()
        return self

    def _close(self):
        capture = self.__dict__.pop("_capture", None)
        if capture is not None:
            capture.close()

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        _check_weights(self)
        if not (isinstance(X, Mapping) and BIAS_KEY in X):
            raise ValueError(
                "EnDRegularizer needs bias labels in every batch: fit the net on "
                f"X={{'{INPUT_KEY}': images, '{BIAS_KEY}': bias_labels}} (a dict or "
                "skorch.helper.SliceDict), or use EnDClassifier.fit(X, y, bias=...).")
        self._close()
        # resolved once per fit, so an unknown layer name fails before the first batch
        self._layer = _resolve_bottleneck(net.module_, self.layer)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        self._close()
        self.__dict__.pop("_layer", None)
        _warn_saturated(net.history, self.alpha, self.perp_loss)

    def on_batch_begin(self, net, batch=None, training=None, **kwargs):
        self._close()
        layer = self.__dict__.get("_layer")
        if not training or batch is None or layer is None:
            return
        Xi, yi = batch[0], batch[1]
        if isinstance(Xi, Mapping) and BIAS_KEY in Xi:
            # a callback has no finally around the step: the capture closes itself when
            # the network's forward pass ends, even when it raises
            self._capture = LayerCapture(*layer).open(
                root=net.module_, on_forward_end=functools.partial(
                    self._inject, net, yi, Xi[BIAS_KEY]))

    def on_batch_end(self, net, batch=None, training=None, **kwargs):
        self._close()

    def _inject(self, net, y, bias, capture):
        """Make the gradient of the penalty flow into the captured features in backward."""
        feats = capture.last
        # a bottleneck a subclass keeps in eval mode while training is left alone, as the
        # callback has always done
        if not isinstance(feats, torch.Tensor) or not torch.is_grad_enabled() or \
                not capture.layer.training:
            return
        with torch.enable_grad():
            leaf = feats.detach().requires_grad_(True)
            terms = _weighted_end_terms(leaf, y, bias, self.alpha, self.beta, self.center,
                                        self.perp_loss)
            (grad,) = torch.autograd.grad(_penalty(terms), leaf, allow_unused=True)
        for name, (_, term) in terms.items():
            net.history.record_batch(name, float(term.detach()))
        if grad is None or not feats.requires_grad:
            return
        # the gradient reaching the features becomes dLoss/dfeats + dPenalty/dfeats, exactly
        # as if the penalty were part of the loss (a callback cannot change the loss)
        feats.register_hook(functools.partial(_add_gradient, grad))

    def _get_param_names(self):
        # skorch lists every public attribute; the state of a running fit is no parameter
        return [k for k in super()._get_param_names() if not k.startswith("_")]

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_capture", "_layer"):
            state.pop(key, None)
        return state


def _add_gradient(extra, grad):
    return grad + extra


class IgnoreBiasInput(nn.Module):
    """Wrap a module so that it accepts (and ignores) the ``bias`` key of a dict input.

    skorch calls ``module(**X)`` for a dict ``X``; this wrapper takes
    ``forward(X, bias=None)`` and returns ``module(X)``. Layer names gain the
    prefix ``"module."``.

    Parameters
    ----------
    module : torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> from skdebias.correction import IgnoreBiasInput
    >>> wrapped = IgnoreBiasInput(torch.nn.Linear(3, 2))
    >>> wrapped(X=torch.zeros(4, 3), bias=torch.zeros(4)).shape
    torch.Size([4, 2])
    """

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, X, bias=None, **kwargs):
        return self.module(X, **kwargs)


# ------------------------------------------------------------------ skorch classifier
class EnDClassifier(HookedLossMixin, DictInputClassifier):
    """A skorch classifier trained with cross-entropy plus the EnD regulariser.

    The loss of every training (and validation) batch is
    ``CE + alpha * R_perp + beta * R_par`` (see :func:`end_terms`), with the
    features of the bottleneck ``layer``. Bias labels are passed to
    ``fit(X, y, bias=...)`` (also through sklearn metadata routing after
    ``set_fit_request(bias=True)``), or inside a dict input
    ``{"X": images, "bias": labels}``. Prediction takes plain images. A module
    instance is copied at every ``fit``: the caller's module keeps its weights.

    Parameters
    ----------
    module : torch.nn.Module class or instance
        Must output logits (the default criterion is cross-entropy).
    *args, **kwargs
        Passed to :class:`skorch.NeuralNetClassifier` (``max_epochs``, ``lr``,
        ``optimizer``, ``batch_size``, ``device``, ``module__*``, ...).
    layer : str or None, default=None
        Bottleneck whose output is regularised; ``None`` uses the input of the
        last :class:`torch.nn.Linear` (for :class:`~skdebias.models.SmallCNN`:
        the output of ``classifier.1``).
    alpha : float >= 0, default=1.0
        Weight of the disentangling term.
    beta : float >= 0, default=3.0
        Weight of the entangling term.
    center : bool, default=True
        Centre the bottleneck features on their batch mean before the
        normalisation (see :func:`end_terms`); ``False`` gives the paper's
        terms. The defaults (``layer=None``, ``alpha=1``, ``beta=3``,
        ``center=True``, ``perp_loss="linear"``) were chosen on Biased-MNIST
        (``rho=0.99``, background colour) with :class:`~skdebias.models.SmallCNN`.
    perp_loss : {"linear", "log"}, default="linear"
        ``alpha * R_perp`` in the loss, or ``-alpha * log(1 - R_perp)``, whose
        gradient does not vanish as ``R_perp`` nears 1 (see
        :class:`EnDRegularizer`). A fit whose last epoch averages
        ``R_perp >= 0.95`` warns with
        :class:`~skdebias.exceptions.SaturatedPenaltyWarning`.
    criterion : default=torch.nn.CrossEntropyLoss
    train_split : default=ValidSplit(5, stratified=True) (skorch's default);
        ``None`` trains on all data.

    Attributes
    ----------
    module_, history_, classes_ : as in skorch. The batch history also holds
        ``end_perp`` and ``end_par`` for training batches.

    See Also
    --------
    EnDRegularizer : The regulariser as a callback or loss term for any network.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias.correction import EnDClassifier
    >>> from skdebias.models import SmallCNN
    >>> X = np.random.rand(32, 3, 28, 28).astype("float32")
    >>> y = np.arange(32) % 2
    >>> bias = (np.arange(32) // 2) % 2
    >>> clf = EnDClassifier(SmallCNN, module__n_classes=2, alpha=1.0, beta=1.0,
    ...                     max_epochs=1, train_split=None, verbose=0)
    >>> clf.fit(X, y, bias=bias).predict(X).shape
    (32,)
    """

    hooked_term_names = ("end_perp", "end_par", "end_perp_log")
    # the batch-history keys EnD has always had: end_perp / end_par, training batches only
    hooked_history = ("", None)
    hooked_epoch_scores = False
    chance_level_advice = ("the regulariser outweighs the classification: lower alpha (now "
                           "{net.alpha}) or beta (now {net.beta}), or train longer (max_epochs, "
                           "now {net.max_epochs})")

    def __init__(self, module, *args, layer=None, alpha=1.0, beta=3.0, center=True,
                 perp_loss="linear", criterion=nn.CrossEntropyLoss,
                 train_split=ValidSplit(5, stratified=True), **kwargs):
        super().__init__(module, *args, criterion=criterion, train_split=train_split, **kwargs)
        self.layer = layer
        self.alpha = alpha
        self.beta = beta
        self.center = center
        self.perp_loss = perp_loss

    def fit(self, X, y, bias=None, **fit_params):
        """Train on ``X`` with class labels ``y`` and bias labels ``bias``.

        Parameters
        ----------
        X : array-like or tensor (n, C, H, W), or dict ``{"X": images, "bias": labels}``
            Converted to float32; NaN or infinity raise a ``ValueError``.
        y : array-like of shape (n,)
        bias : array-like of shape (n,), optional
            Integer bias labels (e.g. colour index); required unless ``X`` is a
            dict carrying them.
        **fit_params : passed to :meth:`skorch.NeuralNet.fit`.

        Returns
        -------
        self : EnDClassifier
        """
        return super().fit(self._with_bias(X, bias, "fit"), y, **fit_params)

    def partial_fit(self, X, y=None, classes=None, bias=None, **fit_params):
        """Continue training; bias labels as in :meth:`fit`."""
        return super().partial_fit(self._with_bias(X, bias, "partial_fit"), y, classes=classes,
                                   **fit_params)

    def _with_bias(self, X, bias, method):
        _check_weights(self)
        packed = self._pack(X, BIAS_KEY, bias, check_group_labels)
        if packed is None:
            raise ValueError(
                f"EnDClassifier.{method} needs bias labels: call {method}(X, y, "
                "bias=bias_labels) (with metadata routing: set_fit_request(bias=True)) or "
                f"pass X={{'{INPUT_KEY}': images, '{BIAS_KEY}': bias_labels}}.")
        return packed

    def hooked_layer(self):
        return _resolve_bottleneck(self.module_, self.layer)

    def hooked_terms(self, activations, y_pred, y_true, X, training):
        if not (isinstance(X, Mapping) and BIAS_KEY in X):
            return None
        return _weighted_end_terms(activations, y_true, X[BIAS_KEY], self.alpha, self.beta,
                                   self.center, self.perp_loss)

    def on_train_end(self, net, **kwargs):
        super().on_train_end(net, **kwargs)
        _warn_saturated(self.history, self.alpha, self.perp_loss)
