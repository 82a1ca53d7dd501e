"""ClassArtifactCompensator (A-/P-ClArC) and its layers ConceptCompensation / CompensatedLayer."""

import copy
import io
import os
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV

from _nets import BNNet, blobs, state_copy
from skdebias import ActivationExtractor
from skdebias._utils._modules import get_module
from skdebias.correction import ClassArtifactCompensator, CompensatedLayer, ConceptCompensation
from skdebias.metrics import attacked_accuracy, concept_sensitivity

LAYER = "features.6"


@pytest.fixture(scope="module")
def pclarc_fitted(artifact_data, artifact_net):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    return ClassArtifactCompensator(artifact_net, LAYER, device="cpu").fit(d.X, d.y, c)


# ------------------------------------------------------- P-ClArC and A-ClArC on the artifact digits
def test_pclarc_closes_the_attacked_gap(pclarc_fitted, artifact_data, vanilla_scores):
    d = artifact_data
    clean = pclarc_fitted.score(d.X_test, d.y_test)
    attacked = attacked_accuracy(pclarc_fitted, d.X_test, d.y_test, d.add_artifact)
    gap_vanilla = vanilla_scores["clean"] - vanilla_scores["attacked"]
    assert gap_vanilla > 0.05  # the fixture network is a Clever Hans
    # most of the gap closes: float results differ between CPU kernels, so the bound is
    # relative (measured: 3.7 of 9.4 points left on one CPU, 5.2 of 10.7 on another)
    assert abs(clean - attacked) <= 0.6 * gap_vanilla
    assert attacked - vanilla_scores["attacked"] >= 0.3 * gap_vanilla
    assert clean >= vanilla_scores["clean"] - 0.05


def test_pclarc_moves_every_sample_to_the_clean_reference(pclarc_fitted, artifact_data):
    from skdebias.extraction import ActivationExtractor

    d = artifact_data
    X_att = d.add_artifact(d.X_test[:50])
    A = ActivationExtractor(pclarc_fitted.module_, LAYER, device="cpu").fit_transform(X_att)
    np.testing.assert_allclose(A @ pclarc_fitted.cav_, pclarc_fitted.mu_clean_, atol=1e-3)
    assert pclarc_fitted.mu_artifact_ > pclarc_fitted.mu_clean_
    # the uncompensated activations are still there, and the network ignores the CAV there
    s = concept_sensitivity(pclarc_fitted, X_att, pclarc_fitted.measure_layer_,
                            pclarc_fitted.cav_, target=0)
    assert s["mean_abs"] < 1e-6


def test_aclarc_fine_tunes_then_removes_the_shift(small, artifact_net, artifact_data,
                                                 vanilla_scores):
    X, y, c = small
    d = artifact_data
    ac = ClassArtifactCompensator(artifact_net, LAYER, mode="augmentative", max_epochs=2,
                                  lr=5e-3, optimizer=torch.optim.SGD, device="cpu",
                                  random_state=0).fit(X, y, c)
    assert not any(isinstance(m, (CompensatedLayer, ConceptCompensation))
                   for m in ac.module_.modules())
    before, after = state_copy(get_module(artifact_net)), state_copy(ac.module_)
    assert before.keys() == after.keys()
    torch.testing.assert_close(after["features.6.weight"], before["features.6.weight"])
    assert not torch.equal(after["classifier.0.weight"], before["classifier.0.weight"])
    # A-ClArC shows in the attacked accuracy, not in the gradient along the CAV (which stays
    # within ~2% of vanilla: the demo's sensitivity ratio is 0.98; which side of 1 it lands on
    # depends on the CPU's float kernels)
    gap = vanilla_scores["clean"] - vanilla_scores["attacked"]
    attacked = attacked_accuracy(ac, d.X_test, d.y_test, d.add_artifact)
    assert attacked - vanilla_scores["attacked"] >= 0.5 * gap
    assert ac.score(d.X_test, d.y_test) >= vanilla_scores["clean"] - 0.05
    assert ac.mu_artifact_ == pytest.approx(ac.reference_)


