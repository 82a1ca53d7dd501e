"""Networks: the module behind an estimator, layer lookup by name, copies and
replacements, the device a module lives on, train/eval flags, class labels."""

from __future__ import annotations

import contextlib
import copy
import difflib
import io

import numpy as np
import torch
from sklearn.base import clone
from skorch import NeuralNet
from torch import nn

from ._data import iter_batches

__all__ = [
    "is_skorch_net", "network", "get_module", "layer_names", "find_layer", "last_linear",
    "replace_module", "copy_module", "module_device", "preserve_mode", "copy_estimator",
    "network_classes", "predict_proba", "check_logits", "n_outputs", "resolve_linear", "OUTPUTS", "detect_output",
    "resolve_output", "to_logits", "to_probabilities", "conv_blocks",
]


def conv_blocks(in_channels, width):
    """The three 3x3 conv blocks of SmallCNN, as a list of layers: conv(in, w), ReLU, max pool,
    conv(w, 2w), ReLU, max pool, conv(2w, 4w), ReLU (the built-in networks share them)."""
    w = width
    return [nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU()]


def is_skorch_net(obj) -> bool:
    """Whether ``obj`` is a skorch ``NeuralNet`` (fitted, initialised or not)."""
    return isinstance(obj, NeuralNet)


def network(net):
    """The network behind ``net``: a module or skorch net as is, else ``net.module_``
    (e.g. a fitted :class:`~skdebias.correction.GradientPenaltyCorrector`)."""
    if isinstance(net, torch.nn.Module) or is_skorch_net(net):
        return net
    module = getattr(net, "module_", None)
    if isinstance(module, torch.nn.Module):
        return module
    raise TypeError(
        "net must be a torch.nn.Module, a skorch NeuralNet or a fitted estimator with a module_ "
        f"(e.g. a fitted corrector), got {type(net).__name__}.")


def get_module(estimator) -> nn.Module:
    """Return the :class:`torch.nn.Module` behind ``estimator``.

    ``estimator`` is a module or a skorch ``NeuralNet``. A net that has not been
    initialised is initialised on a *clone*, so the caller's object is untouched.
    """
    if isinstance(estimator, nn.Module):
        return estimator
    if is_skorch_net(estimator):
        if not getattr(estimator, "initialized_", False):
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
    names = [name for name, m in module.named_modules() if name and isinstance(m, nn.Linear)]
    if not names and isinstance(module, nn.Linear):
        raise ValueError(
            "The network is a single torch.nn.Linear, which has no layer name to use; wrap it "
            "as torch.nn.Sequential(net) (its layer is then '0').")
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


def module_device(module) -> torch.device:
    """The device of a module's first parameter (or buffer); the CPU for a module with neither."""
    param = next(module.parameters(), None)
    if param is None:
        buf = next(module.buffers(), None)
        return buf.device if buf is not None else torch.device("cpu")
    return param.device


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


def copy_estimator(estimator, device=None):
    """Deep copy of a network for a corrector: ``(copy, module)``.

    A skorch ``NeuralNet`` is deep-copied (and initialised if needed), so the
    copy keeps ``predict``/``predict_proba`` and ``classes_``; a module is copied
    with :func:`copy_module`. With ``device`` given, the copy's module is moved
    there (and a skorch copy's ``device`` set). The caller's object is untouched.
    """
    if is_skorch_net(estimator):
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


def network_classes(estimator, n_outputs):
    """Class labels in output order: a fitted skorch classifier's ``classes_``, else ``0..n_outputs-1``."""
    if is_skorch_net(estimator):
        try:
            classes = np.asarray(estimator.classes_)
        except (AttributeError, KeyError, TypeError):  # not fitted or no classes
            classes = None
        if classes is not None and classes.ndim == 1 and len(classes) == n_outputs:
            return classes
    return np.arange(n_outputs)


