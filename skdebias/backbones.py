"""Pretrained backbones: frozen features that encode the core and the spurious cue.

Spuriosity rankings (Moayeri et al., 2023) and head-only corrections work on the features
of a *pretrained* network, whose features hold both the object and its background
(as ImageNet features do). A network trained from scratch on biased data often
holds the spurious cue alone. This module builds the pretrained setting on small
data:

1. :func:`pretrain_backbone` trains a feature extractor with two heads, one for
   the class and one for the bias attribute (e.g. the colour), on images where the
   two are independent (e.g. ``load_biased_mnist(pretrain_size=...)``'s
   ``X_pretrain``), and returns it frozen: its features encode both.
2. :class:`LinearProbe` puts a trainable :class:`torch.nn.Linear` head on the
   frozen backbone; train it on the biased data with
   :func:`~skdebias.models.make_classifier` (or any skorch net). The head layer is
   named ``"head"``, its input (the backbone features) is the output of
   ``"backbone"``: the layers :class:`~skdebias.SpuriosityRanker`,
   :class:`~skdebias.ActivationExtractor` and
   :class:`~skdebias.correction.SpuriosityHeadFinetuner` are given.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ._utils._data import as_float32, iter_batches, n_samples
from ._utils._modules import conv_blocks
from ._utils._runtime import resolve_device, set_seed
from ._utils._validation import check_int, check_labels, check_real

__all__ = ["FrozenBackbone", "LinearProbe", "make_backbone", "pretrain_backbone"]


def make_backbone(n_features=64, in_channels=3, width=16):
    """The default backbone: the layers of :class:`~skdebias.models.SmallCNN` up to its
    penultimate features.

    Three 3x3 convolutions (``width``, ``2 width``, ``4 width`` channels, ReLU,
    two max-poolings), a global max pool, ``Linear(4 width, n_features)`` and a ReLU.

    Parameters
    ----------
    n_features : int, default=64
        Output features per image.
    in_channels : int, default=3
        Channels of the input images.
    width : int, default=16
        Channels of the first convolution.

    Returns
    -------
    torch.nn.Sequential
        Maps ``(B, in_channels, H, W)`` to ``(B, n_features)``.

    Examples
    --------
    >>> import torch
    >>> from skdebias.backbones import make_backbone
    >>> make_backbone(n_features=32)(torch.zeros(2, 3, 28, 28)).shape
    torch.Size([2, 32])
    """
    n_features = check_int("n_features", n_features)
    in_channels = check_int("in_channels", in_channels)
    w = check_int("width", width)
    return nn.Sequential(
        *conv_blocks(in_channels, w), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(4 * w, n_features), nn.ReLU(),
    )


class FrozenBackbone(nn.Module):
    """A feature extractor whose parameters never train and which always runs in eval mode.

    ``forward`` returns the module's output flattened to ``(B, n_features)``.
    Gradients still flow to the input (attributions work); the parameters have
    ``requires_grad=False`` and ``train()`` leaves the wrapped module in eval mode
    (BatchNorm statistics and dropout stay as pretrained).

    Parameters
    ----------
    module : torch.nn.Module
        The trained feature extractor.
    n_features : int
        Size of its (flattened) output.

    Examples
    --------
    >>> import torch
    >>> from skdebias.backbones import FrozenBackbone, make_backbone
    >>> frozen = FrozenBackbone(make_backbone(n_features=8), n_features=8)
    >>> frozen.train().module.training, any(p.requires_grad for p in frozen.parameters())
    (False, False)
    """

    def __init__(self, module, n_features):
        super().__init__()
        self.module = module
        self.n_features = check_int("n_features", n_features)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.module.eval()

    def train(self, mode=True):
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, x):
        return self.module(x).flatten(1)


class LinearProbe(nn.Module):
    """A frozen backbone and a trainable linear head: ``head(backbone(x))``.

    Layers: ``"backbone"`` (a :class:`FrozenBackbone`; its output is the input of
    the head) and ``"head"`` (:class:`torch.nn.Linear`, logits).

    Parameters
    ----------
    backbone : FrozenBackbone
        From :func:`pretrain_backbone` (or wrap any module in :class:`FrozenBackbone`).
    n_classes : int, default=10
        Outputs of the head.

    Examples
    --------
    >>> import torch
    >>> from skdebias.backbones import FrozenBackbone, LinearProbe, make_backbone
    >>> probe = LinearProbe(FrozenBackbone(make_backbone(n_features=8), 8), n_classes=3)
    >>> probe(torch.zeros(2, 3, 28, 28)).shape
    torch.Size([2, 3])
    >>> [name for name, p in probe.named_parameters() if p.requires_grad]
    ['head.weight', 'head.bias']
    """

    def __init__(self, backbone, n_classes=10):
        super().__init__()
        if not isinstance(backbone, FrozenBackbone):
            raise TypeError(
                f"backbone must be a FrozenBackbone (from pretrain_backbone, or "
                f"FrozenBackbone(module, n_features)), got {type(backbone).__name__}.")
        self.backbone = backbone
        self.head = nn.Linear(backbone.n_features, check_int("n_classes", n_classes))

    def forward(self, x):
        return self.head(self.backbone(x))


def _encode(labels, name, n):
    labels = check_labels(labels, n, name=name)
    classes, codes = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"{name} must hold at least two distinct values, got {classes.tolist()}.")
    return classes, codes.astype(np.int64)


def pretrain_backbone(X, y, bias, *, backbone=None, bias_weight=1.0, max_epochs=10, lr=2e-3,
                      batch_size=64, device="cpu", random_state=None):
    """Train a backbone with a class head and a bias head; return it frozen.

    The loss of every batch is ``CE(class head) + bias_weight * CE(bias head)``
    (Adam), both heads linear on the backbone features. Trained on images where
    class and bias attribute are independent (e.g. digits coloured at random), the
    features encode both, as the features of a network pretrained on a large
    dataset encode objects and backgrounds. Use data disjoint from the biased
    training data of the head (``load_biased_mnist(pretrain_size=...)`` gives
    such a split).

    Parameters
    ----------
    X : array-like or tensor of shape (n, C, H, W)
        Pretraining images.
    y : array-like of shape (n,)
        Class labels.
    bias : array-like of shape (n,)
        Bias-attribute labels (e.g. colour index).
    backbone : torch.nn.Module or None, default=None
        Maps images to features (any output shape; flattened). ``None``:
        :func:`make_backbone` with ``C`` input channels. The module is trained
        in place and then wrapped.
    bias_weight : float >= 0, default=1.0
        Weight of the bias head's loss (0: a plain classifier's features).
    max_epochs : int, default=10
        Passes over ``X``.
    lr : float > 0, default=2e-3
        Adam learning rate.
    batch_size : int, default=64
    device : str or torch.device, default="cpu"
        ``"auto"`` picks CUDA when available.
    random_state : int or None, default=None
        Seeds the weights of the default backbone and heads and the batch order.

    Returns
    -------
    backbone : FrozenBackbone
        On the CPU, parameters frozen, eval mode. Attributes ``classes_``,
        ``bias_classes_``, ``class_accuracy_`` and ``bias_accuracy_`` (training
        accuracies of the two heads in the last epoch) are set on it.

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.backbones import pretrain_backbone
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(64, 3, 12, 12).astype("float32")
    >>> y, colour = np.arange(64) % 2, (np.arange(64) // 2) % 2
    >>> frozen = pretrain_backbone(X, y, colour, max_epochs=1, random_state=0)
    >>> frozen.n_features, frozen.bias_classes_.tolist()
    (64, [0, 1])
    """
    X = as_float32(X)
    n = n_samples(X)
    if getattr(X, "ndim", None) != 4:
        raise ValueError(f"X must be an array or tensor of images (n, C, H, W), got "
                         f"{getattr(X, 'shape', type(X).__name__)}.")
    classes, y_codes = _encode(y, "y", n)
    bias_classes, b_codes = _encode(bias, "bias", n)
    bias_weight = check_real("bias_weight", bias_weight, low=0)
    max_epochs = check_int("max_epochs", max_epochs)
    lr = check_real("lr", lr, low=0, low_open=True)
    batch_size = check_int("batch_size", batch_size)
    dev = resolve_device(device)
    gen = set_seed(random_state)
    module = make_backbone(in_channels=int(X.shape[1])) if backbone is None else backbone
    if not isinstance(module, nn.Module):
        raise TypeError(f"backbone must be a torch.nn.Module or None, got {type(module).__name__}.")
    module = module.to(dev).train()
    with torch.no_grad():
        n_features = int(module(next(iter_batches(X, 2, device=dev))).flatten(1).shape[1])
    class_head = nn.Linear(n_features, len(classes)).to(dev)
    bias_head = nn.Linear(n_features, len(bias_classes)).to(dev)
    params = [*module.parameters(), *class_head.parameters(), *bias_head.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    targets = torch.as_tensor(np.stack([y_codes, b_codes], axis=1))
    for _ in range(max_epochs):
        order = torch.randperm(n, generator=gen).numpy()
        hits = np.zeros(2)
        for xb, tb in iter_batches(X, batch_size, y=targets, device=dev, indices=order):
            feats = module(xb).flatten(1)
            out_y, out_b = class_head(feats), bias_head(feats)
            loss = nn.functional.cross_entropy(out_y, tb[:, 0]) + \
                bias_weight * nn.functional.cross_entropy(out_b, tb[:, 1])
            opt.zero_grad()
            loss.backward()
            opt.step()
            hits += [float((out_y.argmax(1) == tb[:, 0]).sum()),
                     float((out_b.argmax(1) == tb[:, 1]).sum())]
        if not np.isfinite(float(loss.detach())):
            raise FloatingPointError(
                f"pretraining diverged (loss {float(loss.detach())}); lower lr (got {lr}).")
    frozen = FrozenBackbone(module.cpu(), n_features)
    frozen.classes_, frozen.bias_classes_ = classes, bias_classes
    frozen.class_accuracy_, frozen.bias_accuracy_ = hits / n
    return frozen
