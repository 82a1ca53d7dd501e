"""Shared fixtures: built-in biased data and small networks trained once per session."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def artifact_data():
    """Artifact digits: a red patch in 30% of class 0 (Clever-Hans setting)."""
    from skdebias.datasets import make_artifact_digits

    return make_artifact_digits(target_class=0, p=0.3, artifact="patch", random_state=0)


@pytest.fixture(scope="session")
def artifact_net(artifact_data):
    """A SmallCNN skorch classifier trained on the artifact digits (a few seconds)."""
    from skdebias.models import SmallCNN, make_classifier

    net = make_classifier(SmallCNN, max_epochs=8, lr=2e-3, device="cpu", random_state=0)
    return net.fit(artifact_data.X, artifact_data.y)


@pytest.fixture(scope="session")
def colored_data():
    """Colored digits, colour spurious with rho=0.99 (background colour)."""
    from skdebias.datasets import make_colored_digits

    return make_colored_digits(rho=0.99, counterfactual=True, random_state=0)


@pytest.fixture(scope="session")
def colored_net(colored_data):
    """A SmallCNN skorch classifier trained on the biased colored digits."""
    from skdebias.models import SmallCNN, make_classifier

    net = make_classifier(SmallCNN, max_epochs=8, lr=2e-3, device="cpu", random_state=0)
    return net.fit(colored_data.X, colored_data.y)


def _colored95(mode, epochs):
    from sklearn.model_selection import train_test_split
    from sklearn.utils import Bunch

    from skdebias.datasets import make_colored_digits
    from skdebias.models import SmallCNN, make_classifier

    data = make_colored_digits(rho=0.95, mode=mode, random_state=0)
    net = make_classifier(SmallCNN, max_epochs=epochs, lr=2e-3, device="cpu", random_state=0)
    net.fit(data.X, data.y)
    val, test = train_test_split(np.arange(len(data.y_test)), test_size=0.5,
                                 stratify=data.y_test, random_state=0)
    return Bunch(data=data, net=net, val=val, test=test)


@pytest.fixture(scope="session")
def colored95_bg():
    """Colored digits at rho=0.95 (background colour) and a vanilla SmallCNN (8 epochs), with a
    stratified 50/50 split of the unbiased test split into ``val`` and ``test`` indices.
    A Bunch: data, net, val, test."""
    return _colored95("background", 8)


@pytest.fixture(scope="session")
def colored95_fg():
    """As ``colored95_bg`` with the foreground (stroke) colour and 20 epochs (about 10 s): the
    longer-trained net has penultimate features with enough shape information for head
    fine-tuning."""
    return _colored95("foreground", 20)


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture(scope="session")
def small(artifact_data):
    """A small training subset of ``artifact_data``: every class-0 image (all artifact images)
    + 300 others, as ``(X, y, concept_labels)`` with -1 (no label) outside class 0."""
    d = artifact_data
    rng = np.random.RandomState(0)
    others = rng.choice(np.flatnonzero(d.y != 0), 300, replace=False)
    idx = np.sort(np.r_[np.flatnonzero(d.y == 0), others])
    concept = np.where(d.y[idx] == 0, d.concept[idx], -1)
    return d.X[idx], d.y[idx], concept


@pytest.fixture(scope="session")
def vanilla_scores(artifact_data, artifact_net):
    """Clean and attacked test accuracy of ``artifact_net``."""
    from skdebias.metrics import attacked_accuracy

    d = artifact_data
    return {"clean": float(np.mean(artifact_net.predict(d.X_test) == d.y_test)),
            "attacked": attacked_accuracy(artifact_net, d.X_test, d.y_test, d.add_artifact)}


@pytest.fixture
def images():
    """20 random RGB images of 28 x 28 pixels (SmallCNN's input)."""
    return np.random.RandomState(0).rand(20, 3, 28, 28).astype(np.float32)


@pytest.fixture
def cnn():
    """An untrained SmallCNN (seed 0)."""
    from skdebias.models import SmallCNN

    torch.manual_seed(0)
    return SmallCNN()


@pytest.fixture
def gray_images():
    """6 random one-channel images of 8 x 8 pixels (the input of ``_nets.inplace_net``)."""
    return np.random.RandomState(0).randn(6, 1, 8, 8).astype("float32")


@pytest.fixture
def bias_toy():
    """``(X, y, bias)``: 96 samples, 6 features, 3 classes; feature 0 shows the class, feature 1
    the bias, which equals the class for about 80% of the samples."""
    rng = np.random.RandomState(0)
    n = 96
    y = rng.randint(0, 3, n)
    bias = np.where(rng.rand(n) < 0.8, y, rng.randint(0, 3, n))
    X = rng.randn(n, 6).astype(np.float32)
    X[:, 0] += 2.0 * y
    X[:, 1] += 3.0 * bias  # the spurious feature
    return X, y.astype(np.int64), bias.astype(np.int64)


@pytest.fixture
def one_thread():
    """One CPU thread for the test (tiny models: thread synchronisation would dominate)."""
    from skdebias._utils._runtime import limit_threads

    with limit_threads(1):
        yield
