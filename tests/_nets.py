"""Tiny networks shared by the tests (kept out of conftest so tests can import them)."""

import torch
from torch import nn


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
