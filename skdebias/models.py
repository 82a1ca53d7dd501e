"""Small networks that train in seconds, and skorch wrappers with sensible defaults."""

from __future__ import annotations

import torch
from skorch import NeuralNetClassifier
from torch import nn

from ._utils._modules import conv_blocks, last_linear, replace_module
from ._utils._runtime import resolve_device

__all__ = ["SmallCNN", "VGGStyleCNN", "SmallResNet", "GAPCNN", "ZOO", "make_zoo_model",
           "SeededNeuralNetClassifier", "make_classifier", "torchvision_model"]


class _PooledCNN(nn.Module):
    """``features`` -> global max pool (``pool``) -> ``classifier`` (Linear, ReLU, Linear): the
    layout SmallCNN and VGGStyleCNN share, so that they share their layer names too."""

    def _set_head(self, channels, hidden, n_classes):
        self.pool = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class SmallCNN(_PooledCNN):
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
        self.features = nn.Sequential(*conv_blocks(in_channels, w))
        self._set_head(4 * w, hidden, n_classes)


class VGGStyleCNN(_PooledCNN):
    """A VGG-style CNN with BatchNorm: two 3x3 convolutions per block, then max pooling.

    Layers::

        features.0 conv(in, w)   .1 BN  .2 ReLU  .3 conv(w, w)    .4 BN  .5 ReLU  .6 MaxPool
        features.7 conv(w, 2w)   .8 BN  .9 ReLU  .10 conv(2w, 2w) .11 BN .12 ReLU .13 MaxPool
        features.14 conv(2w, 4w) .15 BN .16 ReLU                   (last convolutional block)
        pool       global max pool + flatten  -> (B, 4w)
        classifier.0 Linear(4w, hidden)  classifier.1 ReLU  classifier.2 Linear(hidden, n_classes)

    Parameters
    ----------
    n_classes, in_channels, width, hidden : int, default=10, 3, 16, 64
        Outputs (logits), input channels, channels of the first block (doubled per
        block) and units of the penultimate Linear layer, as in :class:`SmallCNN`.

    Examples
    --------
    >>> import torch
    >>> from skdebias.models import VGGStyleCNN
    >>> VGGStyleCNN(n_classes=4)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 4])
    """

    def __init__(self, n_classes=10, in_channels=3, width=16, hidden=64):
        super().__init__()
        w = width

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
        )
        self._set_head(4 * w, hidden, n_classes)


class _BasicBlock(nn.Module):
    """Two 3x3 conv + BN with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        # a module of its own, so hooks and LRP rules see the output of the block
        self.relu2 = nn.ReLU()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet: a stem and three residual stages (one basic block each).

    Layers::

        stem     conv(in, w) + BN + ReLU
        layer1   block(w, w)        layer2   block(w, 2w, stride 2)
        layer3   block(2w, 4w, stride 2)  (its output ``layer3`` or ``layer3.relu2``)
        pool     global average pool + flatten -> (B, 4w)
        fc       Linear(4w, n_classes)

    Parameters
    ----------
    n_classes, in_channels, width : int, default=10, 3, 16
        Outputs (logits), input channels and channels of the first stage
        (doubled per stage).

    Examples
    --------
    >>> import torch
    >>> from skdebias.models import SmallResNet
    >>> SmallResNet()(torch.zeros(2, 3, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, n_classes=10, in_channels=3, width=16):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(w), nn.ReLU())
        self.layer1 = _BasicBlock(w, w)
        self.layer2 = _BasicBlock(w, 2 * w, stride=2)
        self.layer3 = _BasicBlock(2 * w, 4 * w, stride=2)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, n_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))))


class GAPCNN(nn.Module):
    """A CNN with global average pooling and a single Linear head (no hidden Linear layer).

    Layers::

        features.0 conv(in, w)   .1 ReLU  .2 MaxPool
        features.3 conv(w, 2w)   .4 ReLU  .5 MaxPool
        features.6 conv(2w, 4w)  .7 ReLU  .8 conv(4w, 4w)  .9 ReLU
        pool       global average pool + flatten -> (B, 4w)
        fc         Linear(4w, n_classes)

    The convolutions start from He initialisation (``fan_out``, zero bias).

    Parameters
    ----------
    n_classes, in_channels, width : int, default=10, 3, 16
        Outputs (logits), input channels and channels of the first convolution
        (doubled, then doubled again).

    Examples
    --------
    >>> import torch
    >>> from skdebias.models import GAPCNN
    >>> GAPCNN()(torch.zeros(2, 3, 28, 28)).shape
    torch.Size([2, 10])
    """

    def __init__(self, n_classes=10, in_channels=3, width=16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *conv_blocks(in_channels, w), nn.Conv2d(4 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, n_classes)
        # He initialisation (fan-out, ReLU, zero bias) as in torchvision's VGG and ResNet: with
        # torch's default the averaged features start so small that training often stalls
        for conv in self.features:
            if isinstance(conv, nn.Conv2d):
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


#: The zoo: name -> (module class, last convolutional layer, penultimate feature layer).
#: The layers are those where concept directions (CAVs) and feature-space methods work.
ZOO = {
    "small_cnn": (SmallCNN, "features.6", "classifier.1"),
    "vgg_bn": (VGGStyleCNN, "features.14", "classifier.1"),
    "resnet": (SmallResNet, "layer3", "pool"),
    "gap_cnn": (GAPCNN, "features.8", "pool"),
}


def make_zoo_model(name, *, n_classes=10, in_channels=3, width=16, random_state=None):
    """A fresh (untrained) network of the zoo, with its conventional layers.

    Parameters
    ----------
    name : {"small_cnn", "vgg_bn", "resnet", "gap_cnn"}
        :class:`SmallCNN`, :class:`VGGStyleCNN` (BatchNorm), :class:`SmallResNet`
        or :class:`GAPCNN` (global average pooling).
    n_classes : int, default=10
        Outputs (logits).
    in_channels : int, default=3
        Channels of the input images.
    width : int, default=16
        Channels of the first convolution.
    random_state : int or None, default=None
        Seeds torch's RNG before the weights are drawn (``None``: torch's
        current state).

    Returns
    -------
    module : torch.nn.Module
    conv_layer : str
        Name of the last convolutional layer's output (where CAVs are fitted).
    feature_layer : str
        Name of the layer that outputs the penultimate features (input of the
        last Linear layer).

    Examples
    --------
    >>> import torch
    >>> from skdebias.models import make_zoo_model
    >>> net, conv, feats = make_zoo_model("resnet", random_state=0)
    >>> conv, feats, net(torch.zeros(1, 3, 28, 28)).shape
    ('layer3', 'pool', torch.Size([1, 10]))
    """
    if not isinstance(name, str) or name not in ZOO:
        raise ValueError(f"name={name!r} is not a zoo model; choose one of {sorted(ZOO)}.")
    cls, conv_layer, feature_layer = ZOO[name]
    if random_state is not None:
        torch.manual_seed(int(random_state))
    return cls(n_classes=n_classes, in_channels=in_channels, width=width), conv_layer, \
        feature_layer


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
