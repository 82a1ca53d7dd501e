"""Activations of a named layer as an sklearn transformer."""

from __future__ import annotations


import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted

from ._tags import NetworkInputMixin
from ._validation import check_int
from ._torch import (
    capture_output,
    copy_module,
    find_layer,
    get_module,
    iter_batches,
    n_samples,
    preserve_mode,
    progress_bar,
    resolve_device,
    stop_after,
)

__all__ = ["ActivationExtractor", "pool_activations", "POOLINGS"]

POOLINGS = ("max", "mean", "flatten", None)


def pool_activations(a: torch.Tensor, pooling) -> torch.Tensor:
    """Pool a batch of activations ``(B, C, *spatial)`` to ``(B, C)`` (or flatten).

    ``pooling`` is ``"max"`` or ``"mean"`` over all spatial positions,
    ``"flatten"`` for ``(B, C * prod(spatial))`` or ``None`` to keep the shape.
    Activations without spatial axes ``(B, C)`` are returned as they are.
    """
    if pooling is None:
        return a
    if pooling == "flatten":
        return a.reshape(a.shape[0], -1)
    if a.ndim <= 2:
        return a
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    if pooling == "max":
        return flat.amax(dim=2)
    if pooling == "mean":
        return flat.mean(dim=2)
    raise ValueError(f"pooling={pooling!r} is not valid; choose one of {POOLINGS}.")


def _check_pooling(pooling):
    if pooling not in POOLINGS:
        raise ValueError(f"pooling={pooling!r} is not valid; choose one of {POOLINGS}.")


def _check_input(X, name="X"):
    """Validate ``X`` (array-like, tensor or Dataset).

    Returns ``(X, per_sample_shape)``; array-likes come back as float ndarrays
    (no copy for float32/float64 input), Datasets with shape ``None``.
    """
    if isinstance(X, torch.utils.data.Dataset) and not isinstance(X, torch.Tensor):
        if n_samples(X) == 0:
            raise ValueError(f"{name} is an empty Dataset.")
        return X, None
    if isinstance(X, torch.Tensor):
        if X.ndim < 2 or X.shape[0] == 0:
            raise ValueError(
                f"Expected {name} of shape (n_samples, ...) with at least 2 dimensions and 1 "
                f"sample, got shape {tuple(X.shape)}."
            )
        if X.is_complex() or not bool(torch.isfinite(X).all()):
            raise ValueError(f"{name} contains NaN, infinity or complex values.")
        return X, tuple(X.shape[1:])
    if sp.issparse(X):
        raise TypeError(
            "Sparse input is not supported: pass a dense array of images (n, C, H, W)."
        )
    X = check_array(X, allow_nd=True, dtype=(np.float32, np.float64), input_name=name)
    return X, tuple(X.shape[1:])


