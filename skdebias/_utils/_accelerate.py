"""Data-parallel training through Hugging Face Accelerate (skorch's ``AccelerateMixin``).

:func:`accelerate_net` is the one place where a training estimator's skorch net becomes an
Accelerate-enabled net: when the caller's own net carries an ``accelerator`` (a skorch
net with ``AccelerateMixin``) or the estimator's ``net_params`` pass one. The net then
trains on the processes of ``accelerate launch`` / ``torchrun`` (one per GPU, or CPU
processes with gloo), each on its share of every batch or of the batches.
"""

from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["accelerate_net", "accelerated_class", "user_accelerator"]

_CLASSES: dict = {}
_LOCK = threading.Lock()


def user_accelerator(estimator):
    """The ``accelerator`` of a skorch net with ``AccelerateMixin``, else ``None``."""
    try:
        from skorch.hf import AccelerateMixin
    except ImportError:  # pragma: no cover - skorch always has it
        return None
    if isinstance(estimator, AccelerateMixin):
        return getattr(estimator, "accelerator", None)
    return None


def _silent(*args, **kwargs):
    """A log sink that writes nothing (``verbose=0``)."""


def _rebuild(base_class):
    cls = accelerated_class(base_class)
    return cls.__new__(cls)


class _AcceleratedNet:
    """Placed before skorch's ``AccelerateMixin``: looks sub-modules up by name in the
    unwrapped module (``DistributedDataParallel`` prefixes every name with ``module.``),
    and pickles by its base class (the class itself is made on demand)."""

    _skdebias_base = None

    @contextlib.contextmanager
    def _unwrapped_module(self):
        wrapped = self.__dict__.get("module_")
        inner = self.accelerator.unwrap_model(wrapped) if wrapped is not None else None
        if inner is None or inner is wrapped:
            yield
            return
        self.__dict__["module_"] = inner
        try:
            yield
        finally:
            self.__dict__["module_"] = wrapped

    def _initialize_accelerator(self):
        # a criterion without trainable parameters is left as it is: wrapped for several
        # processes, DistributedDataParallel refuses a module with nothing to synchronise
        kept = {}
        for name in self._criteria:
            criterion = self.__dict__.get(name + "_")
            if isinstance(criterion, torch.nn.Module) and not any(
                    p.requires_grad for p in criterion.parameters()):
                kept[name + "_"] = criterion
                self.__dict__[name + "_"] = None
        try:
            return super()._initialize_accelerator()
        finally:
            self.__dict__.update(kept)

    def initialize_callbacks(self):
        super().initialize_callbacks()
        if not self.verbose:
            # AccelerateMixin prints the epoch log through the accelerator (main process
            # only), a sink that skorch's PrintLog prints to whatever verbose says
            from skorch.callbacks import PrintLog

            for _, callback in self.callbacks_:
                if isinstance(callback, PrintLog):
                    callback.sink = _silent
        return self

    def train_step_single(self, batch, **fit_params):
        # AccelerateMixin's step replaces the base class's: a hooked loss term
        # (HookedLossMixin: RR-ClArC, EnD) still needs its layer hooked for the step
        capture = getattr(self, "_capture", None)
        with capture() if capture is not None else contextlib.nullcontext():
            return super().train_step_single(batch, **fit_params)

    def hooked_layer(self):
        with self._unwrapped_module():
            return super().hooked_layer()

    def _set_training(self, training=True):
        super()._set_training(training)  # the wrapper's own flag
        with self._unwrapped_module():
            # again on the unwrapped module: the base class's per-step settings (e.g. layers
            # kept in eval mode) look their sub-modules up by name
            super()._set_training(training)

    def __reduce_ex__(self, protocol):
        return _rebuild, (self._skdebias_base,), self.__getstate__()


def accelerated_class(net_class):
    """``net_class`` with skorch's ``AccelerateMixin`` (made once per class; pickles)."""
    from skorch.hf import AccelerateMixin

    if issubclass(net_class, AccelerateMixin):
        return net_class
    with _LOCK:
        cls = _CLASSES.get(net_class)
        if cls is None:
            cls = type(f"Accelerated{net_class.__name__}",
                       (_AcceleratedNet, AccelerateMixin, net_class),
                       {"_skdebias_base": net_class, "__module__": __name__})
            _CLASSES[net_class] = cls
    return cls


def accelerate_net(net_class, user_estimator, kwargs):
    """``(net_class, kwargs)`` for a training estimator's skorch net, Accelerate-enabled where
    an accelerator is given: ``kwargs["accelerator"]`` (from the estimator's ``net_params``)
    or the caller's own net's. Then the net's ``device`` is left to the accelerator (each
    process uses its own device). Without one, both are returned as they are.
    """
    accelerator = kwargs.get("accelerator")
    if accelerator is None:
        accelerator = user_accelerator(user_estimator)
    if accelerator is None:
        kwargs.pop("accelerator", None)
        return net_class, kwargs
    kwargs = dict(kwargs, accelerator=accelerator, device=None)
    return accelerated_class(net_class), kwargs
