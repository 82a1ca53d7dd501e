"""The ``precision`` parameter: one name and one check in every estimator that runs a network,
and bfloat16 results within stated tolerances of float32 (on the CPU, where bfloat16 autocast
works; float16 needs CUDA and raises here)."""

import numpy as np
import pytest
import torch

from skdebias import ActivationExtractor, SpectralRelevanceAnalysis
from skdebias.attribution import attribute
from skdebias.concepts import CAVEstimator
from skdebias.correction import (
    ClassArtifactCompensator,
    FastModelDebiaser,
    GradientPenaltyCorrector,
    SpuriosityHeadFinetuner,
)
from skdebias.metrics import concept_sensitivity
from skdebias.models import SmallCNN

LAYER = "features.6"

#: every estimator that runs the network, with the arguments its fit needs on a tiny MLP
NETWORK_ESTIMATORS = [
    (ActivationExtractor, {"layer": "body"}),
    (SpectralRelevanceAnalysis, {"method": "gradient"}),
    (GradientPenaltyCorrector, {"layer": "body", "cav": np.ones(16), "max_epochs": 1}),
    (ClassArtifactCompensator, {"layer": "body", "cav": np.ones(16)}),
    (FastModelDebiaser, {"counterfactual": lambda X: X[::-1].copy()}),
    (SpuriosityHeadFinetuner, {}),
]


@pytest.mark.parametrize("cls, kwargs", NETWORK_ESTIMATORS, ids=lambda v: getattr(v, "__name__", ""))
def test_every_network_estimator_checks_precision(cls, kwargs):
    from tests._nets import MLP

    est = cls(MLP(), device="cpu", **kwargs)
    assert est.get_params()["precision"] == "float32"
    X = np.random.RandomState(0).rand(30, 6).astype(np.float32)
    y = np.arange(30) % 3
    with pytest.raises(ValueError, match=r"precision.*'half'.*float32.*bfloat16.*float16"):
        cls(MLP(), device="cpu", precision="half", **kwargs).fit(X, y)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="precision='float16' needs a CUDA device"):
            cls(MLP(), device="cpu", precision="float16", **kwargs).fit(X, y)


def test_extractor_bfloat16_pattern_cav_within_tolerance(artifact_net, small):
    """Stated tolerance: the pattern CAV fitted on bfloat16 activations has cosine >= 0.999
    with the float32 one; activations come back as float32."""
    X, y, c = small
    lab = c != -1
    cavs = {}
    for precision in ("float32", "bfloat16"):
        A = ActivationExtractor(artifact_net, LAYER, device="cpu",
                                precision=precision).fit(X).transform(X)
        assert A.dtype == np.float32
        cavs[precision] = CAVEstimator().fit(A[lab], c[lab]).cav_
    cos = float(cavs["float32"] @ cavs["bfloat16"]
                / np.linalg.norm(cavs["float32"]) / np.linalg.norm(cavs["bfloat16"]))
    assert cos >= 0.999


def test_rr_clarc_bfloat16_accuracy_and_sensitivity_within_tolerance(artifact_data, artifact_net,
                                                                     small):
    """Stated tolerance: bfloat16 RR-ClArC (forward, penalty double backward) reaches the
    float32 test accuracy within 0.05 and its concept sensitivity within 25 %."""
    X, y, c = small
    d = artifact_data
    X_att = d.add_artifact(d.X_test[:200])
    res = {}
    for precision in ("float32", "bfloat16"):
        rr = GradientPenaltyCorrector(artifact_net, LAYER, penalty=1e4, max_epochs=1, lr=5e-3,
                                      optimizer=torch.optim.SGD, device="cpu", random_state=0,
                                      precision=precision).fit(X, y, c)
        proba = rr.predict_proba(d.X_test[:200])
        assert proba.dtype == np.float32
        sens = concept_sensitivity(rr, X_att, LAYER, rr.cav_, target=0)["mean_abs"]
        res[precision] = (rr.score(d.X_test[:200], d.y_test[:200]), sens)
    (acc32, s32), (acc16, s16) = res["float32"], res["bfloat16"]
    assert abs(acc16 - acc32) <= 0.05
    assert abs(s16 - s32) <= 0.25 * s32


def test_attribution_bfloat16_maps_close_to_float32(artifact_net, small):
    """Stated tolerance: mean per-map cosine >= 0.95 between bfloat16 and float32 LRP maps."""
    X = small[0][:16]
    a = attribute(artifact_net, X, target=0, device="cpu").reshape(16, -1)
    b = attribute(artifact_net, X, target=0, device="cpu", precision="bfloat16")
    assert b.dtype == np.float32
    b = b.reshape(16, -1)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.mean() >= 0.95
    with pytest.raises(ValueError, match="precision"):
        attribute(artifact_net, X, device="cpu", precision="float64")


def test_extractor_casts_the_weights_once_for_all_batches():
    # autocast's bfloat16 copies of the weights are made once per transform, not per batch
    from tests._nets import WeightCasts

    torch.manual_seed(0)
    net = SmallCNN()
    X = np.random.RandomState(0).rand(12, 3, 28, 28).astype(np.float32)
    counts = {}
    for batch_size in (12, 4, 1):
        ext = ActivationExtractor(net, LAYER, batch_size=batch_size, device="cpu",
                                  precision="bfloat16").fit(X[:2])
        with WeightCasts() as counted:
            ext.transform(X)
        counts[batch_size] = counted.n
    assert counts[12] > 0
    assert counts[4] == counts[1] == counts[12], counts
