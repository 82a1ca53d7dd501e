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
    "replace_module",
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
    "predict_proba",
    "copy_estimator",
    "last_linear",
    "layer_inputs",
    "limit_threads",
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


def last_linear(module: nn.Module, param: str = "layer") -> str:
    """Name of the last :class:`torch.nn.Linear` sub-module (in registration order).

    ``param`` names the estimator parameter a user can set instead; it appears
    in the error raised when the network has no linear layer.
    """
    names = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(
            f"The network has no torch.nn.Linear layer to use by default; pass {param}='<name>' "
            "(see dict(module.named_modules())).")
    return names[-1]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the sub-module ``name`` of ``root`` is; return the old one."""
    old = find_layer(root, name)
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
    return old


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
def capture_output(layer: nn.Module, detach: bool = True, stop: bool = False,
                   capture_input: bool = False, requires_grad: bool = False):
    """Record the output of ``layer`` during forward passes.

    Yields a list; each forward through ``layer`` appends its output tensor.
    With ``capture_input=True`` the (first) input of ``layer`` is recorded
    instead, e.g. the features entering a linear head.
    With ``stop=True`` the forward pass is aborted right after ``layer``
    (wrap the call in :func:`stop_after`). The hook is removed on exit, also
    when an exception is raised.
    With ``detach=False`` (output capture) the forward goes on with a copy of
    the recorded tensor, so in-place operations after ``layer`` cannot change
    it and ``torch.autograd.grad(f, store[-1])`` is the gradient at ``layer``.
    With ``requires_grad=True`` as well, a tensor output that is not part of an
    autograd graph (e.g. all earlier layers frozen) is recorded, while
    gradients are enabled, as a leaf that requires grad.
    """
    store: list[torch.Tensor] = []

    def hook(_module, inputs, output):
        raw = output
        if capture_input:
            output = inputs
        if isinstance(output, (tuple, list)):
            output = output[0]
        replaced = None
        if not detach and not capture_input and isinstance(raw, torch.Tensor):
            if requires_grad and torch.is_grad_enabled() and not raw.requires_grad:
                output = output.detach().requires_grad_(True)
            # the forward goes on with a copy, so an in-place op after the layer (e.g.
            # ReLU(inplace=True)) cannot overwrite the recorded tensor
            replaced = output.clone() if not stop else None
        store.append(output.detach() if detach else output)
        if stop:
            raise _StopForward
        return replaced

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
        moved = xb.to(device=device, dtype=dtype) if dtype is not None else xb.to(device=device)
        if indices is None and not _is_dataset(X) and moved.data_ptr() == xb.data_ptr():
            # a view of the caller's X: an in-place first layer must not write into it
            moved = moved.clone()
        xb = moved
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


def layer_inputs(module: nn.Module, name: str, X, batch_size: int, device, indices=None,
                 check_output: str | None = None, progress: bool = False,
                 desc: str | None = None) -> torch.Tensor:
    """Inputs of the layer ``name`` (e.g. a linear head) for ``X``, flattened: float32 ``(n, d)`` on the CPU.

    One forward pass per batch in eval mode without gradients (the module's
    train/eval flags are restored). ``indices`` selects rows of ``X``. With
    ``check_output`` (a hint for the error message), the first batch verifies
    that the layer's output *is* the network's output, i.e. the layer produces
    the logits; a ``ValueError`` naming the layer is raised otherwise.

    Image batches on the CPU go through the network in ``channels_last`` memory
    format, which CPU convolution and pooling kernels run faster (the forward
    pass over FMD's 1,000 pair images of SmallCNN: about half the time). The
    module itself is not touched. A network that cannot take that layout (e.g.
    ``.view`` on a convolution output) fails on the first batch, which is then
    run, like every later one, in the batch's own layout.
    """
    layer = find_layer(module, name)
    n = n_samples(X) if indices is None else len(indices)
    batches = iter_batches(X, batch_size=batch_size, device=device, indices=indices)
    feats = []
    fast_layout = None  # decided on the first 4-D CPU batch

    def forward(xb):
        with capture_output(layer, capture_input=True) as store_in, \
                capture_output(layer) as store_out:
            out = module(xb)
        return out, store_in, store_out

    with preserve_mode(module, train=False), torch.no_grad():
        for xb in progress_bar(batches, progress, total=-(-n // batch_size), desc=desc):
            if fast_layout is not False and xb.dim() == 4 and xb.device.type == "cpu":
                try:
                    out, store_in, store_out = forward(
                        xb.contiguous(memory_format=torch.channels_last))
                    fast_layout = True
                except RuntimeError:
                    if fast_layout:  # the layout worked on an earlier batch: a real error
                        raise
                    fast_layout = False
                    out, store_in, store_out = forward(xb)
            else:
                out, store_in, store_out = forward(xb)
            if not store_in:
                raise RuntimeError(f"Layer {name!r} was not called in the forward pass.")
            if check_output is not None:
                out = out[0] if isinstance(out, (tuple, list)) else out
                if out.shape != store_out[-1].shape or not torch.allclose(
                        out, store_out[-1], rtol=1e-4, atol=1e-5):
                    raise ValueError(
                        f"The output of layer {name!r} is not the network's output; {check_output}")
                check_output = None
            f = store_in[-1]
            feats.append(f.reshape(f.shape[0], -1).float().cpu())
    return torch.cat(feats)


def predict_proba(estimator, X, batch_size: int = 256) -> np.ndarray:
    """Class probabilities of a network for ``X`` as float32 ``(n, n_classes)``.

    A skorch net uses its own ``predict_proba`` (and output nonlinearity); a
    :class:`torch.nn.Module` is assumed to output logits: softmax of its output,
    computed in eval mode without gradients, in batches, on the device its
    parameters live on (the module is not moved and its train/eval flags are
    restored).
    """
    if _is_skorch_net(estimator):
        return np.asarray(estimator.predict_proba(X), dtype=np.float32)
    module = get_module(estimator)
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out = []
    with preserve_mode(module, train=False), torch.no_grad():
        for xb in iter_batches(X, batch_size=batch_size, device=device):
            out.append(torch.softmax(module(xb), dim=1).float().cpu())
    return torch.cat(out).numpy()


def copy_estimator(estimator, device=None):
    """Deep copy of a network for a corrector: ``(copy, module)``.

    A skorch ``NeuralNet`` is deep-copied (and initialised if needed), so the
    copy keeps ``predict``/``predict_proba`` and ``classes_``; a module is copied
    with :func:`copy_module`. With ``device`` given, the copy's module is moved
    there (and a skorch copy's ``device`` set). The caller's object is untouched.
    """
    if _is_skorch_net(estimator):
        net = copy.deepcopy(estimator)
        if not getattr(net, "initialized_", False):
            net.initialize()
        if device is not None:
            net.module_.to(device)
            net.device = str(device)
        return net, net.module_
    module = copy_module(get_module(estimator))
    if device is not None:
        module = module.to(device)
    return module, module


@contextlib.contextmanager
def limit_threads(n: int = 1):
    """Run the block with at most ``n`` intra-op CPU threads, restoring the setting after.

    For loops over many tiny tensor operations (e.g. training a linear head on
    extracted features): on a busy machine each multi-threaded call of a tiny
    op can cost milliseconds of thread synchronisation, 100x its compute.
    """
    before = torch.get_num_threads()
    if before > n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