def predict_proba(estimator, X, batch_size: int = 256, output: str = "auto") -> np.ndarray:
    """Class probabilities of a network for ``X`` as float32 ``(n, n_classes)``.

    A skorch net uses its own ``predict_proba`` (and output nonlinearity). A
    :class:`torch.nn.Module` runs in eval mode without gradients, in batches,
    on the device its parameters live on (the module is not moved and its
    train/eval flags are restored); its outputs are turned into probabilities
    according to ``output`` (one of :data:`OUTPUTS`; ``"auto"`` detects it on
    the first batch: a module ending in ``Softmax`` is not passed through a
    second softmax).
    """
    if is_skorch_net(estimator):
        return np.asarray(estimator.predict_proba(X), dtype=np.float32)
    module = get_module(estimator)
    device = module_device(module)
    out = []
    with preserve_mode(module, train=False), torch.no_grad():
        for xb in iter_batches(X, batch_size=batch_size, device=device):
            raw = check_logits(module(xb))
            if output == "auto":
                output = detect_output(raw)
            out.append(to_probabilities(raw, output).float().cpu())
    return torch.cat(out).numpy()


def check_logits(out) -> torch.Tensor:
    """The network output ``out`` (first element of a tuple) checked to be ``(n, n_classes)``."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(
            "The network must output logits of shape (n_samples, n_classes); got "
            f"{type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}.")
    return out


def n_outputs(module: nn.Module, xb: torch.Tensor) -> int:
    """Number of network outputs (classes), from one forward pass of the batch ``xb``."""
    with preserve_mode(module, train=False), torch.no_grad():
        out = module(xb.to(module_device(module)))
    return int(check_logits(out).shape[1])


def resolve_linear(module: nn.Module, layer, owner: str):
    """``(name, torch.nn.Linear)`` for the estimator parameter ``layer``: that layer, or the
    last Linear layer when ``layer`` is None. ``owner`` (the estimator's name) goes into the
    error raised when the layer is not a Linear layer."""
    name = last_linear(module, "layer") if layer is None else layer
    lin = find_layer(module, name)
    if not isinstance(lin, nn.Linear):
        raise ValueError(
            f"layer={name!r} is a {type(lin).__name__}; {owner} updates a torch.nn.Linear "
            "layer (layer=None picks the last one).")
    return name, lin


#: What a network's output holds: scores for softmax, probabilities (rows sum to 1, e.g. a
#: module ending in ``Softmax``, skorch's default), or log-probabilities (``LogSoftmax``).
OUTPUTS = ("auto", "logits", "probabilities", "log_probabilities")


def detect_output(out: torch.Tensor) -> str:
    """``"probabilities"``, ``"log_probabilities"`` or ``"logits"`` for a batch of outputs."""
    out = check_logits(out).detach().double()
    if out.shape[1] < 2:
        return "logits"
    ones = torch.ones(out.shape[0], dtype=out.dtype, device=out.device)
    if bool((out >= 0).all()) and torch.allclose(out.sum(dim=1), ones, atol=1e-4):
        return "probabilities"
    if bool((out <= 0).all()) and torch.allclose(out.exp().sum(dim=1), ones, atol=1e-4):
        return "log_probabilities"
    return "logits"


def resolve_output(output, module: nn.Module, xb: torch.Tensor) -> str:
    """The output space of ``module``: ``output`` itself, or detected on the batch ``xb``."""
    if output != "auto":
        return output
    with preserve_mode(module, train=False), torch.no_grad():
        return detect_output(module(xb.to(module_device(module))))


def to_logits(out: torch.Tensor, output: str) -> torch.Tensor:
    """Outputs as scores whose softmax is the network's probabilities (log-probabilities
    for probability outputs: the same softmax, differentiable)."""
    if output == "probabilities":
        return torch.log(out.clamp_min(torch.finfo(out.dtype).tiny))
    return out


def to_probabilities(out: torch.Tensor, output: str) -> torch.Tensor:
    """Outputs as class probabilities."""
    if output == "probabilities":
        return out
    if output == "log_probabilities":
        return out.exp()
    return torch.softmax(out, dim=1)
