"""Forward hooks: record a layer's output or input, stop a forward pass after a
layer, the inputs of a layer over a data set, the call order around a layer."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from ._data import check_input, first_batch, iter_batches, n_samples
from ._modules import (
    check_logits,
    find_layer,
    get_module,
    module_device,
    network,
    preserve_mode,
)
from ._runtime import progress_bar
from ._validation import check_target

__all__ = ["capture_output", "stop_after", "ChannelsLast", "layer_inputs", "trace_layer",
           "check_network_input", "layer_gradients"]


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


class ChannelsLast:
    """Run 4-D image batches through a network in ``channels_last`` memory format.

    GPUs' tensor-core convolutions work on channels-last data (an NCHW batch is
    transposed around every convolution): resnet50's forward pass at 224 px,
    batch 128, ran 1.2x (float32) and 1.5x (bfloat16) faster on an H200. On the
    CPU the gain depends on the network and the batch: the forward pass of
    SmallCNN over FMD's 1,000 pair images takes about half the time, resnet18 at
    64 px in batches of 8 takes longer. Outputs are the same up to float
    rounding (on CUDA, float32 convolutions may then run in TF32, torch's
    default ``torch.backends.cudnn.allow_tf32``). The network itself is not
    touched. One that cannot take the layout (e.g. ``.view`` on a convolution
    output) fails on the first batch, which is then run, like every later one,
    in the batch's own layout; an error on a later batch, once the layout has
    worked, is raised.

    ``layout(forward, xb)`` returns ``forward(xb)``, ``xb`` converted when it is 4-D.
    """

    def __init__(self):
        self.works = None  # decided on the first 4-D batch

    def __call__(self, forward, xb):
        if self.works is not False and isinstance(xb, torch.Tensor) and xb.dim() == 4:
            try:
                result = forward(xb.contiguous(memory_format=torch.channels_last))
            except RuntimeError:
                if self.works:  # the layout worked on an earlier batch: a real error
                    raise
                self.works = False
            else:
                self.works = True
                return result
        return forward(xb)


def layer_inputs(module: nn.Module, name: str, X, batch_size: int, device, indices=None,
                 check_output: str | None = None, verbose: int = 0,
                 desc: str | None = None) -> torch.Tensor:
    """Inputs of the layer ``name`` (e.g. a linear head) for ``X``, flattened: float32 ``(n, d)`` on the CPU.

    One forward pass per batch in eval mode without gradients (the module's
    train/eval flags are restored). ``indices`` selects rows of ``X``. With
    ``check_output`` (a hint for the error message), the first batch verifies
    that the layer produces the logits: the network's output is the layer's
    output or its (log-)softmax; a ``ValueError`` naming the layer is raised
    otherwise.

    Image batches go through the network in ``channels_last`` memory format
    (see :class:`ChannelsLast`).
    """
    layer = find_layer(module, name)
    n = n_samples(X) if indices is None else len(indices)
    batches = iter_batches(X, batch_size=batch_size, device=device, indices=indices)
    feats = []
    layout = ChannelsLast()

    def forward(xb):
        with capture_output(layer, capture_input=True) as store_in, \
                capture_output(layer) as store_out:
            out = module(xb)
        return out, store_in, store_out

    with preserve_mode(module, train=False), torch.no_grad():
        for xb in progress_bar(batches, verbose, total=-(-n // batch_size), desc=desc):
            out, store_in, store_out = layout(forward, xb)
            if not store_in:
                raise RuntimeError(f"Layer {name!r} was not called in the forward pass.")
            if check_output is not None:
                out = out[0] if isinstance(out, (tuple, list)) else out
                z = store_out[-1]
                # the network's output is the layer's (logits), or its softmax / log-softmax
                # (a network ending in Softmax, as skorch's defaults build it)
                same = out.shape == z.shape and any(
                    torch.allclose(out, cand, rtol=1e-4, atol=1e-5)
                    for cand in (z, torch.softmax(z, dim=1), torch.log_softmax(z, dim=1)))
                if not same:
                    raise ValueError(
                        f"The output of layer {name!r} is not the network's output; {check_output}")
                check_output = None
            f = store_in[-1]
            feats.append(f.reshape(f.shape[0], -1).float().cpu())
    return torch.cat(feats)


def trace_layer(module, layer, xb):
    """Run one forward pass and record the order of module calls around ``layer``.

    Returns ``(before, out_shape, n_outputs)``: ``before`` the names of the
    modules whose forward starts before ``layer``'s forward ends (``layer`` and
    its sub-modules included, the root included), the per-sample output shape
    of ``layer`` and the number of network outputs.
    """
    target = find_layer(module, layer)
    names = {id(m): name for name, m in module.named_modules()}
    started: list[str] = []
    state = {"end": None, "shape": None}
    handles = []

    def pre_hook(mod, _inputs):
        started.append(names.get(id(mod), ""))

    def post_hook(_mod, _inputs, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        if state["end"] is None:
            state["end"] = len(started)
            state["shape"] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None

    try:
        for m in module.modules():
            handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(target.register_forward_hook(post_hook))
        device = module_device(module)
        with preserve_mode(module, train=False), torch.no_grad():
            out = module(xb.to(device))
    finally:
        for h in handles:
            h.remove()
    if state["end"] is None:
        raise ValueError(f"Layer {layer!r} is not called in the forward pass of the network.")
    if state["shape"] is None:
        raise ValueError(f"Layer {layer!r} does not output a tensor.")
    out = check_logits(out)
    return started[:state["end"]], state["shape"], int(out.shape[1])


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def check_network_input(module: nn.Module, xb: torch.Tensor, name: str = "X"):
    """Run one batch ``xb`` through ``module``; when the network cannot take it, raise a
    ``ValueError`` naming ``name`` and the input its first convolution or linear layer
    expects, instead of torch's error from deep inside the forward pass."""
    if any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()
           for m in module.modules()):
        return  # a forward pass would initialise the caller's lazy layers
    entered = []  # the weighted layers in the order they are called

    def pre_hook(mod, inputs):
        shape = inputs[0].shape if inputs and isinstance(inputs[0], torch.Tensor) else None
        entered.append((mod, None if shape is None else tuple(shape[1:])))

    names = {id(m): n for n, m in module.named_modules()}
    handles = [m.register_forward_pre_hook(pre_hook) for m in module.modules()
               if isinstance(m, _WEIGHTED)]
    try:
        with preserve_mode(module, train=False), torch.no_grad():
            module(xb.to(module_device(module)))
    except (RuntimeError, ValueError, TypeError) as exc:
        got = tuple(xb.shape[1:])
        if not entered:
            raise ValueError(
                f"The network cannot take {name} with per-sample shape {got}: {exc}") from exc
        layer, seen = entered[-1]
        if len(entered) > 1:
            raise ValueError(
                f"{name} has per-sample shape {got}, but the network cannot take it: layer "
                f"{names.get(id(layer), '?')!r} ({layer}) fails on its input of per-sample "
                f"shape {seen}; the network was probably built for another input size.") from exc
        where = f"its first layer {names.get(id(layer), '?')!r} ({layer})"
        if isinstance(layer, nn.Linear):
            want = f"{layer.in_features} features per sample (n_samples, {layer.in_features})"
        else:
            dims = {nn.Conv1d: "L", nn.Conv2d: "H, W", nn.Conv3d: "D, H, W"}[type(layer)]
            want = f"shape (n_samples, {layer.in_channels}, {dims})"
        raise ValueError(
            f"{name} has per-sample shape {got}, but the network cannot take it: {where} expects "
            f"{want}.") from exc
    finally:
        for h in handles:
            h.remove()


