"""How strongly a SmallCNN takes each artifact as a shortcut (the Clever-Hans precondition).

For every artifact type and seed: train SmallCNN (8 epochs, Adam 2e-3) on artifact digits with the
artifact in p = 0.3 of class 0, then report clean test accuracy, accuracy on the attacked test set
(artifact added to every test image) and the share of attacked non-target images predicted as the
target class.

Run: .venv/bin/python benchmarks/artifact_strength.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import emit

from skdebias.datasets import ARTIFACTS, make_artifact_digits
from skdebias.models import SmallCNN, make_classifier


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    seeds = (0,) if args.quick else (0, 1, 2)
    rows = []
    for artifact in ARTIFACTS:
        for seed in seeds:
            data = make_artifact_digits(target_class=0, p=0.3, artifact=artifact, random_state=seed)
            net = make_classifier(SmallCNN, max_epochs=8, lr=2e-3, device="cpu",
                                  random_state=seed).fit(data.X, data.y)
            clean = float(np.mean(net.predict(data.X_test) == data.y_test))
            pred_att = net.predict(data.add_artifact(data.X_test))
            other = data.y_test != 0
            rows.append({"artifact": artifact, "seed": seed, "clean acc": clean,
                         "attacked acc": float(np.mean(pred_att == data.y_test)),
                         "points lost": 100 * (clean - float(np.mean(pred_att == data.y_test))),
                         "non-target -> target": float(np.mean(pred_att[other] == 0))})
    emit("artifact_strength", rows, "Clever-Hans strength per artifact (p=0.3 of class 0, SmallCNN)")


if __name__ == "__main__":
    main()
