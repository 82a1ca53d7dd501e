"""Small networks that train in seconds, and skorch wrappers with sensible defaults."""

from __future__ import annotations

import torch
from skorch import NeuralNetClassifier
from torch import nn

from ._utils._modules import last_linear, replace_module
from ._utils._runtime import resolve_device

__all__ = ["SmallCNN", "SeededNeuralNetClassifier", "make_classifier", "torchvision_model"]


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


class SeededNeuralNetClassifier(NeuralNetClassifier):
    """A skorch ``NeuralNetClassifier`` with a ``random_state`` parameter.

    With an int ``random_state``, :meth:`initialize` (run by every ``fit`` that
    does not warm-start) first seeds torch's global RNG with it, so the initial
    weights and the shuffling of the training batches are the same for every
    fit, for pickled copies and for ``sklearn.base.clone`` (e.g. inside
    ``GridSearchCV``). ``None`` leaves torch's RNG alone. Everything else is
    skorch's ``NeuralNetClassifier``; :func:`make_classifier` builds one.

    Parameters
    ----------
    module : torch.nn.Module class or instance
        As in skorch.
    random_state : int or None, default=None
        Seed of torch's RNG at every initialisation.
    *args, **kwargs
        skorch's ``NeuralNetClassifier`` arguments.
    """

    def __init__(self, module, *args, random_state=None, **kwargs):
        super().__init__(module, *args, **kwargs)
        self.random_state = random_state

    def initialize(self):
        if self.random_state is not None:
            torch.manual_seed(int(self.random_state))
        return super().initialize()


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
        Seeds torch whenever the net is initialised (each ``fit``), for
        reproducible weights and batch order, also in clones; see
        :class:`SeededNeuralNetClassifier`.
    **kwargs : passed to ``NeuralNetClassifier`` (e.g. ``module__n_classes=2``,
        ``callbacks=[...]``, ``verbose=0``, ``criterion=...``; the default
        criterion is ``CrossEntropyLoss``, so the module outputs logits).

    Returns
    -------
    SeededNeuralNetClassifier
        A skorch ``NeuralNetClassifier``.

    Examples
    --------
    >>> from skdebias.models import SmallCNN, make_classifier
    >>> net = make_classifier(SmallCNN, max_epochs=1, random_state=0)
    >>> type(net).__name__, net.random_state
    ('SeededNeuralNetClassifier', 0)
    """
    kwargs.setdefault("verbose", 0)
    kwargs.setdefault("iterator_train__shuffle", True)
    kwargs.setdefault("criterion", nn.CrossEntropyLoss)
    return SeededNeuralNetClassifier(
        module,
        random_state=random_state,
        optimizer=optimizer,
        lr=lr,
        max_epochs=max_epochs,
        batch_size=batch_size,
        device=str(resolve_device(device)),
        train_split=train_split,
        **kwargs,
    )


def torchvision_model(name, num_classes=None, weights=None, **kwargs):
    """Build a torchvision classification architecture by name (``"resnet18"``, ``"vgg11"``, ...).

    Parameters
    ----------
    name : str
        A torchvision classification model (``torchvision.models.list_models``).
    num_classes : int or None, default=None
        Outputs of the network. ``None``: 10 without weights (the built-in
        digits), the weights' classes (1000 for ImageNet) with weights. With
        weights and another number, the pretrained network's last
        :class:`torch.nn.Linear` layer is replaced by a new one with
        ``num_classes`` outputs (initialised from torch's RNG), ready for
        fine-tuning.
    weights : None, str or torchvision ``WeightsEnum``, default=None
        ``None`` gives random weights. Named weights (``"DEFAULT"``,
        ``"IMAGENET1K_V1"``, ``"ResNet18_Weights.IMAGENET1K_V1"`` or the enum)
        are read from the torch hub cache only: skdebias never downloads, and a
        missing file raises ``FileNotFoundError`` naming where to put it.
    **kwargs
        Passed to ``torchvision.models.get_model``.

    Returns
    -------
    torch.nn.Module

    Raises
    ------
    ValueError
        If ``name`` is not a torchvision classification model, or ``weights``
        is not one of its weights.
    FileNotFoundError
        If the weights file is not in the torch hub cache.

    Examples
    --------
    >>> from skdebias.models import torchvision_model
    >>> torchvision_model("resnet18").fc.out_features
    10
    """
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=5)
        raise ValueError(f"Unknown torchvision model {name!r}. Closest: {close}.")
    if weights is None:
        return torchvision.models.get_model(
            name, weights=None, num_classes=10 if num_classes is None else num_classes, **kwargs)
    w = _cached_weights(name, weights)
    model = torchvision.models.get_model(name, weights=w, **kwargs)
    n_out = len(w.meta.get("categories") or []) or None
    if num_classes is not None and num_classes != n_out:
        head = last_linear(model, "num_classes")
        old = model.get_submodule(head)
        replace_module(model, head, nn.Linear(old.in_features, int(num_classes),
                                              bias=old.bias is not None))
    return model


def _cached_weights(name, weights):
    """The torchvision weights enum member for ``weights``, after checking its file is cached."""
    import os
    from urllib.parse import urlparse

    import torchvision

    enum = torchvision.models.get_model_weights(name)
    if isinstance(weights, str):
        key = weights.split(".")[-1]
        if key not in enum.__members__:
            raise ValueError(
                f"weights={weights!r} is not a weight of {name!r}; choose one of "
                f"{list(enum.__members__)}.")
        weights = enum[key]
    elif not isinstance(weights, enum):
        raise ValueError(f"weights={weights!r} is not a member of {enum.__name__}.")
    path = os.path.join(torch.hub.get_dir(), "checkpoints",
                        os.path.basename(urlparse(weights.url).path))
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"The weights {weights} of {name!r} are not in the torch hub cache ({path}); "
            "skdebias never downloads. Copy the file there from a machine that has it, "
            "or use weights=None.")
    return weights