def layer_gradients(net, X, layer, target, batch_size, caller):
    """Per batch, the activation ``a`` at ``layer`` and ``g = d f_target / d a`` (both detached,
    shape ``(B, ...)``), with the network in eval mode on the device of its parameters.

    ``net``: a module, skorch net or fitted estimator with a ``module_``. ``target`` as in
    :func:`skdebias.metrics.concept_sensitivity` (``None``: the predicted class); ``caller``
    names the public function in the empty-input error. Shared by that function and
    :func:`skdebias.concepts.tcav_score`.
    """
    X, _ = check_input(X)
    module = get_module(network(net))
    layer_module = find_layer(module, layer)
    device = module_device(module)
    n = n_samples(X)
    if n == 0:
        raise ValueError(f"X is empty: {caller} needs at least one sample.")
    target = check_target(target, n)
    check_network_input(module, first_batch(X), "X")
    start = 0
    with preserve_mode(module, train=False):
        for xb in iter_batches(X, batch_size=batch_size, device=device):
            with torch.enable_grad(), capture_output(layer_module, detach=False,
                                                     requires_grad=True) as store:
                out = module(xb)
            if not store:
                raise ValueError(f"Layer {layer!r} is not called in the forward pass.")
            if isinstance(out, (tuple, list)):
                out = out[0]
            a = store[-1]
            if target is None:
                t = out.detach().argmax(dim=1)
            elif np.ndim(target) == 0:
                t = torch.full((xb.shape[0],), int(target), dtype=torch.long, device=out.device)
            else:
                t = torch.as_tensor(target[start:start + xb.shape[0]], dtype=torch.long,
                                    device=out.device)
            if int(t.min()) < 0 or int(t.max()) >= out.shape[1]:
                raise ValueError(f"target must hold class indices in [0, {out.shape[1] - 1}].")
            (g,) = torch.autograd.grad(out.gather(1, t[:, None]).sum(), a)
            yield a.detach(), g.detach()
            start += xb.shape[0]
