"""Private bases of the estimators that wrap a trained network.

:class:`BaseNetworkEstimator` gives every such estimator the same behaviour:
the input check and the per-sample shape check at predict time, the device,
a copy of the caller's network (never the network itself), ``__sklearn_clone__``
that keeps a fitted skorch network's weights, tags for image input, and a fit
that leaves the estimator as it was when it raises.
:class:`NetworkClassifierMixin` adds ``predict_proba``/``predict`` through the
corrected network. :class:`HookedLossMixin` is the skorch side: a loss term
computed from a layer's activations captured during the training forward pass.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Mapping

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted
from skorch import NeuralNetClassifier
from skorch.callbacks import PassthroughScoring
from skorch.dataset import unpack_data

from ._utils._data import (
    as_float32,
    check_input,
    check_input_shape,
    first_batch,
    is_dataset,
    n_samples,
    reading,
)
from ._utils._hooks import capture_output, check_network_input
from ._utils._modules import (
    copy_estimator,
    copy_module,
    get_module,
    is_skorch_net,
    module_device,
    n_outputs,
    predict_proba,
)
from ._utils._runtime import autocast, check_precision, resolve_device
from ._utils._training import DivergenceGuard, GuardLastMixin
from ._utils._validation import check_int, check_real, check_y

__all__ = ["BaseNetworkEstimator", "NetworkClassifierMixin", "atomic_fit", "LayerCapture",
           "HookedLossMixin", "InterruptibleMixin", "DictInputClassifier", "INPUT_KEY", "BIAS_KEY"]


def atomic_fit(fit):
    """Decorate ``fit`` so that, when it raises (also on ``KeyboardInterrupt``), the
    estimator keeps the attributes it had before the call: the previous fit stays
    intact, or the estimator stays unfitted. The exception propagates."""

    @functools.wraps(fit)
    def wrapper(self, *args, **kwargs):
        before = dict(self.__dict__)
        try:
            with reading(getattr(self, "num_workers", 0)):
                return fit(self, *args, **kwargs)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(before)
            raise

    return wrapper


class BaseNetworkEstimator(BaseEstimator):
    """Base of every estimator whose ``estimator`` parameter is a trained network.

    Subclasses pass ``estimator``, ``batch_size``, ``device``, ``verbose`` and
    ``precision`` (and ``num_workers`` where they read data) to this ``__init__`` and store
    their other parameters (``random_state``
    where training or sampling is random) themselves; decorate ``fit`` with
    :func:`atomic_fit`; call :meth:`_validate_X` on every input.
    """

    def __init__(self, estimator, batch_size, device, verbose, precision="float32",
                 num_workers=0):
        # the parameters every wrapper shares; subclasses store the rest themselves
        self.estimator = estimator
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.verbose = verbose
        self.precision = precision

    def __sklearn_clone__(self):
        # ``clone`` would turn a fitted skorch net into an unfitted one (new random weights);
        # the network to audit or correct is data here, so a clone gets a copy with its weights.
        new = super().__sklearn_clone__()
        est = getattr(self, "estimator", None)
        if is_skorch_net(est) and getattr(est, "initialized_", False):
            new.estimator = copy.deepcopy(est)
        return new

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.three_d_array = True
        # seeded or seed-free estimators are deterministic
        tags.non_deterministic = getattr(self, "random_state", 0) is None
        return tags

    # ---------------------------------------------------------------- input
    def _validate_X(self, X, reset, name="X", allow_iterable=False):
        """The one input check (:func:`~skdebias._utils._data.check_input`): ``X`` checked, not
        converted; batches are converted as they are read.

        With ``reset=True`` (in ``fit``) one sample goes through the network, so
        that an input the network cannot take is reported in terms of ``X``, and
        the per-sample shape is recorded as ``input_shape_`` (and
        ``n_features_in_`` for vectors); otherwise it must match the shape seen
        in ``fit``. ``allow_iterable`` accepts an ``IterableDataset`` (steps that
        read the data once, in order).
        """
        X, shape = check_input(X, name=name, allow_iterable=allow_iterable)
        if reset:
            check_network_input(get_module(self.estimator), first_batch(X), name)
            self.input_shape_ = shape
            if shape is not None and len(shape) == 1:
                self.n_features_in_ = int(shape[0])
            elif hasattr(self, "n_features_in_"):
                del self.n_features_in_
        else:
            check_input_shape(self, shape, getattr(self, "input_shape_", None))
        return X

    # ---------------------------------------------------------------- network
    def _resolve_device(self):
        """``device`` as a :class:`torch.device` (checked, with ``precision`` for it)."""
        device = resolve_device(self.device)
        check_precision(self.precision, device)
        return device

    def _autocast(self, device):
        """The network's forward (and backward) passes at ``precision`` on ``device``."""
        return autocast(self.precision, device)

    def _copy_network(self, device=None):
        """``(copy, module)`` of the caller's network, moved to ``device``; never the original."""
        return copy_estimator(self.estimator, device)


