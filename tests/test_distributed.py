"""skdebias.distributed: dask arrays in and out, activations to zarr, searches on a Dask
cluster (a LocalCluster of 2 worker processes, started once for this module)."""

import time
import warnings

import numpy as np
import pytest
import torch
from sklearn.model_selection import GridSearchCV, KFold, cross_validate
from torch import nn

from skdebias import (
    ActivationExtractor,
    ClassArtifactCompensator,
    GradientPenaltyCorrector,
)
from skdebias.distributed import setup_workers, transform_dask, write_activations

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
joblib = pytest.importorskip("joblib")


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def tabular():
    rng = np.random.RandomState(0)
    y = np.arange(60) % 2
    X = rng.normal(size=(60, 4)).astype("float32")
    X[:, 0] += 2 * y
    X[:, 3] += 3 * (rng.rand(60) < 0.5)
    return X, y


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).rand(40, 3, 8, 8).astype("float32")


@pytest.fixture(scope="module")
def extractor(images):
    return ActivationExtractor(conv_net(), layer="1", batch_size=8, device="cpu").fit(images)


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                       dashboard_address=None)
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()


def test_transform_of_a_dask_array_is_lazy_and_equal(extractor, images):
    X = da.from_array(images, chunks=(7, 3, 4, 8))
    A = extractor.transform(X)
    assert isinstance(A, da.Array)
    assert A.shape == (40, 4) and A.dtype == np.float32
    assert A.chunks[0] == X.chunks[0]  # rechunked along the other axes only
    # the fitted extractor is one node of the graph, shared by every chunk
    keys = [k if isinstance(k, str) else k[0] for k in dict(A.__dask_graph__())]
    assert sum(k.startswith("ActivationExtractor-") for k in keys) == 1
    assert sum(k.startswith("_extract_block-") for k in keys) == len(X.chunks[0])
    for scheduler in ("sync", "threads"):  # threads share the extractor: still equal
        np.testing.assert_allclose(A.compute(scheduler=scheduler), extractor.transform(images),
                                   rtol=1e-6, err_msg=scheduler)


def test_transform_dask_checks(extractor, images):
    with pytest.raises(ValueError, match="per-sample shape"):
        extractor.transform(da.from_array(images[:, :, :6, :6], chunks=10))
    with pytest.raises(ValueError, match="int16 images"):
        transform_dask(extractor, da.from_array((images * 100).astype("int16"), chunks=10))
    with pytest.raises(ValueError, match="out is not supported"):
        extractor.transform(da.from_array(images, chunks=10), out=np.empty((40, 4), "float32"))
    with pytest.raises(TypeError, match="dask array"):
        transform_dask(extractor, images)
    with pytest.raises(TypeError, match="fitted ActivationExtractor"):
        transform_dask(object(), da.from_array(images))


def test_uint8_dask_array_matches_float_input(extractor, images):
    raw = (images * 255).astype("uint8")
    with pytest.warns(UserWarning, match="uint8"):
        A = extractor.transform(da.from_array(raw, chunks=16))
    np.testing.assert_allclose(A.compute(scheduler="sync"),
                               extractor.transform(raw.astype("float32") / 255), rtol=1e-6)


def test_fit_on_a_dask_array(images):
    ext = ActivationExtractor(conv_net(), layer="1", device="cpu").fit(da.from_array(images))
    assert ext.output_shape_ == (4,) and ext.input_shape_ == (3, 8, 8)


def test_dask_cluster_extraction(client, extractor, images):
    settings = setup_workers(client, threads=1)
    assert len(settings) == 2
    assert all(s["threads"] == 1 and s["device"].startswith("cpu") for s in settings.values())
    # Dask's nanny starts the workers with MALLOC_TRIM_THRESHOLD_ set; glibc's limits raised
    import platform

    if platform.libc_ver()[0] == "glibc":
        assert all(s["keep_memory"] for s in settings.values())
    assert not any(s["keep_memory"] for s in setup_workers(client, keep_memory=False).values())
    with pytest.raises(TypeError, match="keep_memory must be True or False, got 'yes'"):
        setup_workers(client, keep_memory="yes")
    A = extractor.transform(da.from_array(images, chunks=10))
    np.testing.assert_allclose(A.compute(), extractor.transform(images), rtol=1e-6)


