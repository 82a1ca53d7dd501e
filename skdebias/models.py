"""Small networks that train in seconds, and skorch wrappers with sensible defaults."""

from __future__ import annotations

import torch
from torch import nn

from ._torch import resolve_device

__all__ = ["SmallCNN", "make_classifier", "torchvision_model"]


class SmallCNN(nn.Module):
    """A three-block CNN with named layers, for 3-channel images of 28 px or more.

    Layers (names usable as ``layer=`` everywhere in skdebias)::

        features.0 conv(in, w)    features.1 ReLU   features.2 MaxPool
        features.3 conv(w, 2w)    features.4 ReLU   features.5 MaxPool
        features.6 conv(2w, 4w)   features.7 ReLU
        pool       global max pool + flatten  -> (B, 4w)
        classifier.0 Linear(4w, hidden)  classifier.1 ReLU  (penultimate features)
        classifier.2 Linear(hidden, n_classes)              (the head)

    Parameters
    ----------
    n_classes : int, default=10
    in_channels : int, default=3
    width : int, default=16
    hidden : int, default=64

    Examples
    --------
    >>> import torch
    >>> from skdebias.models import SmallCNN
    >>> SmallCNN()(torch.zeros(2, 3, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, n_classes=10, in_channels=3, width=16, hidden=64):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(4 * w, hidden), nn.ReLU(), nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


def make_classifier(module, *, max_epochs=10, lr=1e-3, batch_size=64,
                    optimizer=torch.optim.Adam, device="auto", train_split=None,
                    random_state=None, **kwargs):
    """Wrap ``module`` in a skorch ``NeuralNetClassifier`` with sensible defaults.

    Parameters
    ----------
    module : torch.nn.Module class or instance
    max_epochs, lr, batch_size : training settings
    optimizer : torch optimiser class, default Adam
    device : "auto" (CUDA if available), "cpu", "cuda", ...
    train_split : skorch split or None (default: train on all data)
    random_state : int or None
        Seeds torch before the module is initialised, for reproducible weights.
    **kwargs : passed to ``NeuralNetClassifier`` (e.g. ``module__n_classes=2``,
        ``callbacks=[...]``, ``verbose=0``).

    Returns
    -------
    skorch.NeuralNetClassifier

    Examples
    --------
    >>> from skdebias.models import SmallCNN, make_classifier
    >>> net = make_classifier(SmallCNN, max_epochs=1, verbose=0)
    >>> type(net).__name__
    'NeuralNetClassifier'
    """
    from skorch import NeuralNetClassifier

    if random_state is not None:
        torch.manual_seed(int(random_state))
    kwargs.setdefault("verbose", 0)
    kwargs.setdefault("iterator_train__shuffle", True)
    return NeuralNetClassifier(
        module,
        criterion=nn.CrossEntropyLoss,
        optimizer=optimizer,
        lr=lr,
        max_epochs=max_epochs,
        batch_size=batch_size,
        device=str(resolve_device(device)),
        train_split=train_split,
        **kwargs,
    )


def torchvision_model(name, num_classes=10, weights=None, **kwargs):
    """Build a torchvision architecture by name (``"resnet18"``, ``"vgg11"``, ...).

    ``weights=None`` gives random weights; named weights are loaded through
    torchvision (which may need a download).

    Raises
    ------
    ValueError
        If ``name`` is not a torchvision classification model.
    """
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=5)
        raise ValueError(f"Unknown torchvision model {name!r}. Closest: {close}.")
    return torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)