class NetworkClassifierMixin:
    """``predict_proba`` and ``predict`` of a fitted wrapper through its corrected network.

    The fitted estimator holds ``module_`` (the corrected :class:`torch.nn.Module`) and
    ``classes_``; :meth:`_predict_proba` may be overridden (e.g. to use a skorch net).
    """

    def _predict_proba(self, X):
        with autocast(getattr(self, "precision", "float32"), module_device(self.module_)):
            return predict_proba(self.module_, X, batch_size=max(int(self.batch_size), 256))

    def predict_proba(self, X):
        """Class probabilities of the corrected network.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor or Dataset

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes), float32
        """
        check_is_fitted(self, "classes_")
        X = self._validate_X(X, reset=False)
        with reading(getattr(self, "num_workers", 0)):
            return np.asarray(self._predict_proba(X), dtype=np.float32)

    def predict(self, X):
        """Class labels predicted by the corrected network.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor or Dataset

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        proba = self.predict_proba(X)  # checks that the estimator is fitted
        return self.classes_[np.argmax(proba, axis=1)]


# ====================================================================== skorch side
#: Key of the images in a dict input ``{"X": images, "bias": labels, ...}``.
INPUT_KEY = "X"
#: Key of the bias labels (one group label per sample) in a dict input.
BIAS_KEY = "bias"


class LayerCapture:
    """The activations of one layer, recorded in forward passes by a hook that is always removed.

    While the capture is open, every forward pass through ``layer`` appends the
    layer's output (or, with ``capture_input=True``, its first input) to
    :attr:`store`, still part of the autograd graph; the forward pass goes on
    with a copy of a captured output (see
    :func:`skdebias._utils._hooks.capture_output`). Used as a context manager
    (one training step of :class:`HookedLossMixin`), the hook is removed on exit,
    also on an exception or ``KeyboardInterrupt``. A skorch callback, which has
    no ``finally`` around a step, opens it with ``root=net.module_``: the hook
    then also goes when the network's forward pass ends, even when it raises.

    Parameters
    ----------
    layer : torch.nn.Module
        The hooked layer (e.g. ``dict(module.named_modules())[name]``).
    capture_input : bool, default=False
        Record the layer's first input instead of its output (e.g. the
        features entering a linear head).
    requires_grad : bool, default=False
        Record an output that is not part of an autograd graph (all earlier
        layers frozen) as a leaf that requires grad, so a loss term can still
        be differentiated with respect to it.

    Attributes
    ----------
    store : list of torch.Tensor
        The tensors recorded since the capture was last opened.

    Examples
    --------
    >>> import torch
    >>> from skdebias.base import LayerCapture
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> with LayerCapture(model[2], capture_input=True) as capture:
    ...     logits = model(torch.randn(5, 3))
    >>> capture.last.shape, len(model[2]._forward_hooks)
    (torch.Size([5, 4]), 0)
    """

    def __init__(self, layer, capture_input=False, requires_grad=False):
        self.layer = layer
        self.capture_input = capture_input
        self.requires_grad = requires_grad
        self.store = []
        self._context = None
        self._root_handle = None

    @property
    def last(self):
        """The most recently recorded tensor, or ``None``."""
        return self.store[-1] if self.store else None

    def open(self, root=None, on_forward_end=None):
        """Start recording (closing a capture that is still open).

        Parameters
        ----------
        root : torch.nn.Module, optional
            The network ``layer`` belongs to. When its forward pass ends, the
            capture closes: normally after calling ``on_forward_end(self)``,
            without that call when the forward pass raised.
        on_forward_end : callable, optional
            Called with this capture once ``root``'s forward pass has returned.

        Returns
        -------
        self : LayerCapture
        """
        self.close()
        context = capture_output(self.layer, detach=False, capture_input=self.capture_input,
                                 requires_grad=self.requires_grad)
        self.store = context.__enter__()
        self._context = context
        if root is not None:
            def forward_end(_module, _inputs, output):
                try:
                    # ``output`` is None when root's forward raised (always_call hook)
                    if output is not None and on_forward_end is not None and self._context:
                        on_forward_end(self)
                finally:
                    self._close_layer()
                    self._remove_root_hook(root)

            self._root_handle = root.register_forward_hook(forward_end, always_call=True)
        return self

    def _close_layer(self):
        context, self._context = self._context, None
        if context is not None:
            context.__exit__(None, None, None)

    def _remove_root_hook(self, root):
        handle = self._root_handle
        # torch runs the always_call hooks of a failed forward while iterating over the hook
        # dict itself: deleting an entry that is not the last one there would raise "mutated
        # during iteration" and hide the real error, so such a hook waits for close()
        if handle is not None and next(reversed(root._forward_hooks), None) == handle.id:
            handle.remove()
            self._root_handle = None

    def close(self):
        """Stop recording and remove every hook (idempotent). The store is kept."""
        self._close_layer()
        handle, self._root_handle = self._root_handle, None
        if handle is not None:
            handle.remove()

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()


class HookedLossMixin:
    """skorch mixin: a loss term computed from a hooked layer's activations.

    Put it before the skorch net class (``class Net(HookedLossMixin,
    NeuralNetClassifier)``) and implement :meth:`hooked_layer` and
    :meth:`hooked_terms`. In every training step (and validation step) the
    layer's activations are captured by a hook during the network's own
    forward pass (no second forward), the weighted terms are added to the loss
    (``loss + w_1 * t_1 + w_2 * t_2 ...``; a term of weight 0 is logged but not
    added) and each term is recorded per batch in the history. The hook is
    removed at the end of every step, also when it raises or is interrupted;
    pickles and copies carry no hook or captured tensor.

    Class attributes set by subclasses:

    - ``hooked_term_names``: names of the terms that :meth:`hooked_terms`
      returns; each is logged per batch as ``<train prefix><name>`` and
      ``<valid prefix><name>``.
    - ``hooked_history``: ``(train prefix, valid prefix)``, default
      ``("train_", "valid_")``; ``None`` does not log that phase.
    - ``hooked_epoch_scores``: also log the per-epoch means (skorch
      :class:`~skorch.callbacks.PassthroughScoring`), default True.
    - ``hooked_grad_in_validation``: compute the term of validation batches
      with gradients enabled (a term that differentiates, e.g. RR-ClArC's
      input-gradient penalty); the validation loss is then detached. Default False.
    - ``hooked_requires_grad``: see :class:`LayerCapture`. Default False.

    Examples
    --------
    A penalty on the mean squared activation of a hidden layer:

    >>> import numpy as np, torch
    >>> from skorch import NeuralNetClassifier
    >>> from skdebias.base import HookedLossMixin
    >>> class ActivationPenaltyNet(HookedLossMixin, NeuralNetClassifier):
    ...     hooked_term_names = ("act",)
    ...     def hooked_layer(self):
    ...         return self.module_[1], False  # output of the ReLU
    ...     def hooked_terms(self, activations, y_pred, y_true, X, training):
    ...         return {"act": (0.1, activations.pow(2).mean())}
    >>> net = ActivationPenaltyNet(
    ...     torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
    ...     criterion=torch.nn.CrossEntropyLoss, max_epochs=2, train_split=None, verbose=0)
    >>> X, y = np.random.rand(20, 4).astype("float32"), np.arange(20) % 2
    >>> len(net.fit(X, y).history[:, "train_act"])
    2
    """

    hooked_term_names = ()
    hooked_history = ("train_", "valid_")
    hooked_epoch_scores = True
    hooked_grad_in_validation = False
    hooked_requires_grad = False

    #: instance attributes that hold the state of a running step, never parameters
    _hooked_state = ("_hooked_capture", "_hooked_pending")

    # ---------------------------------------------------------------- to implement
    def hooked_layer(self):
        """``(layer, capture_input)``: the sub-module of ``module_`` to hook, and whether
        its first input (True) or its output (False) is captured."""
        raise NotImplementedError

    def hooked_terms(self, activations, y_pred, y_true, X, training):
        """The loss terms of one batch as ``{name: (weight, term)}``.

        ``activations`` is the captured tensor (part of the graph), ``y_pred``
        the network's output, ``y_true`` the targets, ``X`` the batch input (a
        dict input keeps its side information), ``training`` False for
        validation batches. Return ``None`` (or an empty dict) for no term.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- plumbing
    def get_default_callbacks(self):
        callbacks = list(super().get_default_callbacks())
        if not self.hooked_epoch_scores:
            return callbacks
        train_prefix, valid_prefix = self.hooked_history
        extra = []
        for name in self.hooked_term_names:
            if train_prefix is not None:
                key = train_prefix + name
                extra.append((key, PassthroughScoring(name=key, on_train=True)))
            if valid_prefix is not None:
                key = valid_prefix + name
                extra.append((key, PassthroughScoring(name=key)))
        # before the printer, so the per-epoch means appear in its table
        names = [name for name, _ in callbacks]
        pos = names.index("print_log") if "print_log" in names else len(callbacks)
        return callbacks[:pos] + extra + callbacks[pos:]

    @contextlib.contextmanager
    def _capture(self):
        """Hook the layer for the enclosed step; the hook is removed on every exit."""
        layer, capture_input = self.hooked_layer()
        self.__dict__.pop("_hooked_pending", None)  # a value from a call outside any batch
        with LayerCapture(layer, capture_input, self.hooked_requires_grad) as capture:
            self._hooked_capture = capture
            try:
                yield capture
            finally:
                self.__dict__.pop("_hooked_capture", None)

    def train_step_single(self, batch, **fit_params):
        with self._capture():
            return super().train_step_single(batch, **fit_params)

    def validation_step(self, batch, **fit_params):
        if not self.hooked_grad_in_validation:
            with self._capture():
                return super().validation_step(batch, **fit_params)
        # skorch's validation_step runs under no_grad; a term that differentiates needs grad
        self._set_training(False)
        Xi, yi = unpack_data(batch)
        with self._capture(), torch.enable_grad():
            y_pred = self.infer(Xi, **fit_params)
            loss = self.get_loss(y_pred, yi, X=Xi, training=False)
        return {"loss": loss.detach(), "y_pred": y_pred.detach()}

    def get_loss(self, y_pred, y_true, X=None, training=False):
        loss = super().get_loss(y_pred, y_true, X=X, training=training)
        capture = self.__dict__.get("_hooked_capture")
        if capture is None or not capture.store:
            return loss
        terms = self.hooked_terms(capture.last, y_pred, y_true, X, training)
        if not terms:
            return loss
        prefix = self.hooked_history[0 if training else 1]
        if prefix is not None:
            # logged in on_batch_end, after skorch has synchronised for the loss anyway: no
            # extra device synchronisation between the forward and the backward pass
            self._hooked_pending = {prefix + name: term.detach()
                                    for name, (_, term) in terms.items()}
        for weight, term in terms.values():
            if weight == 0:
                continue
            loss = loss + weight * (term if training else term.detach())
        return loss

    def on_batch_end(self, net, **kwargs):
        super().on_batch_end(net, **kwargs)
        pending = self.__dict__.pop("_hooked_pending", None)
        for key, value in (pending or {}).items():
            self.history.record_batch(key, float(value))

    def _get_param_names(self):
        return [k for k in super()._get_param_names() if k not in self._hooked_state]

    def __getstate__(self):
        state = super().__getstate__()
        for key in self._hooked_state:
            state.pop(key, None)
        return state


