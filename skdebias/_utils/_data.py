"""Data: the one input check, batching over arrays / memmaps / tensors /
Datasets, subsets, labels of a Dataset, data in the form skorch takes."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils.validation import check_array

__all__ = [
    "is_dataset", "n_samples", "as_tensor", "iter_batches", "first_batch", "dataset_targets",
    "to_numpy", "take", "training_data", "check_input", "check_input_shape", "first_non_finite",
    "as_float32", "is_iterable_dataset", "reading", "is_dask_array",
]

#: DataLoader worker processes for Dataset input, set for a block by :func:`reading`.
_NUM_WORKERS = contextvars.ContextVar("skdebias_num_workers", default=0)


def is_dataset(X) -> bool:
    return isinstance(X, torch.utils.data.Dataset) and not isinstance(X, torch.Tensor)


def n_samples(X) -> int:
    """Number of samples in an array, tensor or sized Dataset."""
    if is_dataset(X):
        return len(X)
    if isinstance(X, (np.ndarray, torch.Tensor)):
        return int(X.shape[0])
    return len(X)


def as_tensor(X, dtype=torch.float32, device=None) -> torch.Tensor:
    """``X`` as a tensor (no copy when already a tensor of that dtype/device)."""
    if isinstance(X, torch.Tensor):
        return X.to(dtype=dtype, device=device) if dtype is not None else X.to(device=device)
    X = np.asarray(X)
    if dtype is None:
        return torch.as_tensor(X, device=device)
    return torch.as_tensor(X, dtype=dtype, device=device)


def _is_image_bytes(x, sample_ndim):
    """uint8 data with at least two axes per sample: images in 0..255."""
    dtype = x.dtype
    return (dtype == torch.uint8 or dtype == np.uint8) and sample_ndim >= 2


def to_float(x, sample_ndim, dtype=torch.float32, device=None):
    """A batch (or one sample) of ``X`` as a float tensor, converted here and not before.

    Any stride (``X[..., ::-1]``), byte order or numeric dtype is accepted; uint8
    images (two or more axes per sample) are scaled from 0..255 to [0, 1]. With
    ``dtype=None`` the values keep their dtype (no scaling). With ``device``, the
    batch is moved there (through pinned memory, without blocking, for CUDA):
    data narrower than ``dtype`` (uint8 images: a quarter of the bytes) is moved
    first and converted on the device, the rest converted first.
    """
    if dtype is None:
        return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.ascontiguousarray(x))
    scale = _is_image_bytes(x, sample_ndim)
    if not isinstance(x, torch.Tensor):
        x = np.asarray(x)
        # native byte order, positive strides and writable (a read-only memmap's rows are
        # copied, one batch at a time): what torch can wrap without a copy or a warning
        native = x.dtype.newbyteorder("=")
        if x.flags.writeable:
            x = np.ascontiguousarray(x, dtype=native)
        else:
            x = np.array(x, dtype=native, order="C")
        x = torch.from_numpy(x)
    if device is None:
        x = x.to(dtype)
    elif x.element_size() < dtype.itemsize:
        x = _send(x, device).to(dtype)
    else:
        x = _send(x.to(dtype), device)
    return x / 255 if scale else x


def _send(x, device):
    """``x`` on ``device`` (``None``: where it is); a CPU batch bound for CUDA goes through
    pinned memory (pinned once: a batch a DataLoader pinned is used as it is), without
    blocking (the copy is ordered before the work queued after it on the device)."""
    if device is None:
        return x
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and x.device.type == "cpu":
        x = x.pin_memory()
    return x.to(device=device, non_blocking=on_cuda)


def _data_ptr(x):
    return x.data_ptr() if isinstance(x, torch.Tensor) else x.__array_interface__["data"][0]


def _first(item):
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


def is_dask_array(X) -> bool:
    """``X`` is a dask array (checked without importing dask)."""
    return type(X).__module__.startswith("dask.") and hasattr(X, "map_blocks")


def is_iterable_dataset(X) -> bool:
    """``X`` is a ``torch.utils.data.IterableDataset`` (a stream: no length needed, one pass)."""
    return isinstance(X, torch.utils.data.IterableDataset)


def _collate(items, dtype=torch.float32):
    """DataLoader collate of Dataset items ``x`` or ``(x, y, ...)``: the images, each converted
    as it is read (:func:`to_float`), stacked into one batch."""
    return torch.stack([to_float(x, np.ndim(x), dtype) for x in map(_first, items)])


def _check_workers(num_workers):
    from ._validation import check_int

    return check_int("num_workers", num_workers, low=0)


@contextlib.contextmanager
def reading(num_workers=0):
    """Read Dataset input in the enclosed block with ``num_workers`` DataLoader worker
    processes (the default of :func:`iter_batches`); an estimator's ``fit``, ``transform``
    and ``predict`` run inside it with the estimator's ``num_workers``."""
    token = _NUM_WORKERS.set(_check_workers(num_workers))
    try:
        yield
    finally:
        _NUM_WORKERS.reset(token)


