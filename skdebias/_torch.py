"""Private torch helpers shared by every estimator in skdebias.

One place for: device resolution, batching over arrays / tensors / Datasets,
layer lookup by name, forward-hook context managers, train/eval state
preservation and safe copies of a user's network. No other module
re-implements any of these.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import io
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

__all__ = [
    "resolve_device",
    "get_module",
    "find_layer",
    "layer_names",
    "n_samples",
    "iter_batches",
    "dataset_targets",
    "capture_output",
    "stop_after",
    "preserve_mode",
    "copy_module",
    "to_numpy",
    "as_tensor",
    "set_seed",
    "progress_bar",
]


# --------------------------------------------------------------------------- device
def resolve_device(device="auto") -> torch.device:
    """Turn ``device`` into a :class:`torch.device`.

    ``"auto"`` (or ``None``) picks CUDA when it is available, else the CPU.
    Any string or :class:`torch.device` torch understands is accepted.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device={device!r} is not valid; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
            ) from exc
    else:
        raise ValueError(
            f"device={device!r} is not valid; use 'auto', 'cpu', 'cuda', 'cuda:N' "
            "or a torch.device."
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use 'auto' or 'cpu'.")
    return dev


# --------------------------------------------------------------------------- modules
def _is_skorch_net(obj) -> bool:
    try:
        from skorch import NeuralNet
    except ImportError:  # pragma: no cover - skorch is a hard dependency
        return False
    return isinstance(obj, NeuralNet)


def get_module(estimator) -> nn.Module:
    """Return the :class:`torch.nn.Module` behind ``estimator``.

    ``estimator`` is a module or a skorch ``NeuralNet``. A net that has not been
    initialised is initialised on a *clone*, so the caller's object is untouched.
    """
    if isinstance(estimator, nn.Module):
        return estimator
    if _is_skorch_net(estimator):
        if not getattr(estimator, "initialized_", False):
            from sklearn.base import clone

            estimator = clone(estimator).initialize()
        return estimator.module_
    raise TypeError(
        "estimator must be a torch.nn.Module or a skorch NeuralNet, "
        f"got {type(estimator).__name__}."
    )


def layer_names(module: nn.Module) -> list[str]:
    """Names of all sub-modules (``dict(module.named_modules())`` keys, root excluded)."""
    return [name for name, _ in module.named_modules() if name]


def find_layer(module: nn.Module, name: str) -> nn.Module:
    """Look up a sub-module by its dotted name.

    Raises
    ------
    ValueError
        If ``name`` is not a layer of ``module``; the message lists the closest
        valid names.
    """
    if not isinstance(name, str):
        raise ValueError(f"layer must be a string naming a sub-module, got {name!r}.")
    modules = dict(module.named_modules())
    if name in modules and name != "":
        return modules[name]
    names = layer_names(module)
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.4) or names[:5]
    raise ValueError(
        f"Unknown layer {name!r}. Closest valid names: {', '.join(map(repr, close))} "
        f"({len(names)} layers in total; see dict(module.named_modules()))."
    )


def copy_module(module: nn.Module) -> nn.Module:
    """Deep copy of ``module`` that shares nothing with the original.

    Falls back to a ``torch.save``/``torch.load`` round trip for modules that
    ``copy.deepcopy`` cannot handle (e.g. with weight-norm style hooks).
    """
    try:
        return copy.deepcopy(module)
    except Exception:  # pragma: no cover - rare modules only
        buffer = io.BytesIO()
        torch.save(module, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)


@contextlib.contextmanager
def preserve_mode(module: nn.Module, train: bool = False):
    """Put ``module`` in train/eval mode for the block and restore every sub-module's flag after."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(train)
    try:
        yield module
    finally:
        for m, flag in flags:
            m.training = flag


# --------------------------------------------------------------------------- hooks
class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early."""


@contextlib.contextmanager
def capture_output(layer: nn.Module, detach: bool = True, stop: bool = False):
    """Record the output of ``layer`` during forward passes.

    Yields a list; each forward through ``layer`` appends its output tensor.
    With ``stop=True`` the forward pass is aborted right after ``layer``
    (wrap the call in :func:`stop_after`). The hook is removed on exit, also
    when an exception is raised.
    """
    store: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        store.append(output.detach() if detach else output)
        if stop:
            raise _StopForward

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def stop_after():
    """Swallow the early-exit signal of a ``capture_output(..., stop=True)`` hook."""
    try:
        yield
    except _StopForward:
        pass


# --------------------------------------------------------------------------- data
def _is_dataset(X) -> bool:
    return isinstance(X, torch.utils.data.Dataset) and not isinstance(X, torch.Tensor)


def n_samples(X) -> int:
    """Number of samples in an array, tensor or sized Dataset."""
    if _is_dataset(X):
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


def _first(item):
    if isinstance(item, (tuple, list)):
        return item[0]
    return item


def iter_batches(X, batch_size: int = 128, y=None, device=None, dtype=torch.float32,
                 indices=None) -> Iterator:
    """Iterate over ``X`` in batches, yielding tensors on ``device``.

    ``X`` is a numpy array, a tensor or a ``torch.utils.data.Dataset`` whose
    items are ``x`` or ``(x, y, ...)``. With ``y`` given (same length), yields
    ``(xb, yb)``; otherwise ``xb``. Only one batch is materialised at a time.
    ``indices`` restricts iteration to those samples (in that order).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    batch_size = int(batch_size)
    n = n_samples(X)
    order = np.arange(n) if indices is None else np.asarray(indices)
    if y is not None:
        y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        if _is_dataset(X):
            xb = torch.stack([torch.as_tensor(_first(X[int(i)])) for i in idx])
        elif isinstance(X, torch.Tensor):
            xb = X[torch.as_tensor(idx, device=X.device)] if indices is not None else X[start:start + batch_size]
        else:
            xb = torch.as_tensor(np.asarray(X[idx] if indices is not None else X[start:start + batch_size]))
        xb = xb.to(device=device, dtype=dtype) if dtype is not None else xb.to(device=device)
        if y is None:
            yield xb
        else:
            yield xb, y[torch.as_tensor(idx)].to(device)


def dataset_targets(X):
    """Labels of a Dataset yielding ``(x, y)`` items, or ``None`` when it yields bare ``x``."""
    if not _is_dataset(X):
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


def set_seed(random_state) -> torch.Generator | None:
    """Seed torch's global RNGs from an int ``random_state``; return a seeded Generator.

    ``None`` leaves the global state alone and returns ``None``.
    """
    if random_state is None:
        return None
    from sklearn.utils import check_random_state

    seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def progress_bar(iterable, enabled: bool, total=None, desc=None):
    """Wrap ``iterable`` in a tqdm bar when ``enabled``."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)