# ------------------------------------------------------------------ the compensation layer
def test_concept_compensation_formula():
    comp = ConceptCompensation([3.0, 4.0], reference=2.0)
    a = torch.randn(5, 2, 3, 3)
    out = comp(a)
    v = torch.tensor([0.6, 0.8])
    pooled = out.flatten(2).amax(2) @ v
    torch.testing.assert_close(pooled, torch.full((5,), 2.0))
    # only the CAV direction changes
    diff = (out - a).flatten(2)
    ortho = torch.tensor([0.8, -0.6])
    torch.testing.assert_close(torch.einsum("bcp,c->bp", diff, ortho), torch.zeros(5, 9),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="expects activations"):
        comp(torch.zeros(2, 3))


# ------------------------------------------------------------------ persistence
def test_pclarc_network_survives_pickle_deepcopy_save_and_skorch_params(pclarc_fitted,
                                                                        artifact_data, tmp_path):
    xb = torch.as_tensor(artifact_data.add_artifact(artifact_data.X_test[:8]))
    module = pclarc_fitted.module_
    module.eval()
    want = module(xb).detach()
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    for other in (pickle.loads(pickle.dumps(module)), copy.deepcopy(module),
                  torch.load(buf, weights_only=False)):
        torch.testing.assert_close(other.eval()(xb), want)
    # skorch save_params / load_params into a fresh net of the same structure
    path = os.path.join(tmp_path, "params.pt")
    pclarc_fitted.estimator_.save_params(f_params=path)
    fresh = clone(pclarc_fitted.estimator_).initialize()
    with torch.no_grad():
        fresh.module_.features[6].compensation.reference.fill_(0.0)
        fresh.module_.classifier[2].weight.zero_()
    fresh.load_params(f_params=path)
    np.testing.assert_allclose(fresh.predict_proba(xb.numpy()),
                               pclarc_fitted.predict_proba(xb.numpy()), rtol=1e-5, atol=1e-6)
    est = pickle.loads(pickle.dumps(pclarc_fitted))
    np.testing.assert_allclose(est.predict_proba(xb.numpy()),
                               pclarc_fitted.predict_proba(xb.numpy()), rtol=1e-6)


# ------------------------------------------------------------------ sklearn workflows
def test_grid_search_n_jobs_2():
    X, y, c = blobs(60)
    est = ClassArtifactCompensator(BNNet(), "body.2", cav=np.ones(8), device="cpu")
    search = GridSearchCV(est, {"reference": [0.0, 1.0]}, cv=2, n_jobs=2).fit(X, y)
    assert search.best_params_["reference"] in (0.0, 1.0)
    assert hasattr(search.best_estimator_, "estimator_")


# ------------------------------------------------------------------ P-ClArC over the flattened map
def test_concept_compensation_flatten_formula():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2 * 3 * 3, generator=g)
    comp = ConceptCompensation(v.numpy(), reference=1.5, pooling="flatten")
    a = torch.randn(5, 2, 3, 3, generator=g)
    out = comp(a)
    u = v / v.norm()
    torch.testing.assert_close(out.reshape(5, -1) @ u, torch.full((5,), 1.5))
    # a - a' is parallel to v: nothing orthogonal to it moves
    diff = (out - a).reshape(5, -1)
    torch.testing.assert_close(diff - (diff @ u)[:, None] * u, torch.zeros(5, 18),
                               atol=1e-5, rtol=0)
    assert "pooling='flatten'" in repr(comp)
    with pytest.raises(ValueError, match="18 values per sample"):
        comp(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="pooling"):
        ConceptCompensation(v.numpy(), pooling=None)


