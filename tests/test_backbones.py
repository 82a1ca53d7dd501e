"""Pretrained backbones: pretrain_backbone, FrozenBackbone, LinearProbe and the head-only protocol."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from skdebias import ActivationExtractor, SpuriosityRanker
from skdebias._utils._runtime import limit_threads
from skdebias.backbones import FrozenBackbone, LinearProbe, make_backbone, pretrain_backbone
from skdebias.correction import SpuriosityHeadFinetuner
from skdebias.datasets import make_colored_digits
from skdebias.models import make_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def colored():
    """Digits coloured at random (pretraining) and the same protocol at rho=0.95 (head)."""
    uniform = make_colored_digits(rho=0.1, image_size=12, random_state=0)
    biased = make_colored_digits(rho=0.95, image_size=12, random_state=1)
    return uniform, biased


@pytest.fixture(scope="module")
def frozen(colored):
    uniform, _ = colored
    with limit_threads(1):  # module-scoped: the one_thread fixture does not cover it yet
        return pretrain_backbone(uniform.X[:600], uniform.y[:600], uniform.bias[:600],
                                 max_epochs=6, random_state=0)


def test_pretrained_features_encode_digit_and_colour(colored, frozen):
    uniform, biased = colored
    assert isinstance(frozen, FrozenBackbone) and frozen.n_features == 64
    assert frozen.bias_accuracy_ > 0.9 and 0.0 <= frozen.class_accuracy_ <= 1.0
    with torch.no_grad():
        F_tr = frozen(torch.as_tensor(uniform.X[:600])).numpy()
        F_te = frozen(torch.as_tensor(uniform.X_test)).numpy()
    # a linear read-out of the frozen features recovers both attributes on unseen digits
    # (digits: well above chance, 0.1, after this short pretraining on 600 blocky 12 px digits)
    for attr, attr_test, low in (("bias", "bias_test", 0.9), ("y", "y_test", 0.18)):
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
        clf.fit(F_tr, uniform[attr][:600])
        assert clf.score(F_te, uniform[attr_test]) > low, attr


def test_bias_weight_zero_gives_a_plain_classifier(colored):
    uniform, _ = colored
    a = pretrain_backbone(uniform.X[:200], uniform.y[:200], uniform.bias[:200], max_epochs=1,
                          bias_weight=0.0, random_state=0)
    b = pretrain_backbone(uniform.X[:200], uniform.y[:200], uniform.bias[:200], max_epochs=1,
                          bias_weight=1.0, random_state=0)
    x = torch.as_tensor(uniform.X[:8])
    assert not torch.allclose(a(x), b(x))


def test_pretraining_is_reproducible(colored):
    uniform, _ = colored
    kw = dict(max_epochs=1, random_state=3)
    a = pretrain_backbone(uniform.X[:128], uniform.y[:128], uniform.bias[:128], **kw)
    b = pretrain_backbone(uniform.X[:128], uniform.y[:128], uniform.bias[:128], **kw)
    x = torch.as_tensor(uniform.X[:4])
    assert torch.equal(a(x), b(x))


def test_frozen_backbone_stays_frozen_and_in_eval_mode():
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(1))
    frozen = FrozenBackbone(module, n_features=4)
    frozen.train()
    assert not module.training and not any(p.requires_grad for p in frozen.parameters())
    before = module[1].running_mean.clone()
    frozen(torch.randn(8, 3, 6, 6) + 5)
    assert torch.equal(module[1].running_mean, before)  # eval: BatchNorm statistics unchanged
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    frozen(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # attributions still work


def test_linear_probe_trains_only_its_head(colored, frozen):
    _, biased = colored
    net = make_classifier(LinearProbe(frozen, n_classes=10), max_epochs=3, lr=1e-2,
                          device="cpu", random_state=0)
    before = [p.clone() for p in frozen.parameters()]
    net.fit(biased.X, biased.y)
    assert all(torch.equal(a, b) for a, b in zip(before, net.module_.backbone.parameters()))
    assert net.score(biased.X_test_biased, biased.y_test) > 0.7
    assert [n for n, p in net.module_.named_parameters() if p.requires_grad] == \
        ["head.weight", "head.bias"]


def test_probe_runs_the_spuriosity_protocol(colored, frozen):
    """Ranker on the backbone features and head fine-tuning on the low-spuriosity samples."""
    _, biased = colored
    net = make_classifier(LinearProbe(frozen, n_classes=10), max_epochs=3, lr=1e-2,
                          device="cpu", random_state=0).fit(biased.X, biased.y)
    ext = ActivationExtractor(net, "backbone", device="cpu").fit(biased.X)
    A = ext.transform(biased.X)
    assert A.shape == (len(biased.y), 64)
    ranker = SpuriosityRanker(spurious_features={c: [0] for c in range(10)}).fit(A, biased.y)
    ft = SpuriosityHeadFinetuner(net, ranker=ranker, layer="head", k=5, max_epochs=3,
                                 device="cpu", random_state=0).fit(biased.X, biased.y)
    assert len(ft.selected_indices_) == 50
    assert ft.predict(biased.X_test).shape == biased.y_test.shape


@pytest.mark.parametrize("kwargs, error, match", [
    ({"bias_weight": -1.0}, ValueError, "bias_weight must be a finite number >= 0"),
    ({"max_epochs": 0}, ValueError, "max_epochs"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"backbone": "resnet"}, TypeError, "backbone must be a torch.nn.Module or None, got str"),
])
def test_pretrain_backbone_bad_parameters(colored, kwargs, error, match):
    uniform, _ = colored
    with pytest.raises(error, match=match):
        pretrain_backbone(uniform.X[:16], uniform.y[:16], uniform.bias[:16], **kwargs)


def test_pretrain_backbone_bad_data(colored):
    uniform, _ = colored
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        pretrain_backbone(uniform.X[:16], uniform.y[:15], uniform.bias[:16])
    with pytest.raises(ValueError, match="bias must hold at least two distinct values"):
        pretrain_backbone(uniform.X[:16], uniform.y[:16], np.zeros(16, dtype=int))
    with pytest.raises(ValueError, match=r"images \(n, C, H, W\)"):
        pretrain_backbone(uniform.X[:16].reshape(16, -1), uniform.y[:16], uniform.bias[:16])


def test_linear_probe_needs_a_frozen_backbone():
    with pytest.raises(TypeError, match="backbone must be a FrozenBackbone"):
        LinearProbe(make_backbone(), n_classes=10)
    with pytest.raises(ValueError, match="n_features"):
        make_backbone(n_features=0)