class ActivationExtractor(NetworkInputMixin, TransformerMixin, BaseEstimator):
    """Extract (pooled) activations of a named layer of a network.

    Parameters
    ----------
    estimator : torch.nn.Module or skorch.NeuralNet
        The network. A skorch net may be fitted or only initialised; its
        ``module_`` is used. The network is never modified: its train/eval
        flags are restored and its parameters never move device (a copy is
        made when ``device`` differs from where the network lives).
    layer : str
        Name of a sub-module, as in ``dict(module.named_modules())``.
    pooling : {"max", "mean", "flatten", None}, default="max"
        Spatial pooling of ``(B, C, H, W)`` activations. ``None`` keeps the
        full activation tensor.
    batch_size : int, default=128
        Samples per forward pass; memory is bounded by it.
    device : str or torch.device, default="auto"
        ``"auto"`` uses CUDA when available, else the CPU.
    progress : bool, default=False
        Show a tqdm progress bar over batches.

    Attributes
    ----------
    module_ : torch.nn.Module
        The network used for extraction (the caller's, or a copy on ``device``).
    device_ : torch.device
    n_features_out_ : int
        Number of output features (product of the output shape for ``pooling=None``).
    output_shape_ : tuple
        Per-sample shape of the output of :meth:`transform`.
    input_shape_ : tuple or None
        Per-sample input shape seen in ``fit`` (``None`` for Datasets).

    Examples
    --------
    >>> import torch, numpy as np
    >>> from skdebias import ActivationExtractor
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> X = np.random.rand(5, 3, 8, 8).astype("float32")
    >>> ActivationExtractor(net, layer="1", device="cpu").fit_transform(X).shape
    (5, 4)
    """

    def __init__(self, estimator, layer, pooling="max", batch_size=128, device="auto",
                 progress=False):
        self.estimator = estimator
        self.layer = layer
        self.pooling = pooling
        self.batch_size = batch_size
        self.device = device
        self.progress = progress

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def _module_on_device(self, device):
        module = get_module(self.estimator)
        try:
            param = next(module.parameters())
            current = param.device
        except StopIteration:
            current = device
        if current != device:
            module = copy_module(module).to(device)
        return module

    def fit(self, X, y=None):
        """Check the layer and the input, and record the output shape.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor or Dataset
        y : ignored

        Returns
        -------
        self : ActivationExtractor
        """
        _check_pooling(self.pooling)
        check_int("batch_size", self.batch_size)
        self.device_ = resolve_device(self.device)
        X, self.input_shape_ = _check_input(X)
        self._set_n_features_in(self.input_shape_)
        self.module_ = self._module_on_device(self.device_)
        find_layer(self.module_, self.layer)
        first = next(iter_batches(X, batch_size=1, device=self.device_))
        out = self._forward(first)
        self.output_shape_ = tuple(out.shape[1:])
        self.n_features_out_ = int(np.prod(self.output_shape_))
        return self

    def _forward(self, xb):
        layer = find_layer(self.module_, self.layer)
        with preserve_mode(self.module_, train=False), torch.no_grad():
            with capture_output(layer, stop=True) as store, stop_after():
                self.module_(xb)
        if not store:
            raise RuntimeError(
                f"Layer {self.layer!r} was not called in the forward pass of the network."
            )
        return pool_activations(store[0], self.pooling)

    def transform(self, X, out=None):
        """Activations of ``self.layer`` for ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor or Dataset
        out : ndarray, optional
            Preallocated float32 array (e.g. a ``numpy.memmap``) of shape
            ``(n_samples, *output_shape_)`` to write into, so that large
            outputs need not fit in RAM.

        Returns
        -------
        A : ndarray of shape (n_samples, n_features_out_) (or the full
            activation shape for ``pooling=None``), dtype float32
        """
        check_is_fitted(self, "output_shape_")
        X, shape = _check_input(X)
        if self.input_shape_ is not None and shape is not None and shape != self.input_shape_:
            if len(shape) == 1 and len(self.input_shape_) == 1:
                raise ValueError(
                    f"X has {shape[0]} features, but ActivationExtractor is expecting "
                    f"{self.input_shape_[0]} features as input."
                )
            raise ValueError(
                f"X has per-sample shape {shape}, but ActivationExtractor was fitted on "
                f"{self.input_shape_}."
            )
        n = n_samples(X)
        expected = (n, *self.output_shape_)
        if out is None:
            out = np.empty(expected, dtype=np.float32)
        elif tuple(out.shape) != expected:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {expected}.")
        batches = iter_batches(X, batch_size=self.batch_size, device=self.device_)
        n_batches = -(-n // self.batch_size)
        start = 0
        for xb in progress_bar(batches, self.progress, total=n_batches, desc="activations"):
            a = self._forward(xb)
            out[start:start + a.shape[0]] = a.cpu().numpy()
            start += a.shape[0]
        return out

    def get_feature_names_out(self, input_features=None):
        """Names ``"<layer>_<i>"`` for the pooled output features."""
        check_is_fitted(self, "output_shape_")
        return np.asarray([f"{self.layer}_{i}" for i in range(self.n_features_out_)], dtype=object)
