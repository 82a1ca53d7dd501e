"""Scaling out: Dask workers for extraction and for a grid search, and memory when extracting
from inputs larger than the batch.

1. Extraction throughput (images/s) of ``ActivationExtractor.transform`` on a dask array with 1
   and with 2 Dask worker processes (``LocalCluster``, one thread each; the images are made
   on the workers, so no input travels from this process).
2. ``GridSearchCV`` of 4 RR-ClArC fits (2 penalties x 2 folds, ``refit=False``: a refit would
   be a fifth fit, on all the data, in this process): sequential in this process vs joblib's Dask backend on 1 and on 2 worker
   processes (after a small warm-up search on the workers). With ``--quick`` the fits are so
   short that scheduling and sending the network dominate: no speed-up is expected there.
3. Peak growth of anonymous memory (RssAnon) while extracting (max-pooled output) from a uint8
   memmap of 1.2 GB, a uint8 tensor over the same file and a DataLoader over that tensor, with
   the largest difference from the activations of the float32 images.

Every process (this one and each worker) runs torch with one intra-op thread, so that the 1- and
2-process runs are compared fairly. ``--device cuda`` runs the workers on CUDA (one worker per
GPU; with one GPU the 2-worker rows share it). Prints a table, writes
benchmarks/results/scale_out.json.

Run: .venv/bin/python benchmarks/scale_out.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import warnings

import numpy as np
import torch
from _common import emit, format_table
from torch import nn

from skdebias import ActivationExtractor, GradientPenaltyCorrector, setup_workers
from skdebias.datasets import make_artifact_digits
from skdebias.models import SmallCNN, make_classifier
from skdebias.report import peak_memory_growth


def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU())


def cluster(n_workers, device):
    """A LocalCluster of ``n_workers`` processes (1 thread each), set up and warmed: torch with
    one thread (and its own GPU), skdebias imported, before anything is timed."""
    import importlib

    from dask.distributed import Client, LocalCluster

    c = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                     dashboard_address=None)
    client = Client(c)
    client.wait_for_workers(n_workers)
    setup_workers(client, threads=1, gpus="auto" if device == "cuda" else 0)
    client.run(importlib.import_module, "skdebias.correction")
    return c, client


def extraction_rows(n, device, worker_counts):
    import dask.array as da

    shape = (3, 64, 64)
    ext = ActivationExtractor(conv_net(), layer="5", batch_size=64, device="cpu")
    ext.fit(np.zeros((1, *shape), np.float32))
    if device == "cuda":
        ext.set_params(device="auto")  # each worker resolves it to its own GPU
    rows, base = [], None
    for k in worker_counts:
        c, client = cluster(k, device)
        try:
            X = da.random.RandomState(0).random_sample((n, *shape), chunks=(256, *shape))
            X = X.astype(np.float32)
            ext.transform(X[:512 * k]).sum().compute()  # the network reaches every worker
            start = time.perf_counter()
            ext.transform(X).sum().compute()
            seconds = time.perf_counter() - start
        finally:
            client.close()
            c.close()
        base = base or seconds
        rows.append({"part": "extraction", "setting": f"dask, {k} worker(s), {device}",
                     "size": f"{n} x 3x64x64", "seconds": seconds, "rate_per_s": n / seconds,
                     "speedup": base / seconds, "memory_MB": None, "max_abs_diff": None})
    return rows


def search_rows(n, epochs, device, worker_counts):
    import joblib
    from sklearn.model_selection import GridSearchCV, KFold

    data = make_artifact_digits(target_class=0, p=0.3, random_state=0)
    X, y = data.X[:n], data.y[:n]
    n = len(X)
    c = np.where(y == 0, data.concept[:n], -1)
    net = make_classifier(SmallCNN, max_epochs=6, lr=2e-3, device="cpu", random_state=0).fit(X, y)
    dev = "auto" if device == "cuda" else "cpu"

    def search():
        return GridSearchCV(
            GradientPenaltyCorrector(net, layer="features.6", max_epochs=epochs, lr=1e-3,
                                     device=dev, random_state=0),
            {"penalty": [1.0, 100.0]}, cv=KFold(2), refit=False, error_score="raise")

    rows = []
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        local = search().fit(X, y, concept_labels=c)
        base = time.perf_counter() - start
    finally:
        torch.set_num_threads(before)
    rows.append({"part": "grid search (4 RR-ClArC fits)", "setting": f"sequential, {device}",
                 "size": f"{n} images, {epochs} epochs", "seconds": base,
                 "rate_per_s": 4 / base, "speedup": 1.0, "memory_MB": None,
                 "max_abs_diff": None})
    for k in worker_counts:
        c_, client = cluster(k, device)
        try:
            with joblib.parallel_backend("dask"):
                # a small search first: the first fit of each worker pays one-off costs
                search().fit(X[:200], y[:200], concept_labels=c[:200])
                start = time.perf_counter()
                found = search().fit(X, y, concept_labels=c)
                seconds = time.perf_counter() - start
        finally:
            client.close()
            c_.close()
        diff = float(np.max(np.abs(found.cv_results_["mean_test_score"]
                                   - local.cv_results_["mean_test_score"])))
        rows.append({"part": "grid search (4 RR-ClArC fits)",
                     "setting": f"dask, {k} worker(s), {device}",
                     "size": f"{n} images, {epochs} epochs", "seconds": seconds,
                     "rate_per_s": 4 / seconds, "speedup": base / seconds, "memory_MB": None,
                     "max_abs_diff": diff})
    return rows


def memory_rows(size_bytes, device):
    shape = (3, 64, 64)
    n = size_bytes // int(np.prod(shape))
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "images.u8")
    mm = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, *shape))
    for start in range(0, n, 4096):
        stop = min(n, start + 4096)
        mm[start:stop] = np.random.RandomState(start).randint(0, 256, (stop - start, *shape))
    mm.flush()
    del mm
    X = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, *shape))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU())
    ext = ActivationExtractor(net, "1", batch_size=256, device=device)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ext.fit(X[:2])
        check = slice(0, n, max(1, n // 199))
        expected = ext.transform(np.asarray(X[check], dtype=np.float32) / 255)
        inputs = {"uint8 memmap": lambda: X, "uint8 tensor": lambda: torch.from_numpy(X),
                  "DataLoader": lambda: torch.utils.data.DataLoader(
                      torch.utils.data.TensorDataset(torch.from_numpy(X)))}
        for name, make in inputs.items():
            gc.collect()
            start = time.perf_counter()
            A, growth = peak_memory_growth(lambda make=make: ext.transform(make()))
            seconds = time.perf_counter() - start
            rows.append({"part": "memory", "setting": f"{name}, {device}",
                         "size": f"{size_bytes / 2**30:.2f} GB ({n} x 3x64x64)",
                         "seconds": seconds, "rate_per_s": n / seconds, "speedup": None,
                         "memory_MB": growth / 2**20,
                         "max_abs_diff": float(np.abs(A[check] - expected).max())})
            del A
    os.remove(path)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")
    torch.set_num_threads(1)
    n_gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    workers = sorted({1, 2, max(1, n_gpus)})
    if args.quick:
        n_ext, n_search, epochs, mem = 1024, 400, 1, 200 * 2**20
    else:
        n_ext, n_search, epochs, mem = 8192, 1257, 20, int(1.2 * 2**30)
    rows = []
    for part in (lambda: extraction_rows(n_ext, args.device, workers),
                 lambda: search_rows(n_search, epochs, args.device, workers),
                 lambda: memory_rows(mem, args.device)):
        done = part()
        rows += done
        # each part as it ends, so that a run stopped by a time limit still shows what it did
        print(format_table(done, floatfmt=".3g"), flush=True)
    note = ("torch runs with 1 intra-op thread in this process and in every Dask worker "
            "(LocalCluster, processes, 1 thread each), for a fair 1- vs 2-process comparison; "
            f"{os.cpu_count()} CPU cores; GPUs: {n_gpus}")
    print(note)
    emit("scale_out", rows, title="Scaling out: Dask workers and memory",
         columns=["part", "setting", "size", "seconds", "rate_per_s", "speedup", "memory_MB",
                  "max_abs_diff"],
         extra={"quick": args.quick, "device": args.device, "note": note})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
