"""What the CAV-based correctors (RR-ClArC, A-/P-ClArC) share.

- fitting the CAV on pooled activations of the copied network;
- the freezing rules of ``train_layers``;
- a skorch classifier that keeps frozen modules in eval mode;
- the base class: validation, the network copy, the CAV, prediction through
  the corrected skorch network.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import torch
from sklearn.base import ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted
from sklearn.utils import check_random_state
from skorch import NeuralNet, NeuralNetClassifier
from skorch.callbacks import Callback, GradientNormClipping
from skorch.dataset import ValidSplit, unpack_data
from torch import nn

from .._utils._accelerate import accelerate_net
from .._utils._data import dataset_targets, iter_batches, n_samples, take
from .._utils._hooks import trace_layer
from .._utils._modules import (
    OUTPUTS,
    find_layer,
    is_skorch_net,
    network_classes,
    predict_proba,
    resolve_output,
    to_logits,
    to_probabilities,
)
from .._utils._runtime import autocast, grad_scaler, resolve_device
from .._utils._training import DivergenceGuard, GuardLastMixin
from .._utils._validation import (
    UNLABELLED,
    check_choice,
    check_concept_labels,
    check_int,
    check_real,
    check_seed,
    check_y,
    encode_y,
    unit_vector,
)
from ..base import BaseNetworkEstimator, InterruptibleMixin, NetworkClassifierMixin
from ..concepts import CAVEstimator
from ..extraction import ActivationExtractor

__all__ = []


def resolve_train_layers(module, layer, train_layers, before):
    """Freeze parameters according to ``train_layers``; return (trainable names, eval module names).

    ``"after"``: parameters of every module executed up to and including
    ``layer`` are frozen, and those modules stay in eval mode while training
    (BatchNorm statistics and dropout fixed). ``"all"``: nothing frozen. A list
    of parameter-name prefixes: only matching parameters train; modules all of
    whose parameters are frozen stay in eval mode.
    """
    named = dict(module.named_parameters())
    if isinstance(train_layers, str):
        check_choice("train_layers", train_layers, ("after", "all"))
        if train_layers == "all":
            trainable = set(named)
            eval_modules = []
        else:
            frozen_modules = set(before)
            frozen = set()
            for mname, mod in module.named_modules():
                if mname in frozen_modules:
                    for pname, _ in mod.named_parameters(recurse=False):
                        frozen.add(f"{mname}.{pname}" if mname else pname)
            # parameters of the layer's sub-modules are frozen too
            for pname in named:
                if pname.startswith(layer + "."):
                    frozen.add(pname)
            trainable = set(named) - frozen
            # the layer's ancestors (containers such as "features" or "layer3.1") also start
            # before it ends, but eval() on them would reach the trained modules after it
            eval_modules = sorted(m for m in set(before) - {""} if not layer.startswith(m + "."))
    else:
        if not isinstance(train_layers, (list, tuple)) or not train_layers or not all(
                isinstance(p, str) for p in train_layers):
            raise ValueError(
                "train_layers must be 'after', 'all' or a non-empty list of parameter-name "
                f"prefixes (e.g. ['classifier.']), got {train_layers!r}.")
        unmatched = [p for p in train_layers if not any(n.startswith(p) for n in named)]
        if unmatched:
            import difflib

            close = difflib.get_close_matches(unmatched[0], list(named), n=5, cutoff=0.3)
            raise ValueError(
                f"train_layers prefixes {unmatched} match no parameter of the network; "
                f"closest parameter names: {close or list(named)[:5]}.")
        trainable = {n for n in named if any(n.startswith(p) for p in train_layers)}
        eval_modules = []
        for mname, mod in module.named_modules():
            params = [f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters()]
            if params and not any(p in trainable for p in params):
                eval_modules.append(mname)
    for pname, param in named.items():
        param.requires_grad_(pname in trainable)
    return [n for n in named if n in trainable], [m for m in eval_modules if m]


def resolve_cav(cav, module, layer, X, concept_labels, out_shape, batch_size, device,
                pooling="max", precision="float32"):
    """Fit (or check) the CAV; return ``(unit vector float32, fitted estimator or None, A, t)``.

    ``A`` / ``t`` are the activations (max-pooled, or flattened with
    ``pooling="flatten"``) and the 0/1 labels of the labelled samples (``None``
    when no concept labels are given). ``out_shape`` is the per-sample shape of
    the layer's output.
    """
    A = t = None
    if concept_labels is not None:
        idx = np.flatnonzero(concept_labels != UNLABELLED)
        extractor = ActivationExtractor(module, layer, pooling=pooling, batch_size=batch_size,
                                        device=device, precision=precision)
        X_lab = take(X, idx)
        A = extractor.fit(X_lab).transform(X_lab)
        t = concept_labels[idx]
    if cav is None or hasattr(cav, "fit"):
        if A is None:
            raise ValueError(
                "concept_labels are required to fit the CAV (0/1 per sample, -1 for samples "
                "without a label); or pass cav= as a vector.")
        est = clone(cav) if cav is not None else CAVEstimator()
        est.fit(A, t)
        vec = getattr(est, "cav_", None)
        if vec is None:
            vec = getattr(est, "coef_", None)
        if vec is None:
            raise ValueError(
                f"cav={type(cav).__name__} has neither cav_ nor coef_ after fitting; pass a "
                "CAVEstimator or a vector.")
        fitted = est
    else:
        vec, fitted = cav, None
    vec = unit_vector(vec, name="cav")
    if pooling == "flatten":
        n_dims = int(np.prod(out_shape)) if len(out_shape) else 1
        what = f"{n_dims} values per sample (flattened activations of shape {tuple(out_shape)})"
    else:
        n_dims = out_shape[0] if len(out_shape) >= 1 else 1
        what = f"{n_dims} channels ({pooling}-pooled activations)"
    if vec.shape[0] != n_dims:
        raise ValueError(
            f"cav has {vec.shape[0]} dimensions but layer {layer!r} has {what}; fit it on "
            "this layer's activations.")
    return vec.astype(np.float32), fitted, A, t


# ------------------------------------------------------------------ skorch
class _CorrectionNet(GuardLastMixin, InterruptibleMixin, NeuralNetClassifier):
    """NeuralNetClassifier that keeps ``eval_modules`` of the module in eval mode while training.

    Forward passes run at ``precision`` (autocast; the outputs are returned in float32, so
    the losses are float32); float16 training scales the loss (``torch.amp.GradScaler``) and
    unscales the gradients before the callbacks see them (gradient clipping).
    """

    def __init__(self, module, *args, eval_modules=(), output_space="logits",
                 precision="float32", **kwargs):
        super().__init__(module, *args, **kwargs)
        self.eval_modules = eval_modules
        self.output_space = output_space
        self.precision = precision

    def infer(self, x, **fit_params):
        with autocast(self.precision, self.device):
            y = super().infer(x, **fit_params)
        return y.float() if torch.is_tensor(y) and y.is_floating_point() else y

    def _grad_scaler(self):
        if self.precision != "float16":
            return None
        if getattr(self, "_scaler", None) is None:
            self._scaler = grad_scaler(self.precision, self.device)
        return self._scaler

    def train_step_single(self, batch, **fit_params):
        scaler = self._grad_scaler()
        if scaler is None:
            return super().train_step_single(batch, **fit_params)
        self._set_training(True)
        Xi, yi = unpack_data(batch)
        y_pred = self.infer(Xi, **fit_params)
        loss = self.get_loss(y_pred, yi, X=Xi, training=True)
        scaler.scale(loss).backward()
        for name in self._optimizers:
            scaler.unscale_(getattr(self, name + "_"))
        return {"loss": loss, "y_pred": y_pred}

    def _step_optimizer(self, step_fn):
        scaler = self._grad_scaler()
        if scaler is None:
            return super()._step_optimizer(step_fn)
        step_fn()
        for name in self._optimizers:
            scaler.step(getattr(self, name + "_"))
        scaler.update()
        return None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_scaler", None)
        return state

    def get_loss(self, y_pred, y_true, X=None, training=False):
        # the classification losses are computed on logits, whatever the network's last layer
        # (a module ending in Softmax, skorch's default, must not be soft-maxed twice)
        logits = to_logits(y_pred, self.output_space)
        if isinstance(self.criterion_, nn.NLLLoss):
            return NeuralNet.get_loss(self, torch.log_softmax(logits, dim=1), y_true, X=X,
                                      training=training)
        if isinstance(self.criterion_, nn.CrossEntropyLoss):
            return NeuralNet.get_loss(self, logits, y_true, X=X, training=training)
        return NeuralNet.get_loss(self, y_pred, y_true, X=X, training=training)

    def _set_training(self, training=True):
        super()._set_training(training)
        if training and self.eval_modules:
            # looked up by name at every step (cheap: no walk over all modules), so a module
            # replaced after fitting (A-ClArC) is still found
            for name in self.eval_modules:
                try:
                    self.module_.get_submodule(name).eval()
                except AttributeError:
                    pass


def _valid_split(corrector):
    """skorch's split for the corrector's ``validation_fraction`` (``None``: train on all)."""
    if not corrector.validation_fraction:
        return None
    seed = check_random_state(corrector.random_state).randint(np.iinfo(np.int32).max)
    return ValidSplit(float(corrector.validation_fraction), random_state=int(seed))


def _user_settings(estimator, prefix):
    """The ``prefix__*`` settings of a skorch net (e.g. ``optimizer__weight_decay``)."""
    return {k: v for k, v in estimator.get_params(deep=False).items()
            if k.startswith(prefix + "__")}


def build_net(net_class, module, corrector, max_epochs, extra=None):
    """A skorch net around ``module`` with the corrector's training settings.

    The caller's skorch net keeps its optimizer (with its ``optimizer__*``
    settings), criterion (with ``criterion__*``) and callbacks; the
    corrector's ``optimizer`` and ``callbacks`` (added after the caller's),
    ``lr``, ``max_epochs``, ``batch_size``, ``device`` and ``net_params`` win.
    A plain module trains with SGD (momentum 0.9) and cross-entropy.
    """
    user = corrector.estimator if is_skorch_net(corrector.estimator) else None
    kwargs = {}
    optimizer, criterion, callbacks = corrector.optimizer, nn.CrossEntropyLoss, []
    if user is not None:
        criterion = user.criterion
        kwargs.update(_user_settings(user, "criterion"))
        callbacks = copy.deepcopy(list(user.callbacks or []))
        if optimizer is None:
            optimizer = user.optimizer
            kwargs.update(_user_settings(user, "optimizer"))
    if optimizer is None or (optimizer is torch.optim.SGD and corrector.optimizer is not None):
        # the RR-ClArC reference recipe: SGD with momentum 0.9
        optimizer = torch.optim.SGD
        kwargs.setdefault("optimizer__momentum", 0.9)
    kwargs.update(corrector.net_params or {})
    kwargs.setdefault("iterator_train__shuffle", True)
    if corrector.callbacks is not None:
        callbacks += copy.deepcopy(list(corrector.callbacks))
    if corrector.max_grad_norm is not None:
        callbacks.append(("gradient_norm_clipping",
                          GradientNormClipping(gradient_clip_value=corrector.max_grad_norm)))
    advice = (f"lower lr (now {corrector.lr})"
              + (f" or penalty (now {corrector.penalty})" if hasattr(corrector, "penalty") else "")
              + (", or set max_grad_norm" if corrector.max_grad_norm is None else
                 f", or max_grad_norm (now {corrector.max_grad_norm})"))
    callbacks.append(("divergence_guard", DivergenceGuard(
        advice=advice, warn_untrained=f"The network given to {type(corrector).__name__}")))
    if corrector.random_state is not None:
        # shuffling from a generator of this fit only: parallel fits (threads) stay reproducible
        seed = check_random_state(corrector.random_state).randint(np.iinfo(np.int32).max)
        kwargs.setdefault("iterator_train__generator", torch.Generator().manual_seed(int(seed)))
    kwargs.update(extra or {})
    kwargs["device"] = str(resolve_device(corrector.device))
    if getattr(corrector, "num_workers", 0):
        # Dataset input (and arrays that skorch wraps) read by DataLoader worker processes
        for iterator in ("iterator_train", "iterator_valid"):
            kwargs.setdefault(f"{iterator}__num_workers", corrector.num_workers)
            kwargs.setdefault(f"{iterator}__pin_memory", kwargs["device"].startswith("cuda"))
    # data-parallel through Accelerate when the caller's net or net_params has an accelerator
    net_class, kwargs = accelerate_net(net_class, user, kwargs)
    return net_class(
        module,
        criterion=criterion,
        optimizer=optimizer,
        lr=corrector.lr,
        max_epochs=max_epochs,
        batch_size=corrector.batch_size,
        train_split=_valid_split(corrector),
        callbacks=callbacks,
        output_space=corrector.output_,
        # skorch's own predict_proba of estimator_ then gives probabilities too
        predict_nonlinearity=functools.partial(to_probabilities, output=corrector.output_),
        precision=corrector.precision,
        verbose=corrector.verbose,
        **kwargs,
    )


def _is_callback(cb):
    return isinstance(cb, Callback) or (isinstance(cb, type) and issubclass(cb, Callback))


# ------------------------------------------------------------------ sklearn base
class _CAVCorrector(ClassifierMixin, NetworkClassifierMixin, BaseNetworkEstimator):
    """Base class: validation, CAV fitting and prediction through the corrected network.

    Subclasses store their own parameters and pass the shared ones to this
    ``__init__``; they fit the network from the context that :meth:`_prepare`
    returns.
    """

    def __init__(self, estimator, layer, cav, train_layers, max_epochs, lr, batch_size,
                 optimizer, callbacks, validation_fraction, net_params, output, max_grad_norm,
                 device, random_state, verbose, precision="float32", num_workers=0):
        super().__init__(estimator, batch_size, device, verbose, precision=precision,
                         num_workers=num_workers)
        self.layer = layer
        self.cav = cav
        self.train_layers = train_layers
        self.max_epochs = max_epochs
        self.lr = lr
        self.optimizer = optimizer
        self.callbacks = callbacks
        self.validation_fraction = validation_fraction
        self.net_params = net_params
        self.output = output
        self.max_grad_norm = max_grad_norm
        self.random_state = random_state

    def _check_common(self):
        if not isinstance(self.layer, str):
            raise ValueError(f"layer must be a string naming a sub-module, got {self.layer!r}.")
        check_int("batch_size", self.batch_size)
        check_real("lr", self.lr, low=0, low_open=True)
        if self.optimizer is not None and not (
                isinstance(self.optimizer, type)
                and issubclass(self.optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"optimizer must be None (the network's own, else SGD) or a "
                f"torch.optim.Optimizer class (e.g. torch.optim.SGD), got {self.optimizer!r}.")
        check_choice("output", self.output, OUTPUTS)
        if self.max_grad_norm is not None:
            check_real("max_grad_norm", self.max_grad_norm, low=0, low_open=True)
        if self.net_params is not None and not isinstance(self.net_params, dict):
            raise ValueError(f"net_params must be a dict of skorch arguments or None, got "
                             f"{self.net_params!r}.")
        if "train_split" in (self.net_params or {}):
            raise ValueError(
                "net_params must not set train_split; use validation_fraction (the share of the "
                "training data held out for validation).")
        check_real("validation_fraction", self.validation_fraction, low=0, high=1,
                   high_open=True)
        check_seed("random_state", self.random_state)
        if self.callbacks is not None and not (
                isinstance(self.callbacks, (list, tuple)) and all(
                    _is_callback(cb) or (isinstance(cb, (tuple, list)) and len(cb) == 2
                                         and isinstance(cb[0], str) and _is_callback(cb[1]))
                    for cb in self.callbacks)):
            raise ValueError(
                "callbacks must be None or a list of skorch callbacks (instances, classes or "
                f"(name, callback) pairs), got {self.callbacks!r}.")
        self._resolve_device()

    def _prepare(self, X, y, concept_labels, require_concepts, pooling="max"):
        """Validate inputs, copy the network and fit the CAV. Returns a dict of context."""
        self._check_common()
        X = self._validate_X(X, reset=True)
        n = n_samples(X)
        if y is None:
            y = dataset_targets(X)
        y = check_y(y, n)
        concept_labels = check_concept_labels(concept_labels, n, required=require_concepts)
        device = self._resolve_device()
        _, module = self._copy_network(device)
        find_layer(module, self.layer)
        xb = next(iter_batches(X, batch_size=min(16, n)))  # a few rows to tell the outputs
        before, out_shape, n_outputs = trace_layer(module, self.layer, xb)
        self.output_ = resolve_output(self.output, module, xb)
        self.classes_ = network_classes(self.estimator, n_outputs)
        y_idx = encode_y(y, self.classes_)
        self.cav_, self.cav_estimator_, A, t = resolve_cav(
            self.cav, module, self.layer, X, concept_labels, out_shape, self.batch_size, device,
            pooling=pooling, precision=self.precision)
        return {"X": X, "y_idx": y_idx, "concept_labels": concept_labels, "module": module,
                "device": device, "before": before, "A": A, "t": t, "n_outputs": n_outputs}

    # ---------------------------------------------------------------- prediction
    def _predict_proba(self, X):
        with self._autocast(self.estimator_.device):
            return predict_proba(self.module_, X, batch_size=max(int(self.batch_size), 256),
                                 output=self.output_)

    @property
    def module_(self):
        """The corrected :class:`torch.nn.Module` (``estimator_.module_``)."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.module_

    @property
    def history_(self):
        """The skorch training history of the corrected network."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.history