def test_concept_compensation_mean_pooling_moves_the_spatial_mean():
    v = torch.tensor([0.6, 0.8, 0.0])
    a = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    comp = ConceptCompensation(v.numpy(), reference=0.25, pooling="mean")
    out = comp(a)
    torch.testing.assert_close(out.mean(dim=(2, 3)) @ v, torch.full((4,), 0.25))
    # the max-pooled compensation does not reach the mean reference
    assert not torch.allclose(ConceptCompensation(v.numpy(), 0.25)(a).mean(dim=(2, 3)) @ v,
                              torch.full((4,), 0.25))


def test_pclarc_flatten_closes_the_gap_and_survives_pickle(artifact_data, artifact_net,
                                                           vanilla_scores):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    pc = ClassArtifactCompensator(artifact_net, LAYER, pooling="flatten", device="cpu").fit(
        d.X, d.y, c)
    maps = ActivationExtractor(artifact_net, LAYER, pooling=None, device="cpu").fit_transform(
        d.X[:2])
    n_dims = int(np.prod(maps.shape[1:]))
    assert pc.cav_.shape == (n_dims,) and n_dims > 64  # C x H x W, not C
    clean = pc.score(d.X_test, d.y_test)
    attacked = attacked_accuracy(pc, d.X_test, d.y_test, d.add_artifact)
    lost = vanilla_scores["clean"] - vanilla_scores["attacked"]
    # measured with avx512 / avx2 / default kernels: 1.5 / 1.7 / 1.9 points left of a 10.4-11.5
    # point vanilla gap (the max-pooled P-ClArC leaves 3.7-5.2): the documented 5-point target holds
    assert abs(clean - attacked) <= min(0.05, 0.35 * lost), (clean, attacked, lost)
    assert attacked - vanilla_scores["attacked"] >= 0.3 * lost
    again = pickle.loads(pickle.dumps(pc.module_))
    assert again.features[6].compensation.pooling == "flatten"
    xb = torch.as_tensor(d.X_test[:4])
    torch.testing.assert_close(again.eval()(xb), pc.module_.eval()(xb))


def test_pclarc_flatten_errors(artifact_data, artifact_net):
    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    with pytest.raises(ValueError, match="pooling"):
        ClassArtifactCompensator(artifact_net, LAYER, pooling="sum", device="cpu").fit(d.X, d.y, c)
    with pytest.raises(ValueError, match="flattened activations"):
        ClassArtifactCompensator(artifact_net, LAYER, cav=np.ones(64), reference=0.0,
                                 pooling="flatten", device="cpu").fit(d.X, d.y)
    pc = ClassArtifactCompensator(artifact_net, LAYER, pooling="flatten", device="cpu").fit(
        d.X[:200], d.y[:200], c[:200])
    with pytest.raises(ValueError, match="per-sample shape"):
        pc.predict(np.zeros((2, 3, 32, 32), np.float32))


def test_pclarc_that_costs_clean_accuracy_warns_naming_pooling(artifact_data, artifact_net):
    import warnings

    from skdebias.exceptions import CleanAccuracyWarning

    d = artifact_data
    c = np.where(d.y == 0, d.concept, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CleanAccuracyWarning)
        good = ClassArtifactCompensator(artifact_net, LAYER, device="cpu").fit(d.X, d.y, c)
    assert abs(good.clean_accuracy_change_) <= 0.05
    # a shift far beyond any activation moves every image
    v = np.random.RandomState(0).rand(64)
    bad = ClassArtifactCompensator(artifact_net, LAYER, cav=v, reference=-500.0, device="cpu")
    with pytest.warns(CleanAccuracyWarning, match=r"lowers the accuracy on 512 training samples "
                      r"not labelled with the concept from 0\.\d+ to 0\.\d+.*pooling='flatten'"):
        bad.fit(d.X, d.y, c)
    assert bad.clean_accuracy_change_ < -0.5
    aclarc = ClassArtifactCompensator(artifact_net, LAYER, mode="augmentative", max_epochs=1,
                                      device="cpu", random_state=0).fit(d.X[:200], d.y[:200],
                                                                          c[:200])
    assert aclarc.clean_accuracy_change_ is None