@pytest.mark.parametrize("kind", ["array", "uint8_memmap", "stream", "dask"])
def test_write_activations(kind, extractor, images, tmp_path):
    expected = extractor.transform(images)
    if kind == "array":
        X = images
    elif kind == "uint8_memmap":
        mm = np.memmap(tmp_path / "x.u8", dtype="uint8", mode="w+", shape=images.shape)
        mm[:] = (images * 255).astype("uint8")
        X = np.memmap(tmp_path / "x.u8", dtype="uint8", mode="r", shape=images.shape)
        expected = extractor.transform(np.asarray(X, dtype="float32") / 255)
    elif kind == "stream":  # an IterableDataset of unknown length
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                for x in images:
                    yield torch.as_tensor(x), 0
        X = Stream()
    else:
        X = da.from_array(images, chunks=9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        A = write_activations(extractor, X, str(tmp_path / "a.zarr"), chunk_size=12)
    assert A.shape == (40, 4) and A.chunks == (12, 4)
    np.testing.assert_allclose(A[:], expected, rtol=1e-6)
    again = zarr.open_array(str(tmp_path / "a.zarr"), mode="r")
    np.testing.assert_allclose(again[:], expected, rtol=1e-6)


def test_write_activations_refuses_to_overwrite(extractor, images, tmp_path):
    write_activations(extractor, images, str(tmp_path / "a.zarr"))
    with pytest.raises(Exception, match="(?i)exist|contains"):
        write_activations(extractor, images, str(tmp_path / "a.zarr"))
    A = write_activations(extractor, images[:10], str(tmp_path / "a.zarr"), overwrite=True)
    assert A.shape == (10, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        write_activations(extractor, images, str(tmp_path / "b.zarr"), chunk_size=0)


def test_grid_search_and_cross_validate_on_a_dask_cluster(client):
    X, y = tabular()
    cav = np.eye(8, dtype="float32")[3]
    search = GridSearchCV(
        GradientPenaltyCorrector(mlp(), layer="1", cav=cav, max_epochs=2, lr=0.05,
                                 device="auto", random_state=0),
        {"penalty": [0.1, 10.0]}, cv=KFold(2))
    with joblib.parallel_backend("dask"):
        search.fit(X, y)
    local = GridSearchCV(search.estimator, search.param_grid, cv=KFold(2)).fit(X, y)
    np.testing.assert_allclose(search.cv_results_["mean_test_score"],
                               local.cv_results_["mean_test_score"])
    clarc = ClassArtifactCompensator(mlp(), layer="1", cav=cav, reference=0.0, device="auto")
    with joblib.parallel_backend("dask"):
        scores = cross_validate(clarc, X, y, cv=KFold(2))["test_score"]
    np.testing.assert_allclose(scores, cross_validate(clarc, X, y, cv=KFold(2))["test_score"])


@pytest.mark.slow
def test_grid_search_on_ray():
    ray = pytest.importorskip("ray")
    from ray.util.joblib import register_ray

    X, y = tabular()
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        register_ray()
        search = GridSearchCV(
            GradientPenaltyCorrector(mlp(), layer="1", cav=np.eye(8, dtype="float32")[3],
                                     max_epochs=1, device="auto", random_state=0),
            {"penalty": [0.1, 10.0]}, cv=KFold(2))
        with joblib.parallel_backend("ray"):
            search.fit(X, y)
        assert len(search.cv_results_["mean_test_score"]) == 2
    finally:
        ray.shutdown()
    assert time.perf_counter() - start < 300


# ------------------------------------------------------------------ docs/scale.md
def scale_blocks():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "scale.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.slow  # a second cluster and a small search: about a minute on 2 busy cores
def test_scale_recipes_run_as_written():
    """The laptop and Dask recipes of docs/scale.md, in order, in one namespace (the
    Accelerate script is run by tests/test_accelerate.py)."""
    import sklearn

    blocks = scale_blocks()
    assert len(blocks) == 6 and "Accelerator" in blocks[5]
    ns = {"__name__": "__docs__"}
    with warnings.catch_warnings(), sklearn.config_context(enable_metadata_routing=False):
        warnings.simplefilter("ignore")
        for i, block in enumerate(blocks[:5]):
            exec(compile(block, f"docs/scale.md [python block {i}]", "exec"), ns)
    assert ns["acts"].shape == (600, ns["extractor"].n_features_out_)
    assert ns["search"].best_params_["penalty"] in (10.0, 1e4)
    assert ns["A_lazy"].__class__.__name__ == "Array"
    assert callable(ns["slurm_cluster"]) and callable(ns["kubernetes_cluster"])
