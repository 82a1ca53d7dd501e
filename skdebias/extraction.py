"""Activations of a named layer as an sklearn transformer."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ._utils._data import is_dask_array, is_iterable_dataset, iter_batches, n_samples
from ._utils._hooks import ChannelsLast, capture_output, stop_after
from ._utils._modules import (
    copy_module,
    find_layer,
    get_module,
    module_device,
    preserve_mode,
)
from ._utils._runtime import progress_bar, reuse_casts
from ._utils._validation import check_choice, check_int
from .base import BaseNetworkEstimator

__all__ = ["ActivationExtractor", "pool_activations", "POOLINGS"]

POOLINGS = ("max", "mean", "flatten", None)


def pool_activations(a: torch.Tensor, pooling) -> torch.Tensor:
    """Pool a batch of activations ``(B, C, *spatial)`` to ``(B, C)`` (or flatten).

    ``pooling`` is ``"max"`` or ``"mean"`` over all spatial positions,
    ``"flatten"`` for ``(B, C * prod(spatial))`` or ``None`` to keep the shape.
    Activations without spatial axes ``(B, C)`` are returned as they are.
    """
    check_choice("pooling", pooling, POOLINGS)
    if pooling is None:
        return a
    if pooling == "flatten":
        return a.reshape(a.shape[0], -1)
    if a.ndim <= 2:
        return a
    spatial = tuple(range(2, a.ndim))  # in the tensor's own memory layout, no copy
    return a.amax(dim=spatial) if pooling == "max" else a.mean(dim=spatial)


class ActivationExtractor(TransformerMixin, BaseNetworkEstimator):
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
        ``"auto"`` uses CUDA when available, else the CPU. On CUDA, image
        batches run in ``channels_last`` memory format (the layout of
        tensor-core convolutions; a network that cannot take it runs in the
        batch's own layout), and float32 convolutions follow torch's TF32
        setting (``torch.backends.cudnn.allow_tf32``, on by default): the
        activations then differ from the CPU's by up to about 0.5 % of their
        range.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        Arithmetic of the forward passes (torch autocast); ``"float16"`` needs CUDA. The
        activations are returned in float32 either way. ``transform`` casts each weight
        to the precision once for all its batches.
    verbose : int, default=0
        0: silent; 1 or more: progress bars over the long steps (tqdm).
    num_workers : int, default=0
        DataLoader worker processes that read a Dataset input (0: read in
        this process). Arrays, memmaps and tensors are sliced per batch in
        this process. Batches bound for CUDA are read into pinned memory.

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
                 verbose=0, num_workers=0, precision="float32"):
        super().__init__(estimator, batch_size, device, verbose, num_workers=num_workers,
                         precision=precision)
        self.layer = layer
        self.pooling = pooling

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    def _module_on_device(self, device):
        # extraction only reads the network: the caller's module is used where it lives
        # (train/eval flags restored after every batch), a copy only to move it
        module = get_module(self.estimator)
        if next(module.parameters(), None) is not None and module_device(module) != device:
            module = copy_module(module).to(device)
        return module

    def fit(self, X, y=None):
        """Check the layer and the input, and record the output shape.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor, Dataset or IterableDataset
            Only the first sample is read.
        y : ignored

        Returns
        -------
        self : ActivationExtractor
        """
        check_choice("pooling", self.pooling, POOLINGS)
        check_int("batch_size", self.batch_size)
        check_int("num_workers", self.num_workers, low=0)
        self.device_ = self._resolve_device()
        if is_dask_array(X):
            X = X[:1].compute()
        X = self._validate_X(X, reset=True, allow_iterable=True)
        self.module_ = self._module_on_device(self.device_)
        find_layer(self.module_, self.layer)
        first = next(iter_batches(X, batch_size=1, device=self.device_))
        out = self._forward(first)
        self.output_shape_ = tuple(out.shape[1:])
        self.n_features_out_ = int(np.prod(self.output_shape_))
        return self

    def _forward(self, xb, layout=None):
        layer = find_layer(self.module_, self.layer)

        def forward(batch):
            with capture_output(layer, stop=True) as store, stop_after(), \
                    self._autocast(self.device_):
                self.module_(batch)
            return store

        with preserve_mode(self.module_, train=False), torch.no_grad():
            store = forward(xb) if layout is None else layout(forward, xb)
        if not store:
            raise RuntimeError(
                f"Layer {self.layer!r} was not called in the forward pass of the network."
            )
        return pool_activations(store[0], self.pooling)

    def transform(self, X, out=None):
        """Activations of ``self.layer`` for ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor, Dataset, DataLoader, \
