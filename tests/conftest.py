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
