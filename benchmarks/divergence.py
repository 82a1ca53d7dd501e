"""Can an RR-ClArC fit end broken without a word? A sweep over penalty and learning rate.

The timestamp-artifact digits of ``benchmarks/correction.py`` (SmallCNN, 8 epochs of Adam),
RR-ClArC at ``features.6`` with SGD (momentum 0.9) for 3 epochs, over penalty 1e-2 .. 1e7 and
lr 1e-4 .. 1e-2, with the default gradient clipping (``max_grad_norm=100``) and without it.
Each fit ends in one of:

- ``ok``: finite weights and clean accuracy above chance (0.2);
- ``DivergenceError``: the fit stopped with an error naming lr / penalty / max_grad_norm;
- ``SILENT``: finite or not, a fitted model at chance or with non-finite weights and no error
  (what must never happen).

Run: .venv/bin/python benchmarks/divergence.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from _common import emit, target_class_concept_labels

from skdebias import GradientPenaltyCorrector
from skdebias.datasets import make_artifact_digits
from skdebias.exceptions import DivergenceError
from skdebias.metrics import attacked_accuracy
from skdebias.models import SmallCNN, make_classifier

LAYER = "features.6"
PENALTIES = [1e-2, 1e0, 1e2, 1e4, 1e5, 1e7]
LRS = [1e-4, 1e-3, 2e-3, 1e-2]
CHANCE = 0.2  # ten classes: 0.1; a collapsed network predicts one class (~0.1)


def run(net, data, concept, penalty, lr, max_grad_norm, epochs):
    rr = GradientPenaltyCorrector(net, LAYER, penalty=penalty, lr=lr, max_epochs=epochs,
                                  optimizer=torch.optim.SGD, max_grad_norm=max_grad_norm,
                                  device="cpu", random_state=0)
    start = time.perf_counter()
    row = {"penalty": f"{penalty:g}", "lr": f"{lr:g}",
           "clipping": "off" if max_grad_norm is None else f"{max_grad_norm:g}"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rr.fit(data.X, data.y, concept_labels=concept)
    except DivergenceError as exc:
        row.update(outcome="DivergenceError", clean=np.nan, attacked=np.nan,
                   message=str(exc)[:120])
    else:
        finite = all(bool(torch.isfinite(p).all()) for p in rr.module_.parameters())
        clean = rr.score(data.X_test, data.y_test) if finite else np.nan
        attacked = attacked_accuracy(rr, data.X_test, data.y_test, data.add_artifact) \
            if finite else np.nan
        ok = finite and clean > CHANCE
        row.update(outcome="ok" if ok else "SILENT", clean=clean, attacked=attacked, message="")
    row["fit s"] = time.perf_counter() - start
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="three penalties, two lrs, 1 epoch")
    args = parser.parse_args(argv)
    penalties = [1e0, 1e5, 1e7] if args.quick else PENALTIES
    lrs = [1e-3, 1e-2] if args.quick else LRS
    epochs = 1 if args.quick else 3
    data = make_artifact_digits(artifact="timestamp", p=0.9, target_class=0, random_state=0)
    net = make_classifier(SmallCNN, max_epochs=8, lr=2e-3, device="cpu", random_state=0)
    net.fit(data.X, data.y)
    concept = target_class_concept_labels(data)
    rows = [run(net, data, concept, pen, lr, clip, epochs)
            for clip in (100.0, None) for lr in lrs for pen in penalties]
    silent = sum(r["outcome"] == "SILENT" for r in rows)
    emit("divergence", rows, columns=["clipping", "lr", "penalty", "outcome", "clean",
                                      "attacked", "fit s"],
         title=f"RR-ClArC sweep ({epochs} epochs of SGD): fits that ended broken without an "
               f"error: {silent} of {len(rows)}",
         extra={"silent_failures": silent, "epochs": epochs})
    return 1 if silent else 0


if __name__ == "__main__":
    raise SystemExit(main())
