"""CUDA path: the same numbers on the GPU as on the CPU. Skipped on machines without CUDA."""

import numpy as np
import pytest
import torch

from skdebias import ActivationExtractor, CAVEstimator
from skdebias.models import SmallCNN

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_extraction_cuda_matches_cpu():
    torch.manual_seed(0)
    net = SmallCNN()
    X = np.random.RandomState(0).rand(64, 3, 28, 28).astype(np.float32)
    cpu = ActivationExtractor(net, "features.6", device="cpu").fit_transform(X)
    auto = ActivationExtractor(net, "features.6", device="auto").fit(X)
    assert auto.device_.type == "cuda"
    gpu = auto.transform(X)
    # the caller's network stays on the CPU: the extractor moved a copy
    assert next(net.parameters()).device.type == "cpu"
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)
    t = np.arange(64) % 2
    np.testing.assert_allclose(CAVEstimator().fit(gpu, t).cav_, CAVEstimator().fit(cpu, t).cav_,
                               atol=1e-3)


def _artifact_problem():
    rng = np.random.RandomState(0)
    X = rng.rand(96, 3, 28, 28).astype(np.float32)
    y = rng.randint(0, 10, 96)
    c = (np.arange(96) % 2).astype(np.int64)
    X[c == 1, :, :4, :4] = 1.0  # a corner patch as the concept
    return X, y, c


@pytest.mark.parametrize("kind", ["rr", "pclarc", "pclarc_flatten"])
def test_corrector_cuda_matches_cpu(kind):
    from skdebias import ClassArtifactCompensator, GradientPenaltyCorrector

    X, y, c = _artifact_problem()
    torch.manual_seed(0)
    net = SmallCNN()
    if kind == "rr":
        make = lambda device: GradientPenaltyCorrector(  # noqa: E731
            net, "features.6", penalty=10.0, max_epochs=1, lr=1e-3, batch_size=32,
            device=device, random_state=0)
    else:
        pooling = "flatten" if kind == "pclarc_flatten" else "max"
        make = lambda device: ClassArtifactCompensator(  # noqa: E731
            net, "features.6", mode="projective", pooling=pooling, device=device, random_state=0)
    cpu = make("cpu").fit(X, y, concept_labels=c)
    gpu = make("cuda").fit(X, y, concept_labels=c)
    assert next(gpu.module_.parameters()).device.type == "cuda"
    assert next(net.parameters()).device.type == "cpu"
    np.testing.assert_allclose(gpu.cav_, cpu.cav_, atol=1e-3)
    np.testing.assert_allclose(gpu.predict_proba(X), cpu.predict_proba(X), atol=2e-3)


def _assert_tf32_close(gpu, cpu):
    # float32 convolutions on CUDA follow torch.backends.cudnn.allow_tf32 (on by default):
    # 10-bit mantissas, so differences up to a few 1e-3 of the activations' range
    assert np.abs(gpu - cpu).max() <= 5e-3 * np.abs(cpu).max()


@pytest.mark.parametrize("pooling", ["max", None])
def test_extraction_cuda_batches_come_back_in_order(pooling):
    # several batches, the last one partial: each batch's activations, copied back while the
    # next batch runs, arrive in order and equal the CPU's
    torch.manual_seed(0)
    net = SmallCNN()
    X = np.random.RandomState(1).rand(70, 3, 28, 28).astype(np.float32)
    cpu = ActivationExtractor(net, "features.3", pooling=pooling, batch_size=16,
                              device="cpu").fit_transform(X)
    ext = ActivationExtractor(net, "features.3", pooling=pooling, batch_size=16,
                              device="cuda").fit(X)
    parts = list(ext.iter_activations(X))
    assert [len(p) for p in parts] == [16, 16, 16, 16, 6]
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in parts)
    _assert_tf32_close(torch.cat(parts).numpy(), cpu)
    _assert_tf32_close(ext.transform(X), cpu)


def test_extraction_cuda_bfloat16_keeps_the_pattern_cav():
    X, _, c = _artifact_problem()
    torch.manual_seed(0)
    net = SmallCNN()
    full = ActivationExtractor(net, "features.6", device="cpu").fit_transform(X)
    half = ActivationExtractor(net, "features.6", device="cuda",
                               precision="bfloat16").fit_transform(X)
    a, b = CAVEstimator().fit(full, c).cav_, CAVEstimator().fit(half, c).cav_
    assert float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.999


def test_extraction_cuda_network_that_cannot_take_channels_last():
    # a .view on a convolution output: the batches run in their own layout instead
    from _nets import ViewNet

    torch.manual_seed(0)
    net = ViewNet()
    X = np.random.RandomState(2).rand(20, 3, 8, 8).astype(np.float32)
    cpu = ActivationExtractor(net, "head", batch_size=8, device="cpu").fit_transform(X)
    gpu = ActivationExtractor(net, "head", batch_size=8, device="cuda").fit_transform(X)
    _assert_tf32_close(gpu, cpu)


def test_extraction_cuda_uint8_images_converted_on_the_gpu(monkeypatch):
    # uint8 batches travel as uint8 and are scaled on the GPU: the same activations as the
    # float32 images in [0, 1]. Without TF32: its 10-bit rounding of the convolutions' inputs
    # turns a last-bit difference of x / 255 into differences of 1e-4 of the activations
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    net = SmallCNN()
    X8 = np.random.RandomState(3).randint(0, 256, (40, 3, 28, 28)).astype(np.uint8)
    ext = ActivationExtractor(net, "features.6", batch_size=16, device="cuda")
    with pytest.warns(UserWarning, match="uint8"):
        ext.fit(X8)
    from_bytes = ext.transform(X8)
    # (x / 255 may round differently on the GPU in the last bit)
    np.testing.assert_allclose(from_bytes, ext.transform(X8.astype(np.float32) / 255),
                               rtol=1e-5, atol=1e-6)
