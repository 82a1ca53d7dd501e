"""Fit RR-ClArC on a tiny network with an Accelerate accelerator and save the corrected
weights (run by tests/test_accelerate.py in one process, and in two with torchrun).

Run: python tests/_dp_fit.py OUT.pt   (or: torchrun --nproc_per_node 2 tests/_dp_fit.py OUT.pt)
"""

import sys

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch import nn

from skdebias import GradientPenaltyCorrector


def data(n=64, seed=0):
    rng = np.random.RandomState(seed)
    y = np.arange(n) % 2
    X = rng.normal(size=(n, 4)).astype("float32")
    X[:, 0] += 2 * y
    concept = (rng.rand(n) < 0.5).astype(int)
    X[:, 3] += 3 * concept
    return X, y, concept


def network():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def main(out):
    torch.set_num_threads(1)
    X, y, concept = data()
    # split_batches: every batch of 16 is shared out over the processes, so one process and
    # two see the same batches and take the same steps
    accelerator = Accelerator(
        dataloader_config=DataLoaderConfiguration(split_batches=True), cpu=True)
    corrector = GradientPenaltyCorrector(
        network(), layer="1", cav=np.eye(8, dtype="float32")[3], penalty=float(sys.argv[2]) if len(sys.argv) > 2 else 10.0,
        gradient_target="target", train_layers="all", max_epochs=3, lr=0.05, batch_size=16,
        optimizer=torch.optim.SGD, device="cpu", random_state=0,
        net_params={"accelerator": accelerator, "iterator_train__shuffle": False})
    corrector.fit(X, y)
    state = {k: v.detach().cpu() for k, v in corrector.module_.state_dict().items()}
    if accelerator.is_main_process:
        torch.save({"state": state, "processes": accelerator.num_processes,
                    "net": type(corrector.estimator_).__name__}, out)


if __name__ == "__main__":
    main(sys.argv[1])
