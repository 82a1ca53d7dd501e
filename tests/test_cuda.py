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
