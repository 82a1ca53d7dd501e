"""Tiny networks, data and helpers shared by several test modules (kept out of conftest so
tests can import them)."""

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


class AnyWidth(nn.Module):
    """Tiny network for any number of input features: two summary statistics -> hidden -> 3 logits.

    Used where sklearn's generic checks feed 2-d tabular data of arbitrary width.
    """

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Linear(2, 4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x):
        x = x.flatten(1)
        stats = torch.stack([x.mean(1), (x * x).mean(1)], dim=1)
        return self.head(self.act(self.body(stats)))


class MLP(nn.Module):
    """Tabular classifier with a bottleneck: ``body`` (Linear + ReLU) then the linear ``head``."""

    def __init__(self, n_in=6, n_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(n_in, 16), nn.ReLU())
        self.head = nn.Linear(16, n_classes)

    def forward(self, X):
        return self.head(self.body(X))


class BNNet(nn.Module):
    """4 features -> Linear, BatchNorm, ReLU (``body``) -> Linear, ReLU, Linear (``head``):
    3 logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.body(x))


def blobs(n=90, seed=0):
    """``(X, y, concept_labels)`` for :class:`BNNet`: three classes; the concept shifts
    feature 3."""
    rng = np.random.RandomState(seed)
    y = np.arange(n) % 3
    X = (rng.randn(n, 4) + 2 * np.eye(4)[y]).astype(np.float32)
    c = (rng.rand(n) < 0.5).astype(int)
    X[c == 1, 3] += 3.0
    return X, y, c


def state_copy(module):
    """A detached copy of ``module``'s state dict, to compare before and after a fit."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


#: A concept vector for the 4 channels of layer "1" of :func:`inplace_net`.
INPLACE_CAV = [1.0, -1.0, 0.5, 0.2]


def inplace_net(inplace_after=False, inplace_first=False, seed=0):
    """(n, 1, 8, 8) -> ReLU, Conv2d (layer "1"), ReLU, Linear -> 3 logits, with the ReLUs
    optionally in place (as in VGG and ResNet)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.ReLU(inplace=inplace_first), nn.Conv2d(1, 4, 3),
                         nn.ReLU(inplace=inplace_after), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


class FlipLastFeature:
    """Counterfactual for tabular data: the sign of the last feature flipped.

    A class with a fixed repr, so the sklearn-check test ids are the same in every process
    (pytest-xdist workers must collect identical ids; a function's repr holds its address).
    """

    def __call__(self, X):
        X_cf = np.array(X, dtype=np.float32, copy=True)
        X_cf[:, -1] *= -1
        return X_cf

    def __repr__(self):
        return "flip_last_feature"


flip_last_feature = FlipLastFeature()


def make_end(**kw):
    """An :class:`~skdebias.correction.EnDClassifier` on :class:`MLP` (Adam, 3 epochs, CPU)."""
    from skdebias.correction import EnDClassifier

    params = dict(module=MLP, optimizer=torch.optim.Adam, lr=1e-2, max_epochs=3, batch_size=32,
                  train_split=None, verbose=0, device="cpu")
    params.update(kw)
    return EnDClassifier(**params)


class ViewNet(nn.Module):
    """Calls ``.view`` on a convolution output: fails on channels_last activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        h = self.conv(x)
        return self.head(h.view(h.shape[0], -1))


class WeightCasts(TorchDispatchMode):
    """Counts the float32 -> bfloat16 copies of tensors that require grad (autocast's
    casts of the weights)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 \
                and args[0].dtype == torch.float32 and args[0].requires_grad:
            self.n += 1
        return func(*args, **kwargs)