def _dataset_loader(X, batch_size, dtype, num_workers, pin_memory, indices=None):
    """A DataLoader over a Dataset (restricted to ``indices``) that yields converted batches."""
    if indices is not None:
        X = torch.utils.data.Subset(X, np.asarray(indices).tolist())
    return torch.utils.data.DataLoader(
        X, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=functools.partial(_collate, dtype=dtype), pin_memory=pin_memory,
        persistent_workers=False)


def iter_batches(X, batch_size: int = 128, y=None, device=None, dtype=torch.float32,
                 indices=None, num_workers=None) -> Iterator:
    """Iterate over ``X`` in batches, yielding tensors on ``device``.

    ``X`` is a numpy array or memmap, a tensor, a ``torch.utils.data.Dataset``
    whose items are ``x`` or ``(x, y, ...)``, or an ``IterableDataset`` (read
    once, in its order). With ``y`` given (same length), yields ``(xb, yb)``;
    otherwise ``xb``. Only one batch is read and converted at a time, so the
    memory used is bounded by the batch whatever the input. ``indices``
    restricts iteration to those samples (in that order). A Dataset is read
    through a ``DataLoader`` with ``num_workers`` worker processes (0: in this
    process; ``None``: the value set by :func:`reading`, else 0); batches
    bound for CUDA are read into pinned memory.
    """
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batch_size = int(batch_size)
    num_workers = _NUM_WORKERS.get() if num_workers is None else _check_workers(num_workers)
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if is_iterable_dataset(X):
        if y is not None or indices is not None:
            raise TypeError(
                "An IterableDataset is read once, in its order: it cannot be paired with y or "
                "subset; pass a map-style Dataset, an array or a tensor.")
        for xb in _dataset_loader(X, batch_size, dtype, num_workers, on_cuda):
            yield _send(xb, device)
        return
    n = n_samples(X)
    order = np.arange(n) if indices is None else np.asarray(indices)
    if y is not None:
        y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    loader = iter(_dataset_loader(X, batch_size, dtype, num_workers, on_cuda, indices)) \
        if is_dataset(X) else None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if loader is not None:
            xb = _send(next(loader), device)
        else:
            raw = X[torch.as_tensor(idx, device=X.device) if isinstance(X, torch.Tensor)
                    else idx] if indices is not None else X[start:start + batch_size]
            xb = to_float(raw, np.ndim(raw) - 1, dtype, device=device)
            if indices is None and xb.data_ptr() == _data_ptr(raw):
                # a view of the caller's X: an in-place first layer must not write into it
                xb = xb.clone()
        if y is None:
            yield xb
        else:
            yield xb, y[torch.as_tensor(idx)].to(device)


def first_batch(X):
    """The first sample of ``X`` as a float32 batch of one, on the CPU."""
    batches = iter_batches(X, batch_size=1, num_workers=0)
    try:
        return next(batches)
    except StopIteration:
        raise ValueError("X is an empty IterableDataset.") from None
    finally:
        batches.close()


