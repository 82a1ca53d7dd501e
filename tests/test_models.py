"""skdebias.models: seeded skorch wrappers and torchvision models by name (never downloading)."""

import numpy as np
import pytest
import torch
from sklearn.base import clone

from skdebias.models import SeededNeuralNetClassifier, SmallCNN, make_classifier, torchvision_model


def _weights(net):
    return [p.detach().clone() for p in net.module_.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_random_state_seeds_every_initialisation_and_clones():
    a = make_classifier(SmallCNN, random_state=0, max_epochs=1, device="cpu")
    b = make_classifier(SmallCNN, random_state=0, max_epochs=1, device="cpu")
    torch.rand(5)  # draws between construction and initialisation do not matter
    assert isinstance(a, SeededNeuralNetClassifier)
    assert _same(_weights(a.initialize()), _weights(b.initialize()))
    c = clone(a)
    assert c.random_state == 0
    assert _same(_weights(c.initialize()), _weights(a))
    other = make_classifier(SmallCNN, random_state=1, max_epochs=1, device="cpu").initialize()
    assert not _same(_weights(other), _weights(a))


def test_random_state_makes_training_reproducible():
    rng = np.random.RandomState(0)
    X = rng.rand(40, 3, 28, 28).astype("float32")
    y = rng.randint(0, 10, 40)
    net = make_classifier(SmallCNN, random_state=0, max_epochs=2, batch_size=8, device="cpu")
    first = _weights(net.fit(X, y))
    second = _weights(clone(net).fit(X, y))
    assert _same(first, second)


def test_no_random_state_leaves_torch_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    make_classifier(SmallCNN, max_epochs=1, device="cpu")
    assert torch.equal(torch.rand(3), expected)


def test_criterion_can_be_given():
    net = make_classifier(SmallCNN, criterion=torch.nn.NLLLoss, device="cpu")
    assert net.criterion is torch.nn.NLLLoss
    assert make_classifier(SmallCNN, device="cpu").criterion is torch.nn.CrossEntropyLoss


@pytest.fixture
def hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    yield tmp_path
    torch.hub.set_dir(old)


def test_torchvision_weights_come_from_the_cache_only(hub_dir):
    import torchvision

    with pytest.raises(FileNotFoundError, match=r"not in the torch hub cache .*resnet18-"):
        torchvision_model("resnet18", weights="DEFAULT")
    with pytest.raises(ValueError, match="is not a weight of 'resnet18'"):
        torchvision_model("resnet18", weights="IMAGENET2K_V9")
    # a weights file in the cache (random weights standing in for the real ones)
    w = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    reference = torchvision.models.resnet18(num_classes=1000)
    (hub_dir / "checkpoints").mkdir()
    torch.save(reference.state_dict(), hub_dir / "checkpoints" / w.url.rsplit("/", 1)[-1])
    for given in ("DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", w):
        model = torchvision_model("resnet18", weights=given)
        assert model.fc.out_features == 1000
        torch.testing.assert_close(model.fc.weight, reference.fc.weight)
    small = torchvision_model("resnet18", weights="DEFAULT", num_classes=3)
    assert small.fc.out_features == 3
    torch.testing.assert_close(small.conv1.weight, reference.conv1.weight)
    assert torchvision_model("resnet18").fc.out_features == 10  # random weights: the digits


def test_torchvision_unknown_name():
    with pytest.raises(ValueError, match="Unknown torchvision model 'resnet19'"):
        torchvision_model("resnet19")


@pytest.mark.parametrize("name", ["small_cnn", "vgg_bn", "resnet", "gap_cnn"])
def test_zoo_models_have_their_layers_and_learn(name):
    from skdebias.models import ZOO, make_zoo_model

    net, conv, feats = make_zoo_model(name, n_classes=3, width=4, random_state=0)
    assert isinstance(net, ZOO[name][0])
    layers = dict(net.named_modules())
    assert conv in layers and feats in layers
    again, _, _ = make_zoo_model(name, n_classes=3, width=4, random_state=0)
    assert _same(list(net.parameters()), list(again.parameters()))
    # a separable toy problem (class = bright channel) is learnt within a few epochs
    rng = np.random.RandomState(0)
    y = np.arange(60) % 3
    X = (rng.rand(60, 3, 16, 16) * 0.2).astype("float32")
    X[np.arange(60), y] += 0.8
    clf = make_classifier(net, max_epochs=15, lr=3e-3, batch_size=16, device="cpu",
                          random_state=0).fit(X, y)
    assert (clf.predict(X) == y).mean() > 0.9


def test_make_zoo_model_unknown_name():
    from skdebias.models import make_zoo_model

    with pytest.raises(ValueError, match="name='vgg' is not a zoo model; choose one of"):
        make_zoo_model("vgg")
