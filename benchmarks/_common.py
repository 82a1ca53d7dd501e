"""Shared helpers for the benchmark scripts (timing, output paths, synthetic data)."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, os.path.dirname(HERE))

from skdebias.report import environment, format_table, mean_std, write_json  # noqa: E402

__all__ = ["interleaved", "result_path", "SyntheticImages", "emit", "environment", "format_table",
           "target_class_concept_labels"]


def interleaved(funcs, repeats=5, warmup=1, times=None):
    """Median wall time per callable, repetitions interleaved so machine noise hits all alike
    (``times``: a dict that receives every repetition's time per callable)."""
    for _ in range(warmup):
        for fn in funcs.values():
            fn()
    times = {} if times is None else times
    times.update({name: [] for name in funcs})
    for _ in range(repeats):
        for name, fn in funcs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(times[name])) for name in funcs}


def result_path(name):
    return os.path.join(RESULTS, f"{name}.json")


def emit(name, rows, title, columns=None, extra=None, floatfmt=".3f"):
    """Print a table and write it (with the environment) to benchmarks/results/<name>.json."""
    print(format_table(rows, columns=columns, title=title, floatfmt=floatfmt))
    print()
    payload = {"benchmark": name, "rows": rows, "environment": environment(), **(extra or {})}
    path = write_json(result_path(name), payload)
    print(f"wrote {os.path.relpath(path, os.path.dirname(HERE))}")
    return payload


def target_class_concept_labels(data):
    """Artifact labels (0/1) within the artifact's target class, -1 for every other image.

    With -1 the correctors leave an image out of the CAV fit, so the CAV separates
    artifact from clean images of one digit and not that digit from the others.

    Parameters
    ----------
    data : Bunch
        From ``skdebias.datasets.make_artifact_digits`` (``y``, ``concept``,
        ``target_class``).

    Returns
    -------
    ndarray of shape (n_samples,), int64
    """
    concept = np.asarray(data.concept).astype(np.int64)
    return np.where(np.asarray(data.y) == data.target_class, concept, -1)


class SyntheticImages(torch.utils.data.Dataset):
    """Images generated on the fly from their index: memory does not grow with n."""

    def __init__(self, n, size=28, channels=3):
        self.n, self.size, self.channels = n, size, channels

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(int(i))
        return torch.rand(self.channels, self.size, self.size, generator=g)


def seed_summary(per_seed, rhos, methods, columns):
    """One row per (rho, method) that ran: ``"mean ± std"`` over the seeds of each column, and
    ``"runs"`` (the seed rows, for extra columns)."""
    table = []
    for rho in rhos:
        for method in methods:
            rs = [r for r in per_seed if r["rho"] == rho and r["method"] == method]
            if rs:
                table.append({"rho": rho, "method": method, "runs": rs,
                              **{c: mean_std([r[c] for r in rs]) for c in columns}})
    return table


def timed(fn):
    """``(fn(), seconds)``."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def colour_scores(net, data):
    """Biased / unbiased test accuracy, the counterfactual bias and the prediction flip rate
    (on the test images whose colour the recolouring changes) of ``net`` on a coloured-digits
    bunch."""
    from skdebias.metrics import counterfactual_bias, counterfactual_flip_rate

    m = data.bias_test_biased != data.bias_test
    return {
        "biased_acc": float(np.mean(net.predict(data.X_test_biased) == data.y_test)),
        "unbiased_acc": float(np.mean(net.predict(data.X_test) == data.y_test)),
        "cf_bias": counterfactual_bias(net, data.X_test_biased[m], data.X_test[m], data.y_test[m]),
        "cf_flip": counterfactual_flip_rate(net, data.X_test_biased[m], data.X_test[m]),
    }


def epoch_selection(data, selection, dirname, with_bias=False):
    """skorch arguments of the epoch selection: the unbiased validation split and a checkpoint
    of the best validation accuracy, loaded at the end of training (``"valid"``), or none."""
    from skorch.callbacks import Checkpoint
    from skorch.dataset import Dataset
    from skorch.helper import predefined_split

    if selection == "last":
        return {"train_split": None}
    X_val = {"X": data.X_val, "bias": data.bias_val} if with_bias else data.X_val
    return {"train_split": predefined_split(Dataset(X_val, data.y_val)),
            "callbacks": [Checkpoint(monitor="valid_acc_best", load_best=True, dirname=dirname,
                                     f_optimizer=None, f_criterion=None, f_history=None)]}


def kept_epoch(net):
    """The epoch kept: the best validation accuracy, or the last one without validation."""
    if "valid_acc" not in net.history[-1]:
        return len(net.history)
    return int(np.argmax(net.history[:, "valid_acc"])) + 1


def recording(category, fn):
    """``fn()`` and whether it issued a warning of ``category``; for a tuple of categories,
    the sorted names of those it issued (an empty list when none)."""
    import warnings

    categories = category if isinstance(category, tuple) else (category,)
    with warnings.catch_warnings(record=True) as caught:
        for c in categories:
            warnings.simplefilter("always", c)
        out = fn()
    names = sorted({c.__name__ for c in categories
                    if any(issubclass(w.category, c) for w in caught)})
    return out, (names if isinstance(category, tuple) else bool(names))