IterableDataset or dask array
            Read one batch at a time (converted per batch, so the memory used
            is bounded by ``batch_size``); an IterableDataset is read once, in
            its order. A dask array gives a lazy dask array (see
            :func:`skdebias.distributed.transform_dask`).
        out : ndarray, optional
            Preallocated float32 array (e.g. a ``numpy.memmap``) of shape
            ``(n_samples, *output_shape_)`` to write into, so that large
            outputs need not fit in RAM. Not with a dask array.

        Returns
        -------
        A : ndarray of shape (n_samples, n_features_out_) (or the full
            activation shape for ``pooling=None``), dtype float32; a dask array
            for a dask array ``X``.
        """
        check_is_fitted(self, "output_shape_")
        if is_dask_array(X):
            if out is not None:
                raise ValueError("out is not supported with a dask array X: store the lazy "
                                 "result with its own .to_zarr() or .store().")
            from .distributed import transform_dask

            return transform_dask(self, X)
        X = self._validate_X(X, reset=False, allow_iterable=True)
        # the weights are cast to the precision once for all batches (the network does not
        # change while the batches are read)
        with reuse_casts(self.precision):
            return self._collect(X, out)

    def _collect(self, X, out):
        """The activations of a validated ``X``, written into ``out`` (made if ``None``)."""
        if is_iterable_dataset(X):
            try:
                n = len(X)
            except TypeError:  # a stream of unknown length: batches gathered, then joined
                parts = [a.numpy() for a in self.iter_activations(X, _checked=True)]
                return np.concatenate(parts) if parts else \
                    np.empty((0, *self.output_shape_), dtype=np.float32)
        else:
            n = n_samples(X)
        expected = (n, *self.output_shape_)
        if out is None:
            out = np.empty(expected, dtype=np.float32)
        elif tuple(out.shape) != expected:
            raise ValueError(f"out has shape {tuple(out.shape)}, expected {expected}.")
        start = 0
        for a in self.iter_activations(X, _checked=True):
            if start + a.shape[0] > n:
                raise ValueError(f"X yielded more than its length {n} of samples.")
            out[start:start + a.shape[0]] = a.numpy()
            start += a.shape[0]
        if start != n:
            raise ValueError(f"X yielded {start} samples, but its length is {n}.")
        return out

    def iter_activations(self, X, _checked=False):
        """Activations of ``self.layer`` for ``X``, one batch at a time (float32 CPU tensors).

        For outputs that need not be held at once, e.g. written to disk in
        chunks (:func:`skdebias.distributed.write_activations`).

        Parameters
        ----------
        X : array-like, tensor, Dataset, DataLoader or IterableDataset

        Yields
        ------
        a : torch.Tensor of shape (batch, *output_shape_)
        """
        check_is_fitted(self, "output_shape_")
        if not _checked:
            X = self._validate_X(X, reset=False, allow_iterable=True)
        try:
            total = -(-n_samples(X) // self.batch_size)
        except TypeError:
            total = None
        batches = iter_batches(X, batch_size=self.batch_size, device=self.device_,
                               num_workers=self.num_workers)
        # on a GPU, image batches run in channels_last (the layout of its tensor-core
        # convolutions; on the CPU the gain depends on the network and the batch, so the
        # batch's own layout is kept there), and each batch's activations are copied back
        # while the next batch is read and sent: the copy is waited for one batch later
        layout = ChannelsLast() if self.device_.type == "cuda" else None
        pending = None  # (activations on their way to the CPU, the event of their arrival)
        for xb in progress_bar(batches, self.verbose, total=total, desc="activations"):
            a = self._forward(xb, layout).float()
            if a.device.type != "cuda":
                yield a.cpu()
                continue
            host, arrived = a.to("cpu", non_blocking=True), torch.cuda.Event()
            arrived.record(torch.cuda.current_stream(a.device))
            if pending is not None:
                pending[1].synchronize()
                yield pending[0]
            pending = host, arrived
        if pending is not None:
            pending[1].synchronize()
            yield pending[0]

    def get_feature_names_out(self, input_features=None):
        """Names ``"<layer>_<i>"`` for the pooled output features."""
        check_is_fitted(self, "output_shape_")
        return np.asarray([f"{self.layer}_{i}" for i in range(self.n_features_out_)], dtype=object)
