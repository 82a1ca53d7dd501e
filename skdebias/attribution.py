"""Input attributions: zennit LRP composites, with gradient x input as fallback."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import torch

from ._utils._data import check_input, first_batch, iter_batches, n_samples
from ._utils._hooks import check_network_input
from ._utils._modules import copy_module, get_module, n_outputs, network, preserve_mode
from ._utils._runtime import autocast, check_precision, progress_bar, resolve_device
from ._utils._validation import check_target

__all__ = ["attribute", "ATTRIBUTION_METHODS", "resolve_composite"]

ATTRIBUTION_METHODS = ("lrp", "gradient_x_input", "gradient")


_BOUNDS = ("low", "high")


def _composite_class(composite):
    """The zennit composite class named or given by ``composite`` (None for an instance)."""
    from zennit import composites as zc

    if isinstance(composite, zc.Composite):
        return None
    if isinstance(composite, type) and issubclass(composite, zc.Composite):
        return composite
    if isinstance(composite, str):
        if composite in zc.COMPOSITES:
            return zc.COMPOSITES[composite]
        by_class = {cls.__name__: cls for cls in zc.COMPOSITES.values()}
        if composite in by_class:
            return by_class[composite]
        raise ValueError(
            f"Unknown zennit composite {composite!r}; choose one of "
            f"{sorted(by_class)} or {sorted(zc.COMPOSITES)}."
        )
    raise ValueError(f"composite must be a name, a zennit Composite class or instance; "
                     f"got {composite!r}.")


def _needs_bounds(composite):
    """Whether the zennit composite ``composite`` (name or class) needs the input's bounds.

    Composites with a box rule for the first layer (``EpsilonGammaBox``) take
    the lowest and highest input values (``low``, ``high``).
    """
    cls = _composite_class(composite)
    if cls is None:
        return False
    params = inspect.signature(cls.__init__).parameters
    return all(name in params and params[name].default is inspect.Parameter.empty
               for name in _BOUNDS)


def resolve_composite(composite, canonizers=None, bounds=None):
    """A zennit composite instance from a name, class or instance.

    Names may be zennit's registry names (``"epsilon_plus_flat"``) or class
    names (``"EpsilonPlusFlat"``). A name or class is built with
    ``canonizers`` (a list of zennit canonizers, or None) and, for a composite
    with a box rule (``EpsilonGammaBox``), with ``bounds=(low, high)``: the
    lowest and highest input values (floats, or tensors that broadcast against
    the input). An instance is returned as it is, with its own canonizers.
    """
    cls = _composite_class(composite)
    if cls is None:
        return composite
    if not _needs_bounds(cls):
        return cls(canonizers=canonizers)
    if bounds is None:
        raise ValueError(
            f"The zennit composite {cls.__name__} needs the lowest and highest input values "
            f"(its first layer uses the box rule); pass bounds=(low, high), or pass an "
            f"instance such as {cls.__name__}(low=0.0, high=1.0).")
    low, high = bounds
    return cls(low=low, high=high, canonizers=canonizers)


def _input_bounds(X, batch_size=128, device=None):
    """Per-channel lowest and highest values of ``X``, shaped ``(1, C, 1, 1)``.

    One pass over ``X`` in batches, so the memory used is bounded by a batch;
    for 2-d input ``(n, n_features)`` the bounds are per feature, ``(1, n_features)``.
    """
    low = high = None
    for xb in iter_batches(X, batch_size=batch_size, device=device):
        dims = [0] + list(range(2, xb.ndim))
        lo = xb.amin(dim=dims, keepdim=True)
        hi = xb.amax(dim=dims, keepdim=True)
        low = lo if low is None else torch.minimum(low, lo)
        high = hi if high is None else torch.maximum(high, hi)
    return low, high


def _auto_canonizers(module):
    """zennit canonizers for ``module``: the ones its authors name for the architecture.

    Without them LRP treats BatchNorm as a layer of its own and the skip additions of a
    ResNet as plain gradient flow, and the relevance no longer sums to the explained
    output's (on a random-weight resnet18 ~200x the one-hot; with ``ResNetCanonizer`` ~0.8).
    """
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.core import collect_leaves
    from zennit.torchvision import ResNetCanonizer, VGGCanonizer
    from zennit.types import BatchNorm

    # by block class, so that a ResNet wrapped in another module (normaliser first) counts too
    from torchvision.models.resnet import BasicBlock, Bottleneck
    from torchvision.models.vgg import VGG

    modules = list(module.modules())
    if any(isinstance(m, (BasicBlock, Bottleneck)) for m in modules):
        return [ResNetCanonizer()]
    if not any(isinstance(m, BatchNorm) for m in modules):
        return []
    if any(isinstance(m, VGG) for m in modules):
        return [VGGCanonizer()]
    # zennit merges a BatchNorm only into a Linear/Conv leaf right before it (in module order)
    leaves = list(collect_leaves(module))
    linear = SequentialMergeBatchNorm.linear_type
    if any(isinstance(a, linear) and isinstance(b, BatchNorm) for a, b in zip(leaves, leaves[1:])):
        return [SequentialMergeBatchNorm()]
    return []


def _check_canonizers(canonizers, composite):
    from zennit.canonizers import Canonizer
    from zennit.composites import Composite

    if isinstance(canonizers, str) and canonizers == "auto":
        return canonizers
    if canonizers is None:
        return []
    if isinstance(canonizers, Canonizer):
        canonizers = [canonizers]
    if not isinstance(canonizers, (list, tuple)) or \
            not all(isinstance(c, Canonizer) for c in canonizers):
        raise ValueError(f"canonizers must be 'auto', None or a list of zennit canonizer "
                         f"instances, got {canonizers!r}.")
    if isinstance(composite, Composite):
        raise ValueError("canonizers cannot be combined with a composite instance; pass them "
                         "to the composite (canonizers=[...]) or pass its name or class.")
    return list(canonizers)


def _targets(module, xb, target, start):
    if target is None:
        with torch.no_grad():
            return module(xb.clone()).argmax(dim=1)  # a copy: an in-place first layer keeps xb
    if np.ndim(target) == 0:
        return torch.full((xb.shape[0],), int(target), dtype=torch.long, device=xb.device)
    return torch.as_tensor(np.asarray(target)[start:start + xb.shape[0]], dtype=torch.long,
                           device=xb.device)


def _gradient_batch(module, xb, tb, times_input):
    xb = xb.detach().clone().requires_grad_(True)
    out = module(xb.clone())  # the leaf stays intact under an in-place first layer
    sel = out.gather(1, tb[:, None]).sum()
    (grad,) = torch.autograd.grad(sel, xb)
    return grad * xb.detach() if times_input else grad


def _lrp_batch(module, xb, tb, composite):
    from zennit.attribution import Gradient

    with torch.no_grad():
        n_out = module(xb[:1]).shape[1]
    onehot = torch.eye(n_out, device=xb.device)[tb]
    with Gradient(model=module, composite=composite) as attributor:
        _, relevance = attributor(xb.clone().requires_grad_(True), onehot)
    return relevance


def attribute(estimator, X, target=None, method="lrp", composite="EpsilonPlusFlat",
              batch_size=64, device="auto", reduce_channels=True, verbose=0, canonizers="auto",
              precision="float32"):
    """Attribution maps of a classifier's output for ``X``.

    Parameters
    ----------
    estimator : torch.nn.Module, skorch NeuralNet or fitted corrector
        Never modified: attributions run on a copy (zennit registers hooks). A
        fitted corrector is explained through its corrected network ``module_``.
    X : array-like (n, C, H, W), tensor or Dataset
    target : None, int or array of shape (n,)
        Output class to explain; ``None`` explains the predicted class.
    method : {"lrp", "gradient_x_input", "gradient"}, default="lrp"
        ``"lrp"`` uses the zennit ``composite``; if zennit cannot handle the
        network it falls back to gradient x input with a warning.
    composite : str, zennit Composite class or instance, default="EpsilonPlusFlat"
        A name or class is built with ``canonizers``; an instance is used as it
        is (with the canonizers it was built with, if any). A composite with a
        box rule for the first layer (``"EpsilonGammaBox"``) given by name or
        class gets the lowest and highest value of each input channel over
        ``X`` as its bounds; pass an instance to set
        them yourself, e.g. ``EpsilonGammaBox(low=0.0, high=1.0)`` for images
        in [0, 1].
    batch_size : int, default=64
    device : str, default="auto"
    reduce_channels : bool, default=True
        Sum relevance over channels, returning ``(n, H, W)``.
    verbose : int, default=0
        0: silent; 1 or more: progress bars over the long steps (tqdm).
    canonizers : "auto", None or list of zennit canonizers, default="auto"
        Canonizers for ``"lrp"``, applied to the copy of the network and removed
        after. ``"auto"`` picks what zennit's authors use for the architecture:
        ``ResNetCanonizer`` for torchvision ResNets (any module holding
        torchvision ``BasicBlock``/``Bottleneck`` blocks), ``VGGCanonizer`` for
        torchvision VGGs with BatchNorm, ``SequentialMergeBatchNorm`` for other
        networks with a BatchNorm right after a Linear/Conv layer, none
        otherwise. Without them LRP relevance on BatchNorm networks does not
        sum to the explained output's. ``None`` applies none. Not allowed with a
        composite instance (give the canonizers to the composite).
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        Arithmetic of the forward and backward passes (torch autocast); ``"float16"`` needs
        CUDA. The maps are returned in float32.

    Returns
    -------
    R : ndarray, float32, of shape (n, H, W) or (n, C, H, W)

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.models import SmallCNN
    >>> from skdebias.attribution import attribute
    >>> R = attribute(SmallCNN(), np.random.rand(2, 3, 28, 28).astype("float32"), device="cpu")
    >>> R.shape
    (2, 28, 28)
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"method={method!r} is not valid; choose one of {ATTRIBUTION_METHODS}.")
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    X, _ = check_input(X)
    n = n_samples(X)
    target = check_target(target, n)
    dev = resolve_device(device)
    check_precision(precision, dev)
    module = copy_module(get_module(network(estimator))).to(dev)
    for p in module.parameters():
        p.requires_grad_(False)
    xb = first_batch(X)
    check_network_input(module, xb, "X")
    if target is not None:
        k = n_outputs(module, xb.to(dev))
        bad = np.unique(np.atleast_1d(target)[(np.atleast_1d(target) < 0)
                                              | (np.atleast_1d(target) >= k)])
        if len(bad):
            raise ValueError(f"target must hold class indices in [0, {k - 1}] (the network's "
                             f"outputs), got {bad[:10].tolist()}.")
    canonizers = _check_canonizers(canonizers, composite)
    comp = None
    if method == "lrp":
        if isinstance(canonizers, str):  # "auto"
            canonizers = _auto_canonizers(module)
        bounds = _input_bounds(X, batch_size, dev) if _needs_bounds(composite) else None
        comp = resolve_composite(composite, canonizers=canonizers, bounds=bounds)
    out = None
    start = 0
    with preserve_mode(module, train=False):
        batches = iter_batches(X, batch_size=batch_size, device=dev)
        for xb in progress_bar(batches, verbose, total=-(-n // batch_size), desc="attribution"):
            with autocast(precision, dev):
                tb = _targets(module, xb, target, start)
                if method == "lrp":
                    try:
                        R = _lrp_batch(module, xb, tb, comp)
                    except Exception as exc:  # zennit cannot handle some layers
                        warnings.warn(
                            f"zennit LRP failed ({exc!r}); falling back to gradient x input.",
                            RuntimeWarning, stacklevel=2,
                        )
                        method = "gradient_x_input"
                        R = _gradient_batch(module, xb, tb, True)
                else:
                    R = _gradient_batch(module, xb, tb, method == "gradient_x_input")
            R = R.float()
            R = R.sum(dim=1) if reduce_channels else R
            if out is None:
                out = np.empty((n, *R.shape[1:]), dtype=np.float32)
            out[start:start + R.shape[0]] = R.detach().cpu().numpy()
            start += R.shape[0]
    return out