def dataset_targets(X):
    """Labels of a Dataset yielding ``(x, y)`` items, or ``None`` when it yields bare ``x``."""
    if not is_dataset(X):
        return None
    targets = getattr(X, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    first = X[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        return None
    return np.asarray([int(X[i][1]) for i in range(len(X))])


def to_numpy(t) -> np.ndarray:
    """Tensor or array-like to a numpy array (detached, on the CPU)."""
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def take(X, idx):
    """Rows ``idx`` of an array, tensor or Dataset (a ``Subset``)."""
    if is_dataset(X):
        return torch.utils.data.Subset(X, np.asarray(idx).tolist())
    if isinstance(X, torch.Tensor):
        return X[torch.as_tensor(np.asarray(idx), device=X.device)]
    return X[np.asarray(idx)]


class _Pairs(torch.utils.data.Dataset):
    """A Dataset yielding ``(x, y_i)``: the images of ``X`` (items ``x`` or ``(x, ...)``)
    with the given labels (zeros when none are given), as skorch expects."""

    def __init__(self, X, y=None):
        self.X = X
        self.y = None if y is None else torch.as_tensor(np.asarray(y), dtype=torch.long)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        x = _first(self.X[i])
        return to_float(x, np.ndim(x)), (self.y[i] if self.y is not None else torch.tensor(0))


def training_data(X, y=None):
    """``X`` for skorch: float32 arrays and tensors as they are; anything else (Datasets,
    other dtypes, memmaps) read and converted one sample at a time, relabelled with ``y``."""
    if isinstance(X, (np.ndarray, torch.Tensor)) and X.dtype in (np.float32, torch.float32) \
            and not isinstance(X, np.memmap) \
            and (isinstance(X, torch.Tensor) or min(X.strides, default=0) >= 0):
        return X  # (torch cannot wrap an array with a negative stride, e.g. X[..., ::-1])
    return _Pairs(X, y)


#: Values checked at a time for NaN/inf, so that a large array, memmap or tensor is never
#: converted or compared as a whole (16 M values: 64 MB of float32).
_CHECK_CHUNK_VALUES = 1 << 24


def first_non_finite(X):
    """Index of the first sample of a float array or tensor with a NaN or infinite value."""
    per_sample = max(1, int(np.prod(X.shape[1:])))
    step = max(1, _CHECK_CHUNK_VALUES // per_sample)
    for start in range(0, X.shape[0], step):
        chunk = X[start:start + step]
        # fast path: a finite sum means every value is finite (NaN and inf propagate); only a
        # chunk whose sum is not finite (or overflows) is searched value by value
        if isinstance(chunk, torch.Tensor):
            if bool(torch.isfinite(chunk.sum())):
                continue
            bad = ~torch.isfinite(chunk.reshape(chunk.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                return start + int(torch.nonzero(bad)[0, 0])
        else:
            chunk = np.asarray(chunk)
            with np.errstate(over="ignore", invalid="ignore"):
                total = chunk.sum()
            if np.isfinite(total):
                continue
            bad = ~np.isfinite(chunk.reshape(chunk.shape[0], -1)).all(axis=1)
            if bad.any():
                return start + int(np.flatnonzero(bad)[0])
    return None


def check_input(X, name="X", allow_iterable=False):
    """The one input check of every estimator and metric that runs a network.

    ``X`` is a numpy array or memmap, a torch tensor, a nested list, a
    ``torch.utils.data.Dataset`` (items ``x`` or ``(x, y, ...)``) or a
    ``DataLoader`` (its dataset is used; the estimator's ``batch_size`` and
    ``num_workers`` apply). With ``allow_iterable=True`` (steps that read the
    data once, in order) an ``IterableDataset`` is accepted too; elsewhere it
    is refused with what to pass instead. Nothing is converted here: batches
    are converted to float32 as they are read (:func:`iter_batches`), so the
    memory used stays bounded by the batch. Checked: at least one sample and
    two dimensions, a real numeric dtype, no NaN or infinity (the message
    names the first bad sample). Integer images: uint8 (0..255) are scaled to
    [0, 1] with a warning; other integer images are refused, since their range
    is unknown.

    Returns ``(X, per_sample_shape)``; the shape is ``None`` for a Dataset.
    """
    if isinstance(X, torch.utils.data.DataLoader):
        X = X.dataset
    if is_iterable_dataset(X):
        if allow_iterable:
            return X, None
        raise TypeError(
            f"{name} is an IterableDataset, which has no random access; this step needs it "
            "(it shuffles, subsets or reads the data more than once): pass a map-style "
            "Dataset, an array or a tensor. (ActivationExtractor.transform reads an "
            "IterableDataset in one pass.)")
    if is_dataset(X):
        if n_samples(X) == 0:
            raise ValueError(f"{name} is an empty Dataset.")
        return X, None
    if sp.issparse(X):
        raise TypeError(
            f"Sparse input is not supported: pass {name} as a dense array of images (n, C, H, W).")
    if not isinstance(X, (np.ndarray, torch.Tensor)):
        X = np.asarray(X)
    kind = "c" if isinstance(X, torch.Tensor) and X.is_complex() else \
        ("f" if isinstance(X, torch.Tensor) and X.is_floating_point() else
         ("b" if isinstance(X, torch.Tensor) and X.dtype == torch.bool else
          ("i" if isinstance(X, torch.Tensor) else X.dtype.kind)))
    if kind == "c":
        raise ValueError(f"Complex data not supported: {name} must hold real numbers.")
    if kind not in "biuf" or X.ndim < 2 or X.shape[0] == 0 or 0 in tuple(X.shape[1:]):
        if isinstance(X, torch.Tensor):
            raise ValueError(
                f"Expected {name} of shape (n_samples, ...) with at least 2 dimensions and 1 "
                f"sample, got shape {tuple(X.shape)}.")
        # scikit-learn's own checks and messages for 1-d, empty, object and string input,
        # prefixed with the argument's name
        try:
            X = check_array(X, allow_nd=True, dtype=(np.float32, np.float64), input_name=name)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name}: {exc}") from exc
        return X, tuple(X.shape[1:])
    if kind == "f":
        bad = first_non_finite(X)
        if bad is not None:
            raise ValueError(
                f"Input {name} contains NaN or infinity (first at sample {bad}); remove or "
                "replace those samples.")
    elif X.ndim >= 3 and kind in "iu":
        if X.dtype in (np.uint8, torch.uint8):
            warnings.warn(
                f"{name} holds uint8 images; they are scaled from 0..255 to [0, 1] as they are "
                "read. Pass float images to choose another scale.", UserWarning, stacklevel=3)
        else:
            raise ValueError(
                f"{name} holds {X.dtype} images, whose value range is unknown; convert them to "
                "float32 in [0, 1] (e.g. X / 255 for 8-bit, X / 65535 for 16-bit images).")
    return X, tuple(X.shape[1:])


def as_float32(X, name="X"):
    """``X`` checked by :func:`check_input` and converted whole to float32, for code that
    slices it itself (skorch); an array stays an array, a tensor a tensor, a Dataset is
    returned as it is (read item by item). Values beyond float32's range (e.g. 1e39 in
    float64) become infinity in the conversion and are reported like NaN."""
    X, shape = check_input(X, name=name)
    if shape is None:
        return X
    out = to_float(X, len(shape))
    bad = first_non_finite(out)
    if bad is not None:
        raise ValueError(
            f"Input {name} contains NaN or infinity (first at sample {bad}) once converted to "
            "float32; remove or rescale those samples.")
    return out if isinstance(X, torch.Tensor) else out.numpy()


def check_input_shape(estimator, shape, fitted_shape):
    """Raise if the per-sample ``shape`` of new input differs from the one seen in ``fit``.

    ``estimator`` is the estimator (its class name goes into the message); a
    ``None`` shape (a Dataset) is not checked.
    """
    if fitted_shape is None or shape is None or tuple(shape) == tuple(fitted_shape):
        return
    name = type(estimator).__name__
    if len(shape) == 1 and len(fitted_shape) == 1:
        # the wording sklearn's common checks look for
        raise ValueError(
            f"X has {shape[0]} features, but {name} is expecting {fitted_shape[0]} features "
            "as input.")
    raise ValueError(f"X has per-sample shape {tuple(shape)}, but {name} was fitted on "
                     f"{tuple(fitted_shape)}.")
