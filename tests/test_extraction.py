"""ActivationExtractor and the shared torch helpers it stands on."""

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks
from torch import nn

from skdebias import ActivationExtractor, CAVEstimator
from skdebias._torch import (
    capture_output,
    copy_module,
    find_layer,
    get_module,
    iter_batches,
    layer_inputs,
    preserve_mode,
    resolve_device,
    stop_after,
)
from skdebias.models import SmallCNN, make_classifier, torchvision_model


@pytest.fixture
def images():
    return np.random.RandomState(0).rand(20, 3, 28, 28).astype(np.float32)


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return SmallCNN()


def reference_activations(module, layer, X):
    store = {}
    handle = find_layer(module, layer).register_forward_hook(
        lambda m, i, o: store.__setitem__("a", o.detach()))
    module.eval()
    with torch.no_grad():
        module(torch.as_tensor(X))
    handle.remove()
    return store["a"]


# ------------------------------------------------------------------ helpers
def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device='gpu0' is not valid"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="device=3 is not valid"):
        resolve_device(3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_resolve_device_cuda_missing():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_find_layer_lists_close_names(cnn):
    assert find_layer(cnn, "features.6") is cnn.features[6]
    with pytest.raises(ValueError, match=r"Unknown layer 'feature.6'.*'features.6'"):
        find_layer(cnn, "feature.6")
    with pytest.raises(ValueError, match="Unknown layer ''"):
        find_layer(cnn, "")


def test_capture_output_removes_hook_even_on_error(cnn):
    layer = cnn.features[6]
    with pytest.raises(RuntimeError):
        with capture_output(layer):
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0
    with capture_output(layer, stop=True) as store, stop_after():
        cnn(torch.zeros(2, 3, 28, 28))
    assert store[0].shape == (2, 64, 7, 7)
    assert len(layer._forward_hooks) == 0


def test_stop_early_skips_later_layers(cnn):
    calls = []
    handle = cnn.classifier.register_forward_hook(lambda *a: calls.append(1))
    with capture_output(cnn.features[2], stop=True), stop_after():
        cnn(torch.zeros(1, 3, 28, 28))
    handle.remove()
    assert calls == []


def test_preserve_mode_restores_mixed_flags(cnn):
    cnn.train()
    cnn.features[0].eval()
    with preserve_mode(cnn, train=False):
        assert not any(m.training for m in cnn.modules())
    assert cnn.training and not cnn.features[0].training and cnn.features[3].training


def test_copy_module_is_independent(cnn):
    copy = copy_module(cnn)
    with torch.no_grad():
        copy.features[0].weight.add_(1.0)
    assert not torch.equal(copy.features[0].weight, cnn.features[0].weight)


def test_iter_batches_all_inputs(images):
    y = np.arange(20)
    for X in (images, torch.as_tensor(images), torch.utils.data.TensorDataset(torch.as_tensor(images))):
        got = list(iter_batches(X, batch_size=7))
        assert [b.shape[0] for b in got] == [7, 7, 6]
        np.testing.assert_allclose(torch.cat(got).numpy(), images)
    pairs = list(iter_batches(images, batch_size=8, y=y))
    np.testing.assert_array_equal(torch.cat([p[1] for p in pairs]).numpy(), y)
    sub = list(iter_batches(images, batch_size=4, indices=[3, 1]))
    np.testing.assert_allclose(sub[0].numpy(), images[[3, 1]])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(iter_batches(images, batch_size=0))


def test_get_module_does_not_initialise_callers_net():
    net = make_classifier(SmallCNN)
    module = get_module(net)
    assert isinstance(module, SmallCNN)
    assert not getattr(net, "initialized_", False)
    with pytest.raises(TypeError, match="torch.nn.Module or a skorch NeuralNet"):
        get_module("resnet")


# ------------------------------------------------------------------ extractor
@pytest.mark.parametrize("pooling", ["max", "mean", "flatten", None])
def test_matches_reference_forward(cnn, images, pooling):
    ref = reference_activations(cnn, "features.6", images)
    ext = ActivationExtractor(cnn, "features.6", pooling=pooling, batch_size=6, device="cpu")
    out = ext.fit_transform(images)
    expected = {
        "max": ref.amax(dim=(2, 3)), "mean": ref.mean(dim=(2, 3)),
        "flatten": ref.reshape(20, -1), None: ref,
    }[pooling].numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert ext.n_features_out_ == int(np.prod(expected.shape[1:]))
    if pooling == "max":
        assert list(ext.get_feature_names_out()[:2]) == ["features.6_0", "features.6_1"]


def test_dataset_and_tensor_inputs(cnn, images):
    ext = ActivationExtractor(cnn, "features.6", device="cpu").fit(images)
    a = ext.transform(images)
    ds = torch.utils.data.TensorDataset(torch.as_tensor(images), torch.zeros(20))
    np.testing.assert_allclose(ext.transform(ds), a, rtol=1e-6)
    np.testing.assert_allclose(ext.transform(torch.as_tensor(images)), a, rtol=1e-6)


def test_train_state_and_weights_untouched(cnn, images):
    cnn.train()
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    ActivationExtractor(cnn, "features.6", device="cpu").fit_transform(images)
    assert all(m.training for m in cnn.modules())
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(len(m._forward_hooks) == 0 for m in cnn.modules())


def test_batch_norm_uses_eval_statistics(images):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net.train()
    a_batch1 = ActivationExtractor(net, "1", batch_size=1, device="cpu").fit_transform(images)
    a_batch20 = ActivationExtractor(net, "1", batch_size=20, device="cpu").fit_transform(images)
    np.testing.assert_allclose(a_batch1, a_batch20, rtol=1e-5, atol=1e-6)


def test_skorch_net_fitted_and_initialised(images):
    y = np.arange(20) % 10
    net = make_classifier(SmallCNN, max_epochs=1, device="cpu", random_state=0).fit(images, y)
    a = ActivationExtractor(net, "classifier.1", device="cpu").fit_transform(images)
    ref = reference_activations(net.module_, "classifier.1", images).numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
    fresh = make_classifier(SmallCNN).initialize()
    assert ActivationExtractor(fresh, "pool").fit_transform(images).shape == (20, 64)


def test_out_memmap(cnn, images, tmp_path):
    ext = ActivationExtractor(cnn, "features.3", pooling="flatten", device="cpu").fit(images)
    out = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32,
                                    shape=(20, ext.n_features_out_))
    res = ext.transform(images, out=out)
    assert res is out
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), ext.transform(images))
    with pytest.raises(ValueError, match="out has shape"):
        ext.transform(images, out=np.empty((3, 3), np.float32))


