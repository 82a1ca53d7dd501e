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
from collections.abc import Mapping

import numpy as np
import torch
from skorch import NeuralNetClassifier
from skorch.callbacks import Callback
from skorch.dataset import ValidSplit
from torch import nn

from .._torch import capture_output, find_layer, get_module, last_linear, n_samples
from .._validation import check_real

__all__ = ["end_terms", "EnDRegularizer", "EnDClassifier", "IgnoreBiasInput"]

#: Key of the images in a dict input.
INPUT_KEY = "X"
#: Key of the bias labels in a dict input.
BIAS_KEY = "bias"


# ------------------------------------------------------------------ the two terms
def end_terms(features, y, bias):
    """The disentangling and entangling terms of EnD for one batch.

    With ``D`` the batch features flattened and L2-normalised per sample and
    ``G = D D^T``:

    - ``R_perp = sum_b |sum_{i<j, b_i=b_j=b} G_ij| / #pairs`` over all pairs
      ``i<j`` that share a bias label (0 when there are none);
    - ``R_par = 1 - mean_{i<j, y_i=y_j, b_i!=b_j} (1 + G_ij) / 2`` (0 when the
      batch holds no pair of the same class with different bias labels).

    Parameters
    ----------
    features : torch.Tensor of shape (B, ...)
        Bottleneck features; every axis after the first is flattened.
    y : torch.Tensor or array-like of shape (B,)
        Class labels.
    bias : torch.Tensor or array-like of shape (B,)
        Bias labels (e.g. colour index).

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
    zero = G.new_zeros(())
    n_perp = int(same_bias.sum())
    if n_perp:
        r_perp = zero
        for b in torch.unique(bias[same_bias.any(dim=1)]):
            mask = same_bias & (bias[:, None] == b)
            r_perp = r_perp + G[mask].sum().abs()
        r_perp = r_perp / n_perp
    else:
        r_perp = zero
    entangle = (y[:, None] == y[None, :]) & (bias[:, None] != bias[None, :]) & upper
    if bool(entangle.any()):
        r_par = 1.0 - ((1.0 + G[entangle]) / 2.0).mean()
    else:
        r_par = zero
    return r_perp, r_par


def _resolve_bottleneck(module, layer):
    """``(layer_module, capture_input)`` for ``layer`` (None: input of the last Linear)."""
    if layer is None:
        return find_layer(module, last_linear(module, "layer")), True
    return find_layer(module, layer), False


class _InjectGradient(torch.autograd.Function):
    """Identity in the forward pass; adds a fixed gradient in the backward pass."""

    @staticmethod
    def forward(ctx, x, grad):
        ctx.save_for_backward(grad)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad_output + grad, None


# ------------------------------------------------------------------ regulariser
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
       ``bias`` keyword: wrap it in :class:`IgnoreBiasInput`.
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
    beta : float >= 0, default=1.0
        Weight of the entangling term ``R_par``.

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

    def __init__(self, layer=None, alpha=1.0, beta=1.0):
        self.layer = layer
        self.alpha = alpha
        self.beta = beta

    # ---------------------------------------------------------------- loss-term use
    def penalty(self, features, y, bias):
        """``alpha * R_perp + beta * R_par`` for one batch (differentiable)."""
        alpha = check_real("alpha", self.alpha, low=0)
        beta = check_real("beta", self.beta, low=0)
        r_perp, r_par = end_terms(features, y, bias)
        return alpha * r_perp + beta * r_par

    @contextlib.contextmanager
    def attach(self, module):
        """Record the bottleneck features (with their graph) of forward passes through ``module``.

        Yields a list; each forward appends the batch features. The hook is removed on exit.
        """
        layer, capture_input = _resolve_bottleneck(get_module(module), self.layer)
        with capture_output(layer, detach=False, capture_input=capture_input) as store:
            yield store

    # ---------------------------------------------------------------- callback use
    def initialize(self):
        self._remove_hook()
        self._batch = None
        return self

    def _remove_hook(self):
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.remove()
        self._handle = None

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        check_real("alpha", self.alpha, low=0)
        check_real("beta", self.beta, low=0)
        if not (isinstance(X, Mapping) and BIAS_KEY in X):
            raise ValueError(
                "EnDRegularizer needs bias labels in every batch: fit the net on "
                f"X={{'{INPUT_KEY}': images, '{BIAS_KEY}': bias_labels}} (a dict or "
                "skorch.helper.SliceDict), or use EnDClassifier.fit(X, y, bias=...).")
        self._remove_hook()
        self._net = net
        layer, capture_input = _resolve_bottleneck(net.module_, self.layer)
        self._handle = self._register(layer, capture_input)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        self._remove_hook()
        self._batch = None
        self._net = None

    def on_batch_begin(self, net, batch=None, training=None, **kwargs):
        self._batch = None
        if not training or batch is None:
            return
        Xi, yi = batch[0], batch[1]
        if isinstance(Xi, Mapping) and BIAS_KEY in Xi:
            self._batch = (yi, Xi[BIAS_KEY])

    def on_batch_end(self, net, batch=None, training=None, **kwargs):
        self._batch = None

    def _injected(self, feats):
        """``feats`` carrying the gradient of the penalty of the current batch, or ``None``."""
        if self._batch is None or not torch.is_grad_enabled() or not isinstance(feats, torch.Tensor):
            return None
        y, bias = self._batch
        self._batch = None  # one injection per training step
        with torch.enable_grad():
            leaf = feats.detach().requires_grad_(True)
            r_perp, r_par = end_terms(leaf, torch.as_tensor(y, device=leaf.device),
                                      torch.as_tensor(bias, device=leaf.device))
            penalty = float(self.alpha) * r_perp + float(self.beta) * r_par
            (grad,) = torch.autograd.grad(penalty, leaf, allow_unused=True)
        if self._net is not None:
            self._net.history.record_batch("end_perp", float(r_perp.detach()))
            self._net.history.record_batch("end_par", float(r_par.detach()))
        if grad is None or not feats.requires_grad:
            return None
        return _InjectGradient.apply(feats, grad)

    def _register(self, layer, capture_input):
        if capture_input:
            def pre_hook(module, inputs):
                if not module.training or not inputs:
                    return None
                new = self._injected(inputs[0])
                return None if new is None else (new, *inputs[1:])

            return layer.register_forward_pre_hook(pre_hook)

        def hook(module, inputs, output):
            if not module.training:
                return None
            return self._injected(output)

        return layer.register_forward_hook(hook)

    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_handle", "_net", "_batch"):
            state[key] = None
        return state


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


# ------------------------------------------------------------------ skorch classifiers
def _bias_labels(bias, n, name="bias"):
    bias = np.asarray(bias.detach().cpu() if isinstance(bias, torch.Tensor) else bias)
    if bias.ndim != 1 or len(bias) != n:
        raise ValueError(
            f"{name} must be a 1-d array with one label per sample ({n}), got shape {bias.shape}.")
    if not np.issubdtype(bias.dtype, np.integer):
        if np.issubdtype(bias.dtype, np.floating) and np.all(np.isfinite(bias)) and \
                np.all(bias == np.round(bias)):
            bias = bias.astype(np.int64)
        else:
            raise ValueError(
                f"{name} must hold integer group labels (e.g. colour index), got dtype "
                f"{bias.dtype}.")
    return bias.astype(np.int64)


class _DictInputClassifier(NeuralNetClassifier):
    """A NeuralNetClassifier whose dict input may carry extra per-sample keys.

    ``infer`` strips the keys in ``_extra_keys`` before calling the module, and
    passes the bare images when only ``"X"`` is left, so any module works.
    """

    _extra_keys = (BIAS_KEY,)

    def infer(self, x, **fit_params):
        if isinstance(x, Mapping):
            x = {k: v for k, v in x.items() if k not in self._extra_keys}
            if set(x) == {INPUT_KEY}:
                x = x[INPUT_KEY]
        return super().infer(x, **fit_params)

    def _pack(self, X, name, values, dtype_check):
        """``X`` as a dict input carrying ``values`` under ``name``."""
        if isinstance(X, Mapping):
            if name in X:
                if values is not None:
                    raise ValueError(
                        f"{name} was given both as a key of the dict X and as the {name}= "
                        "argument of fit; pass it once.")
                X = dict(X)
                X[name] = dtype_check(X[name], n_samples(next(iter(X.values()))), name)
                return X
            if values is None:
                return None
            if INPUT_KEY not in X:
                raise ValueError(f"A dict X must hold the images under the key {INPUT_KEY!r}.")
            n = n_samples(X[INPUT_KEY])
            X = dict(X)
            X[name] = dtype_check(values, n, name)
            return X
        if values is None:
            return None
        if isinstance(X, torch.utils.data.Dataset) and not isinstance(X, torch.Tensor):
            raise TypeError(
                f"With {name}= labels, X must be an array or tensor (n, C, H, W), not a "
                "Dataset; or pass a Dataset whose items already carry them.")
        n = n_samples(X)
        return {INPUT_KEY: X, name: dtype_check(values, n, name)}


class EnDClassifier(_DictInputClassifier):
    """A skorch classifier trained with cross-entropy plus the EnD regulariser.

    The loss of every training (and validation) batch is
    ``CE + alpha * R_perp + beta * R_par`` (see :func:`end_terms`), with the
    features of the bottleneck ``layer``. Bias labels are passed to
    ``fit(X, y, bias=...)`` (also through sklearn metadata routing after
    ``set_fit_request(bias=True)``), or inside a dict input
    ``{"X": images, "bias": labels}``. Prediction takes plain images.

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
    beta : float >= 0, default=1.0
        Weight of the entangling term.
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

    def __init__(self, module, *args, layer=None, alpha=1.0, beta=1.0,
                 criterion=nn.CrossEntropyLoss, train_split=ValidSplit(5, stratified=True),
                 **kwargs):
        super().__init__(module, *args, criterion=criterion, train_split=train_split, **kwargs)
        self.layer = layer
        self.alpha = alpha
        self.beta = beta

    def _regularizer(self):
        return EnDRegularizer(layer=self.layer, alpha=self.alpha, beta=self.beta)

    def fit(self, X, y, bias=None, **fit_params):
        """Train on ``X`` with class labels ``y`` and bias labels ``bias``.

        Parameters
        ----------
        X : array-like or tensor (n, C, H, W), or dict ``{"X": images, "bias": labels}``
        y : array-like of shape (n,)
        bias : array-like of shape (n,), optional
            Integer bias labels (e.g. colour index); required unless ``X`` is a
            dict carrying them.
        **fit_params : passed to :meth:`skorch.NeuralNet.fit`.

        Returns
        -------
        self : EnDClassifier
        """
        check_real("alpha", self.alpha, low=0)
        check_real("beta", self.beta, low=0)
        packed = self._pack(X, BIAS_KEY, bias, _bias_labels)
        if packed is None:
            raise ValueError(
                "EnDClassifier.fit needs bias labels: call fit(X, y, bias=bias_labels) "
                f"(with metadata routing: set_fit_request(bias=True)) or pass "
                f"X={{'{INPUT_KEY}': images, '{BIAS_KEY}': bias_labels}}.")
        return super().fit(packed, y, **fit_params)

    def partial_fit(self, X, y=None, classes=None, bias=None, **fit_params):
        """Continue training; bias labels as in :meth:`fit`."""
        if not (isinstance(X, Mapping) and BIAS_KEY in X):
            packed = self._pack(X, BIAS_KEY, bias, _bias_labels)
            if packed is None:
                raise ValueError(
                    "EnDClassifier.partial_fit needs bias labels: pass bias=... or a dict X "
                    f"with the key {BIAS_KEY!r}.")
            X = packed
        return super().partial_fit(X, y, classes=classes, **fit_params)

    @contextlib.contextmanager
    def _capture(self):
        with self._regularizer().attach(self.module_) as store:
            self._end_store = store
            try:
                yield
            finally:
                self._end_store = None

    def train_step_single(self, batch, **fit_params):
        with self._capture():
            return super().train_step_single(batch, **fit_params)

    def validation_step(self, batch, **fit_params):
        with self._capture():
            return super().validation_step(batch, **fit_params)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        loss = super().get_loss(y_pred, y_true, X=X, training=training)
        store = getattr(self, "_end_store", None)
        if not store or not (isinstance(X, Mapping) and BIAS_KEY in X):
            return loss
        bias = torch.as_tensor(X[BIAS_KEY], device=store[-1].device)
        y_t = torch.as_tensor(y_true, device=store[-1].device)
        r_perp, r_par = end_terms(store[-1], y_t, bias)
        if training:
            self.history.record_batch("end_perp", float(r_perp.detach()))
            self.history.record_batch("end_par", float(r_par.detach()))
        return loss + float(self.alpha) * r_perp + float(self.beta) * r_par

    def _get_param_names(self):
        return [k for k in super()._get_param_names() if k != "_end_store"]

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_end_store", None)
        return state
