"""CUDA path check: the same numbers on the GPU as on the CPU, and the time each takes.

Skipped (exit 0, JSON says so) on machines without CUDA. With a GPU it compares, for SmallCNN on
artifact digits: activation extraction (max abs difference, CAV cosine), one
GradientPenaltyCorrector fit (test accuracy; timed after a warm-up fit, so CUDA start-up is not
counted) and one RR-ClArC training step vs a plain cross-entropy step on each device (the ratio
bounded by 2.5 on the CPU).

Run: .venv/bin/python benchmarks/cuda_check.py [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import emit, interleaved
from correction import step_functions

from skdebias import ActivationExtractor, CAVEstimator, GradientPenaltyCorrector
from skdebias.datasets import make_artifact_digits
from skdebias.models import SmallCNN, make_classifier, torchvision_model


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("No CUDA device: CUDA path check skipped.")
        emit("cuda_check", [], "CUDA path check", extra={"skipped": "no CUDA device"})
        return
    data = make_artifact_digits(target_class=0, p=0.3, random_state=0)
    net = make_classifier(SmallCNN, max_epochs=4, lr=2e-3, device="cpu", random_state=0).fit(data.X, data.y)
    rows = []
    acts = {}
    for device in ("cpu", "cuda"):
        ext = ActivationExtractor(net, "features.6", batch_size=256, device=device).fit(data.X[:2])
        ext.transform(data.X[:256])  # warm-up
        acts[device], sec = timed(lambda: ext.transform(data.X))
        rows.append({"step": f"extraction of {len(data.X)} images (s)", "device": device,
                     "value": sec})
    in_class = data.y == 0
    cavs = {d: CAVEstimator().fit(a[in_class], data.concept[in_class]).cav_ for d, a in acts.items()}
    diff = float(np.abs(acts["cpu"] - acts["cuda"]).max())
    # float32 convolutions on CUDA follow torch.backends.cudnn.allow_tf32 (on by default)
    rel = diff / float(np.abs(acts["cpu"]).max())
    cos = float(cavs["cpu"] @ cavs["cuda"])
    rows.append({"step": "extraction max |cpu - cuda|", "device": "-", "value": diff})
    rows.append({"step": "extraction max |cpu - cuda| / max |cpu|", "device": "-", "value": rel})
    rows.append({"step": "pattern CAV cos(cpu, cuda)", "device": "-", "value": cos})
    for device in ("cpu", "cuda"):
        corr = GradientPenaltyCorrector(net, layer="features.6", penalty=10.0, max_epochs=1,
                                        device=device, random_state=0)
        corr.fit(data.X[:256], data.y[:256], concept_labels=data.concept[:256])  # warm-up
        _, sec = timed(lambda: corr.fit(data.X, data.y, concept_labels=data.concept))
        rows.append({"step": "RR-ClArC fit, 1 epoch (s)", "device": device, "value": sec,
                     "test acc": float(np.mean(corr.predict(data.X_test) == data.y_test))})
    configs = [("SmallCNN 28 px", SmallCNN, "features.6", 28, 64)]
    if not args.quick:
        configs.append(("resnet18 64 px", lambda: torchvision_model("resnet18"), "layer3", 64, 64))
        configs.append(("resnet18 128 px", lambda: torchvision_model("resnet18"), "layer3", 128,
                        128))
    for name, make, layer, size, batch in configs:
        for device in ("cpu", "cuda"):
            t = interleaved(step_functions(make(), layer, size, batch=batch, device=device),
                            repeats=10, warmup=3)
            rows.append({"step": f"train step {name}, batch {batch}: RR / CE", "device": device,
                         "value": t["RR-ClArC"] / t["plain CE"],
                         "plain CE ms": 1000 * t["plain CE"], "RR-ClArC ms": 1000 * t["RR-ClArC"]})
    emit("cuda_check", rows, f"CUDA path check on {torch.cuda.get_device_name(0)}",
         extra={"max_abs_diff": diff, "max_relative_diff": rel, "cav_cos": cos,
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32})
    assert rel < 5e-3 and cos > 0.999, "CPU and CUDA disagree"


if __name__ == "__main__":
    main()