def test_progress_bar(cnn, images, capsys, monkeypatch):
    import functools

    import tqdm.auto

    # conftest sets TQDM_DISABLE=1, which tqdm reads once when first imported (whichever test
    # imports it first): force the bar on here, whatever the test order
    monkeypatch.setattr(tqdm.auto, "tqdm", functools.partial(tqdm.auto.tqdm, disable=False))
    ActivationExtractor(cnn, "features.6", progress=True, batch_size=5, device="cpu").fit_transform(images)
    assert "activations" in capsys.readouterr().err


def test_pipeline_with_cav(cnn, images):
    t = np.r_[np.zeros(10), np.ones(10)].astype(int)
    X = images.copy()
    X[t == 1, 0, :8, :8] = 5.0  # a bright patch on the concept samples
    pipe = Pipeline([("acts", ActivationExtractor(cnn, layer="features.6", device="cpu")),
                     ("cav", CAVEstimator(method="pattern"))]).fit(X, t)
    assert pipe.score(X, t) > 0.9
    assert pipe.transform(X).shape == (20, 1)
    assert np.linalg.norm(pipe.named_steps["cav"].cav_) == pytest.approx(1.0)


def test_clone_and_pickle(cnn, images):
    ext = ActivationExtractor(cnn, "features.6", pooling="mean", device="cpu")
    c = clone(ext)
    assert c.get_params()["pooling"] == "mean" and c.layer == "features.6"
    ext.fit(images)
    restored = pickle.loads(pickle.dumps(ext))
    np.testing.assert_allclose(restored.transform(images), ext.transform(images))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"layer": "features.60"}, r"Unknown layer 'features.60'. Closest valid names"),
        ({"pooling": "median"}, r"pooling='median' is not valid; choose one of"),
        ({"batch_size": 0}, r"batch_size must be a positive integer, got 0"),
        ({"device": "tpu"}, r"device='tpu' is not valid"),
    ],
)
def test_errors(cnn, images, kwargs, match):
    params = {"layer": "features.6", "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=match):
        ActivationExtractor(cnn, **params).fit(images)


def test_input_errors(cnn, images):
    ext = ActivationExtractor(cnn, "features.6", device="cpu")
    with pytest.raises(ValueError, match="Expected a 2-dimensional container|2D array"):
        ext.fit(np.zeros(5, dtype=np.float32))
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        ext.fit(bad)
    with pytest.raises(ValueError, match="contains NaN, infinity"):
        ext.fit(torch.as_tensor(bad))
    ext.fit(images)
    with pytest.raises(ValueError, match=r"per-sample shape \(3, 14, 14\)"):
        ext.transform(images[:, :, :14, :14])
    with pytest.raises(TypeError, match="torch.nn.Module or a skorch NeuralNet"):
        ActivationExtractor("not a net", "x").fit(images)


def test_unused_layer_error(images):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Conv2d(3, 2, 3)
            self.unused = nn.ReLU()

        def forward(self, x):
            return self.used(x)

    with pytest.raises(RuntimeError, match="was not called in the forward pass"):
        ActivationExtractor(Net(), "unused", device="cpu").fit(images)


@pytest.mark.parametrize(
    "name,layer",
    [("resnet18", "layer3"), ("vgg11", "features.10"), ("efficientnet_b0", "features.4")],
)
def test_torchvision_architectures(name, layer):
    torch.manual_seed(0)
    model = torchvision_model(name, num_classes=3)
    X = np.random.RandomState(0).rand(2, 3, 64, 64).astype(np.float32)
    A = ActivationExtractor(model, layer, device="cpu").fit_transform(X)
    assert A.shape[0] == 2 and A.ndim == 2 and np.isfinite(A).all()
    t = np.array([0, 1])
    assert CAVEstimator().fit(A, t).cav_.shape == (A.shape[1],)


def test_torchvision_unknown_name():
    with pytest.raises(ValueError, match="Unknown torchvision model 'resnet19'"):
        torchvision_model("resnet19")


# ------------------------------------------------------------------ sklearn checks
class _Tabular(nn.Module):
    """Accepts (n, n_features) input so sklearn's generic checks can drive the extractor."""

    def __init__(self):
        super().__init__()
        self.act = nn.Identity()

    def forward(self, x):
        return self.act(x) * 2.0


# The extractor passes every generic check: no expected failures to list.
@parametrize_with_checks([ActivationExtractor(_Tabular(), "act", device="cpu")])
def test_sklearn_compatible_extractor(estimator, check):
    check(estimator)


# ------------------------------------------------------------------ layer_inputs memory layout
class _ViewNet(nn.Module):
    """Calls ``.view`` on a convolution output: fails on channels_last activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        h = self.conv(x)
        return self.head(h.view(h.shape[0], -1))


@pytest.mark.parametrize("make", [SmallCNN, _ViewNet])
def test_layer_inputs_same_features_in_either_layout(make):
    torch.manual_seed(0)
    net = make().eval()
    X = np.random.RandomState(0).rand(10, 3, 8, 8).astype(np.float32)
    head = "classifier.2" if isinstance(net, SmallCNN) else "head"
    feats = layer_inputs(net, head, X, batch_size=4, device=torch.device("cpu"))
    # reference: the hooked input of the head, computed by hand in the batch's own layout
    seen = []
    hook = get_module(net).get_submodule(head).register_forward_hook(
        lambda m, inp, out: seen.append(inp[0].reshape(len(inp[0]), -1)))
    with torch.no_grad():
        net(torch.as_tensor(X))
    hook.remove()
    np.testing.assert_allclose(feats.numpy(), seen[0].numpy(), rtol=1e-5, atol=1e-6)
    # the module itself is left in its own layout
    assert all(p.is_contiguous() for p in net.parameters())
