"""ActivationExtractor: pooled activations of a layer, as an sklearn transformer."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from torch import nn

from _nets import ViewNet, inplace_net
from skdebias import ActivationExtractor, CAVEstimator
from skdebias._utils._modules import find_layer
from skdebias.models import SmallCNN, make_classifier, torchvision_model
from skdebias.report import peak_memory_growth


def reference_activations(module, layer, X):
    store = {}
    handle = find_layer(module, layer).register_forward_hook(
        lambda m, i, o: store.__setitem__("a", o.detach()))
    module.eval()
    with torch.no_grad():
        module(torch.as_tensor(X))
    handle.remove()
    return store["a"]


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
    ActivationExtractor(cnn, "features.6", verbose=1, batch_size=5, device="cpu").fit_transform(images)
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
    bad[3, 1, 2, 2] = np.inf
    with pytest.raises(ValueError,
                       match=r"Input X contains NaN or infinity \(first at sample 0\)"):
        ext.fit(bad)
    bad[0, 0, 0, 0] = 0.0
    with pytest.raises(ValueError, match=r"contains NaN or infinity \(first at sample 3\)"):
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


def test_extractor_refit_drops_n_features_in():
    vec = nn.Sequential(nn.Linear(5, 3))
    ext = ActivationExtractor(vec, "0", device="cpu").fit(np.ones((4, 5), dtype="float32"))
    assert ext.n_features_in_ == 5
    ext.set_params(estimator=inplace_net(), layer="1").fit(np.ones((2, 1, 8, 8), dtype="float32"))
    assert not hasattr(ext, "n_features_in_")
    assert ext.input_shape_ == (1, 8, 8)


# ------------------------------------------------------------------ inputs and memory
class _Stream(torch.utils.data.IterableDataset):
    """Items ``(x, 0)`` of ``X`` in order; with ``sized`` it has a length."""

    def __init__(self, X, sized=False):
        self.X, self.sized = X, sized

    def __iter__(self):
        for x in self.X:
            yield torch.as_tensor(x), 0

    def __len__(self):
        if not self.sized:
            raise TypeError("no length")
        return len(self.X)


def test_streams_loaders_and_workers_give_the_array_result(cnn, images):
    expected = ActivationExtractor(cnn, "features.1", device="cpu").fit_transform(images)
    ds = torch.utils.data.TensorDataset(torch.as_tensor(images))
    for X, workers in [(_Stream(images), 0), (_Stream(images, sized=True), 0),
                       (torch.utils.data.DataLoader(ds, batch_size=3), 0), (ds, 2)]:
        ext = ActivationExtractor(cnn, "features.1", batch_size=4, device="cpu",
                                  num_workers=workers).fit(X)
        np.testing.assert_allclose(ext.transform(X), expected, rtol=1e-6, atol=1e-7)
    parts = list(ext.iter_activations(images))
    assert [p.shape[0] for p in parts] == [4] * (len(images) // 4) + (
        [len(images) % 4] if len(images) % 4 else [])
    np.testing.assert_allclose(torch.cat(parts).numpy(), expected, rtol=1e-6, atol=1e-7)
    class Short(_Stream):
        def __len__(self):
            return 4

    with pytest.raises(ValueError, match="yielded 3 samples, but its length is 4"):
        ext.set_params(num_workers=0).transform(Short(images[:3]))
    # each of 2 workers reads the whole stream (PyTorch's rule for an IterableDataset that
    # does not split itself with get_worker_info): the length check reports it
    with pytest.raises(ValueError, match="yielded more than its length 4"):
        ext.set_params(num_workers=2).transform(Short(images[:4]))


def test_num_workers_is_checked_in_fit(cnn, images):
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0, got -1"):
        ActivationExtractor(cnn, "features.1", device="cpu", num_workers=-1).fit(
            torch.utils.data.TensorDataset(torch.as_tensor(images)))


def _memory_check(tmp_path, size_bytes, limit_bytes):
    """Extraction from a uint8 memmap, a uint8 tensor and a DataLoader of ``size_bytes``:
    anonymous memory grows by less than ``limit_bytes`` (a float32 copy would be 4x the
    input), and the activations equal those of the float32 array."""
    import gc

    shape = (3, 64, 64)
    n = size_bytes // int(np.prod(shape))
    mm = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="w+", shape=(n, *shape))
    for start in range(0, n, 4096):  # written in chunks: never all in anonymous memory
        stop = min(n, start + 4096)
        mm[start:stop] = np.random.RandomState(start).randint(0, 256, (stop - start, *shape))
    mm.flush()
    del mm
    X = np.memmap(tmp_path / "x.u8", dtype=np.uint8, mode="r", shape=(n, *shape))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
    ext = ActivationExtractor(net, "1", batch_size=256, device="cpu")
    with pytest.warns(UserWarning, match="uint8"):
        ext.fit(X[:2])
    check = slice(0, n, max(1, n // 97))  # a spread of rows against the float32 result
    expected = ext.transform(np.asarray(X[check], dtype=np.float32) / 255)
    inputs = {"memmap": lambda: X, "tensor": lambda: torch.from_numpy(X),
              "DataLoader": lambda: torch.utils.data.DataLoader(
                  torch.utils.data.TensorDataset(torch.from_numpy(X)))}
    growth = {}
    for name, make in inputs.items():
        gc.collect()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            A, growth[name] = peak_memory_growth(lambda: ext.transform(make()))
        assert A.shape == (n, 4)
        np.testing.assert_allclose(A[check], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        del A
    assert max(growth.values()) < limit_bytes, {k: v / 2**20 for k, v in growth.items()}
    return growth


def test_extraction_memory_is_bounded_by_the_batch(tmp_path):
    # 100 MB of uint8 images (400 MB as float32): the growth (batches, plus 40-70 MB that
    # torch keeps whatever the input size) stays below one copy of the input, even as uint8
    _memory_check(tmp_path, 100 * 2**20, 90 * 2**20)


@pytest.mark.slow
def test_extraction_memory_of_a_large_memmap(tmp_path):
    # the size of the acceptance check: 1.2 GB of uint8 images, growth under 300 MB
    _memory_check(tmp_path, int(1.2 * 2**30), 300 * 2**20)


def _pooled_by_hand(a, pooling):
    if pooling is None or a.ndim <= 2:
        return a
    if pooling == "flatten":
        return a.reshape(len(a), -1)
    flat = a.reshape(a.shape[0], a.shape[1], -1)
    return flat.amax(dim=2) if pooling == "max" else flat.mean(dim=2)


@pytest.mark.parametrize("pooling", ["max", "mean", "flatten", None])
def test_transform_same_in_either_memory_layout(pooling):
    # the activations, pooled in the maps' own layout, equal a hand-made NCHW forward pooled by
    # hand, whether the images come in NCHW or in channels_last; a network that calls .view on
    # a convolution output runs in its own layout
    torch.manual_seed(0)
    X = np.random.RandomState(0).rand(10, 3, 8, 8).astype(np.float32)
    channels_last = torch.as_tensor(X).contiguous(memory_format=torch.channels_last)
    for net, layer, inputs in ((SmallCNN(), "features.3", (X, channels_last)),
                               (ViewNet(), "head", (X,))):
        net.eval()
        seen = []
        hook = net.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            net(torch.as_tensor(X))
        hook.remove()
        expected = _pooled_by_hand(seen[0], pooling).numpy()
        for images in inputs:
            got = ActivationExtractor(net, layer, pooling=pooling,
                                      batch_size=4).fit_transform(images)
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
            assert got.flags.c_contiguous
