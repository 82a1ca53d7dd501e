"""skdebias._utils._accelerate: training estimators data-parallel through Accelerate."""

import copy
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import _dp_fit
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from skorch import NeuralNetClassifier
from skorch.hf import AccelerateMixin

from skdebias import GradientPenaltyCorrector
from skdebias._utils._accelerate import (
    accelerate_net,
    accelerated_class,
    user_accelerator,
)
from skdebias.correction._base import _CorrectionNet

# the data-parallel tests correct a small untrained network on purpose
pytestmark = pytest.mark.filterwarnings("ignore::skdebias.exceptions.UntrainedNetworkWarning")

HERE = Path(__file__).resolve().parent

#: Largest weight difference accepted between one process and two (float32 sums in
#: another order; measured 6e-8).
TOLERANCE = 1e-5


class AccNet(AccelerateMixin, NeuralNetClassifier):
    pass


def test_accelerate_net_without_accelerator_changes_nothing():
    kwargs = {"device": "cpu", "lr": 0.1}
    cls, out = accelerate_net(_CorrectionNet, None, dict(kwargs))
    assert cls is _CorrectionNet and out == kwargs


def test_accelerate_net_keeps_the_callers_accelerator():
    acc = Accelerator(cpu=True)
    user = AccNet(torch.nn.Linear(4, 2), accelerator=acc)
    assert user_accelerator(user) is acc
    assert user_accelerator(NeuralNetClassifier(torch.nn.Linear(4, 2))) is None
    cls, out = accelerate_net(_CorrectionNet, user, {"device": "cpu"})
    assert issubclass(cls, AccelerateMixin) and issubclass(cls, _CorrectionNet)
    assert out["accelerator"] is acc and out["device"] is None
    # one class per base class; an accelerated class is kept as it is
    assert accelerated_class(_CorrectionNet) is cls and accelerated_class(cls) is cls


def test_accelerated_corrector_pickles_and_matches_plain_training():
    X, y, _ = _dp_fit.data()
    cav = np.eye(8, dtype="float32")[3]
    params = dict(layer="1", cav=cav, penalty=10.0, gradient_target="target",
                  train_layers="all", max_epochs=2, lr=0.05, batch_size=16,
                  optimizer=torch.optim.SGD, device="cpu", random_state=0)
    shuffle = {"iterator_train__shuffle": False}
    plain = GradientPenaltyCorrector(_dp_fit.network(), net_params=shuffle, **params).fit(X, y)
    acc = GradientPenaltyCorrector(
        _dp_fit.network(), net_params={**shuffle, "accelerator": Accelerator(cpu=True)},
        **params).fit(X, y)
    assert isinstance(acc.estimator_, AccelerateMixin)
    assert not isinstance(plain.estimator_, AccelerateMixin)
    for (name, a), b in zip(plain.module_.state_dict().items(), acc.module_.state_dict().values()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=TOLERANCE, err_msg=name)
    again = pickle.loads(pickle.dumps(acc))
    np.testing.assert_array_equal(again.predict(X), acc.predict(X))
    assert type(copy.deepcopy(acc.estimator_)) is type(acc.estimator_)


def test_a_callers_accelerated_net_is_kept_by_the_corrector():
    X, y, _ = _dp_fit.data()
    user = AccNet(_dp_fit.network(), accelerator=Accelerator(cpu=True), max_epochs=1,
                  train_split=None, verbose=0).fit(X, y)
    corrector = GradientPenaltyCorrector(user, layer="1", cav=np.eye(8, dtype="float32")[3],
                                         max_epochs=1, device="cpu", random_state=0).fit(X, y)
    assert isinstance(corrector.estimator_, AccelerateMixin)
    assert corrector.estimator_.accelerator is user.accelerator


def _torchrun():
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_network_of_one(tmp_path):
    """RR-ClArC data-parallel on 2 CPU processes (gloo, torchrun) trains the same network as
    one process: every batch is shared out over the processes, gradients averaged."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    script = str(HERE / "_dp_fit.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, script, str(one)], check=True, env=env,
                   capture_output=True, timeout=120)
    for attempt in range(2):
        # one retry on a fresh port: on a loaded 2-core machine the rendezvous port can be taken
        # between choosing it and binding it, and gloo aborts the process group
        run = subprocess.run(
            _torchrun() + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(_free_port()), script, str(two)],
            env=env, capture_output=True, text=True, timeout=120)
        if run.returncode == 0:
            break
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = torch.load(one), torch.load(two)
    assert (a["processes"], b["processes"]) == (1, 2)
    start = _dp_fit.network().state_dict()
    moved = max(float((a["state"][k] - start[k]).abs().max()) for k in start)
    assert moved > 0.01  # the fit changed the network
    diff = max(float((a["state"][k] - b["state"][k]).abs().max()) for k in start)
    assert diff < TOLERANCE, diff


@pytest.mark.skipif(shutil.which("nvidia-smi") is None or not torch.cuda.is_available(),
                    reason="needs CUDA")
def test_accelerated_corrector_on_cuda():
    X, y, _ = _dp_fit.data()
    acc = GradientPenaltyCorrector(
        _dp_fit.network(), layer="1", cav=np.eye(8, dtype="float32")[3], max_epochs=1,
        device="auto", random_state=0, net_params={"accelerator": Accelerator()}).fit(X, y)
    assert next(acc.module_.parameters()).device.type == "cuda"


@pytest.mark.slow  # two processes each training a SmallCNN first: about 30 s
def test_scale_doc_script_on_two_processes(tmp_path):
    """The Accelerate script of docs/scale.md runs as written with torchrun on 2 CPU processes."""
    import re

    text = (HERE.parent / "docs" / "scale.md").read_text()
    script = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
              if "Accelerator(" in b][0]
    path = tmp_path / "correct.py"
    path.write_text(script)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(
        _torchrun() + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                       "--master_port", str(_free_port()), str(path), str(tmp_path / "rr.pt")],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    state = torch.load(tmp_path / "rr.pt")
    assert any(k.startswith("features") for k in state)


def test_accelerated_end_classifier_keeps_its_terms():
    from skdebias import EnDClassifier
    from skdebias.distributed import accelerated

    rng = np.random.RandomState(0)
    X = rng.normal(size=(64, 4)).astype("float32")
    y, bias = np.arange(64) % 2, (rng.rand(64) < 0.5).astype(int)
    kw = dict(layer="1", max_epochs=3, lr=0.1, batch_size=16, train_split=None, verbose=0,
              iterator_train__shuffle=False)
    weights = {}
    for name, cls, extra, terms in [
            ("plain", EnDClassifier, {}, 1.0),
            ("accelerated", accelerated(EnDClassifier), {"accelerator": Accelerator(cpu=True)},
             1.0),
            ("no terms", EnDClassifier, {}, 0.0)]:
        net = cls(_dp_fit.network(), alpha=terms, beta=terms, **extra, **kw).fit(X, y, bias=bias)
        weights[name] = torch.cat([p.detach().flatten() for p in net.module_.parameters()])
    assert float((weights["plain"] - weights["accelerated"]).abs().max()) < TOLERANCE
    assert float((weights["plain"] - weights["no terms"]).abs().max()) > 1e-4  # terms count
    with pytest.raises(TypeError, match="skorch NeuralNet class"):
        accelerated(torch.nn.Linear)
