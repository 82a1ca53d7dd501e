"""Input attributions: zennit LRP composites, with gradient x input as fallback."""

from __future__ import annotations

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


def resolve_composite(composite, canonizers=None):
    """A zennit composite instance from a name, class or instance.

    Names may be zennit's registry names (``"epsilon_plus_flat"``) or class
    names (``"EpsilonPlusFlat"``). A name or class is built with
    ``canonizers`` (a list of zennit canonizers, or None); an instance is
    returned as it is, with its own canonizers.
    """
    from zennit import composites as zc

    if isinstance(composite, zc.Composite):
        return composite
    if isinstance(composite, type) and issubclass(composite, zc.Composite):
        return composite(canonizers=canonizers)
    if isinstance(composite, str):
        if composite in zc.COMPOSITES:
            return zc.COMPOSITES[composite](canonizers=canonizers)
        by_class = {cls.__name__: cls for cls in zc.COMPOSITES.values()}
        if composite in by_class:
            return by_class[composite](canonizers=canonizers)
        raise ValueError(
            f"Unknown zennit composite {composite!r}; choose one of "
            f"{sorted(by_class)} or {sorted(zc.COMPOSITES)}."
        )
    raise ValueError(f"composite must be a name, a zennit Composite class or instance; got {composite!r}.")


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
        is (with the canonizers it was built with, if any).
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
        comp = resolve_composite(composite, canonizers=canonizers)
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
