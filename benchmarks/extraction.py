"""ActivationExtractor throughput vs a raw hooked forward pass, and peak memory vs n.

Run: .venv/bin/python benchmarks/extraction.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np
import torch

from _common import SyntheticImages, emit, interleaved

from skdebias import ActivationExtractor
from skdebias.models import SmallCNN, torchvision_model


def raw_forward(module, layer, batches):
    """What a user writes by hand: a hook, a full no-grad forward, max pooling."""
    store = []
    handle = dict(module.named_modules())[layer].register_forward_hook(
        lambda m, i, o: store.append(o.detach().amax(dim=(2, 3))))
    module.eval()
    with torch.no_grad():
        for xb in batches:
            module(xb)
    handle.remove()
    return torch.cat(store).numpy()


def throughput(quick):
    configs = [("SmallCNN", SmallCNN(), "features.6", 28, 512, 128),
               ("resnet18", torchvision_model("resnet18", num_classes=10), "layer4", 64, 128, 64),
               ("resnet18", torchvision_model("resnet18", num_classes=10), "layer4", 128, 64, 32)]
    rows = []
    for name, module, layer, size, n, bs in configs:
        if quick:
            n = bs * 2
        X = np.random.RandomState(0).rand(n, 3, size, size).astype(np.float32)
        batches = [torch.as_tensor(X[i:i + bs]) for i in range(0, n, bs)]
        ext = ActivationExtractor(module, layer, batch_size=bs, device="cpu").fit(X[:2])
        a = ext.transform(X)
        b = raw_forward(module, layer, batches)
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5), "extractor disagrees with the raw forward"
        t = interleaved({"raw": lambda: raw_forward(module, layer, batches),
                         "extractor": lambda: ext.transform(X)}, repeats=3 if quick else 5)
        rows.append({"model": name, "px": size, "layer": layer, "n": n, "batch": bs,
                     "raw img/s": n / t["raw"], "extractor img/s": n / t["extractor"],
                     "ratio": t["raw"] / t["extractor"]})
    return rows


def rss_mb():
    """Current anonymous resident memory (RssAnon, Linux /proc) in MiB.

    File-backed pages of a memmap output are left out: the kernel can drop them
    at any time, so they are not RAM the extraction needs.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


class PeakRSS:
    """Samples the current RSS every 5 ms in a thread; ``peak`` is the maximum seen."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_mb(), False

        def sample():
            while not self._stop:
                self.peak = max(self.peak, rss_mb())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def memory_case(pooling, n):
    """One extraction in this process; prints a JSON line with its memory figures."""
    import json

    module = SmallCNN()
    data = SyntheticImages(n)
    ext = ActivationExtractor(module, "features.6", pooling=pooling, batch_size=256,
                              device="cpu").fit(data)
    out = None
    if pooling == "flatten":  # memmap output: the result never has to sit in RAM
        out = np.lib.format.open_memmap(f"/tmp/skdebias_bench_{n}.npy", mode="w+",
                                        dtype=np.float32, shape=(n, ext.n_features_out_))
    base = rss_mb()
    tracemalloc.start()
    with PeakRSS() as rss:
        res = ext.transform(data, out=out)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(json.dumps({"pooling": pooling, "n": n, "output": "RAM" if out is None else "memmap",
                      "output MB": res.nbytes / 2**20, "traced peak MB": peak / 2**20,
                      "RssAnon before MB": base, "peak RssAnon growth MB": rss.peak - base}))


def memory(quick):
    """Each case in a fresh interpreter, so max RSS belongs to that case alone."""
    import json
    import subprocess
    import sys

    rows = []
    sizes = (1_000, 5_000) if quick else (1_000, 10_000, 50_000)
    for pooling in ("max", "flatten"):
        for n in sizes:
            res = subprocess.run([sys.executable, __file__, "--memory-case", pooling, str(n)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--memory-case", nargs=2, metavar=("POOLING", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        memory_case(args.memory_case[0], int(args.memory_case[1]))
        return
    torch.manual_seed(0)
    t_rows = throughput(args.quick)
    emit("extraction_throughput", t_rows,
         "ActivationExtractor vs raw hooked forward (ratio = raw time / extractor time; target >= 0.9)")
    m_rows = memory(args.quick)
    emit("extraction_memory", m_rows,
         "Memory of transform vs n, one fresh process per row (flatten writes to a memmap)")


if __name__ == "__main__":
    main()