class InterruptibleMixin:
    """skorch net mixin: Ctrl-C (``KeyboardInterrupt``) ends ``fit`` with the interrupt.

    skorch's ``partial_fit`` swallows the interrupt and returns a half-trained
    net as if it were fitted; here skorch still runs ``on_train_end`` (hooks and
    callbacks clean up), then the interrupt is raised again, so a script or a
    ``GridSearchCV`` stops.
    """

    def fit_loop(self, X, y=None, **fit_params):
        try:
            return super().fit_loop(X, y, **fit_params)
        except KeyboardInterrupt:
            self._interrupted = True
            raise

    def partial_fit(self, X, y=None, classes=None, **fit_params):
        self._interrupted = False
        super().partial_fit(X, y, classes=classes, **fit_params)
        if self.__dict__.pop("_interrupted", False):
            raise KeyboardInterrupt
        return self


class DictInputClassifier(GuardLastMixin, InterruptibleMixin, NeuralNetClassifier):
    """A skorch ``NeuralNetClassifier`` whose images may come with per-sample side information.

    The input is an array, tensor or Dataset of images, or a dict
    ``{"X": images, <key>: values, ...}`` (also a :class:`skorch.helper.SliceDict`)
    that skorch slices into batches together with ``y``; :meth:`infer` strips
    the keys in ``extra_keys`` before calling the module, and passes the bare
    images when only ``"X"`` is left, so any module works. Images are
    converted to float32 and checked for NaN and infinity (the error names the
    first bad sample). A module *instance* given as ``module`` is deep-copied
    at initialisation: the caller's module is never trained, and every ``fit``
    starts from its weights.

    Parameters
    ----------
    module : torch.nn.Module class or instance
    *args, **kwargs
        Passed to :class:`skorch.NeuralNetClassifier`.
    """

    #: Keys of a dict input that carry side information, not module input.
    extra_keys = (BIAS_KEY,)
    #: What to change when training ends at chance level (``{net}``: the net).
    chance_level_advice = ("train longer (max_epochs, now {net.max_epochs}) or change lr "
                           "(now {net.lr})")

    def get_default_callbacks(self):
        # a run whose loss goes NaN (e.g. at a too large lr) stops with an error naming lr, and
        # one that ends at chance level warns
        return list(super().get_default_callbacks()) + [
            ("divergence_guard", DivergenceGuard(advice="lower lr (now {net.lr})",
                                                 warn_chance_end=self.chance_level_advice))]

    def initialize_module(self):
        super().initialize_module()
        if self.module_ is self.module:
            self.module_ = copy_module(self.module)
        return self

    def infer(self, x, **fit_params):
        if isinstance(x, Mapping):
            x = {k: v for k, v in x.items() if k not in self.extra_keys}
            if set(x) == {INPUT_KEY}:
                x = x[INPUT_KEY]
        return super().infer(x, **fit_params)

    def initialize(self):
        # skorch's own training parameters, reported by name instead of by torch or the loader
        check_real("lr", self.lr, low=0)
        check_int("max_epochs", self.max_epochs, low=0)
        bs = self.batch_size
        if not (isinstance(bs, int) or isinstance(bs, np.integer)) or isinstance(bs, bool) \
                or not (bs >= 1 or bs == -1):
            raise ValueError(
                f"batch_size must be a positive integer or -1 (the whole data set), got {bs!r}.")
        return super().initialize()

    def partial_fit(self, X, y=None, classes=None, **fit_params):
        if not self.initialized_:
            self.initialize()
        self._check_fit_data(X, y)
        return super().partial_fit(X, y, classes=classes, **fit_params)

    def predict_proba(self, X):
        X = self._check_images(X)
        if self.initialized_:
            self._check_network_input(X)
        return super().predict_proba(X)

    def _check_network_input(self, X):
        """One sample of the images through ``module_``: a shape the network cannot take raises a
        ``ValueError`` naming X. Returns that sample, or ``None`` where the module takes further
        keyword inputs (then nothing is checked)."""
        images = X.get(INPUT_KEY) if isinstance(X, Mapping) else X
        if images is None or (isinstance(X, Mapping)
                              and set(X) - {INPUT_KEY, *self.extra_keys}):
            return None
        if is_dataset(images) and len(images):
            # skorch's own validation split: a Dataset whose items hold the dict input
            item = images[0]
            if isinstance(item[0] if isinstance(item, (tuple, list)) else item, Mapping):
                return None
        xb = first_batch(images)
        check_network_input(self.module_, xb, "X")
        return xb

    def _check_fit_data(self, X, y):
        """Before any training: the images fit the network and, with a cross-entropy or NLL
        criterion, ``y`` holds one output index per sample (errors name X and y)."""
        xb = self._check_network_input(X)
        if xb is None or y is None or not isinstance(
                self.criterion_, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)):
            return
        images = X.get(INPUT_KEY) if isinstance(X, Mapping) else X
        y = check_y(y, n_samples(images))
        try:
            k = n_outputs(self.module_, xb)
        except ValueError:  # not (n, n_classes) outputs: the criterion decides
            return
        if y.dtype.kind not in "iu":
            raise ValueError(
                f"y must hold integer class indices of the network's outputs (0..{k - 1}), got "
                f"dtype {y.dtype}.")
        bad = np.unique(y[(y < 0) | (y >= k)])
        if len(bad):
            raise ValueError(
                f"y contains labels {bad[:10].tolist()} that the network has no output for; y "
                f"must hold class indices of its {k} outputs (0..{k - 1}).")

    def _check_images(self, X):
        """``X`` (or a dict input's ``"X"``) checked by the one input check and converted to
        float32 (uint8 images scaled to [0, 1]); a Dataset as it is (not empty)."""
        if is_dataset(X):
            return check_input(X, name="X")[0]
        if isinstance(X, Mapping):
            if INPUT_KEY not in X:
                return X
            X = dict(X)
            X[INPUT_KEY] = as_float32(X[INPUT_KEY])
            return X
        return as_float32(X)

    def _pack(self, X, name, values, check):
        """``X`` as a dict input carrying ``values`` (checked by ``check(values, n, name)``) under
        ``name``; ``None`` when neither ``values`` nor a key ``name`` of a dict ``X`` is given."""
        X = self._check_images(X)
        if isinstance(X, Mapping):
            if name in X:
                if values is not None:
                    raise ValueError(
                        f"{name} was given both as a key of the dict X and as the {name}= "
                        "argument of fit; pass it once.")
                X = dict(X)
                X[name] = check(X[name], n_samples(next(iter(X.values()))), name)
                return X
            if values is None:
                return None
            if INPUT_KEY not in X:
                raise ValueError(f"A dict X must hold the images under the key {INPUT_KEY!r}.")
            X = dict(X)
            X[name] = check(values, n_samples(X[INPUT_KEY]), name)
            return X
        if values is None:
            return None
        if is_dataset(X):
            raise TypeError(
                f"With {name}= labels, X must be an array or tensor (n, C, H, W), not a "
                "Dataset; or pass a Dataset whose items already carry them.")
        return {INPUT_KEY: X, name: check(values, n_samples(X), name)}
