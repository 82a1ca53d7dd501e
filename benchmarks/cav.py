"""Fit time and alignment of every CAV method, with a GridSearchCV-tuned LinearSVC as reference.

The reference column follows the RR-ClArC reference recipe: LinearSVC, class-balanced weights, no
intercept, C tuned over 1e-5 .. 1e4 by 3-fold GridSearchCV. Alignment = cos(cav, v_true) on synthetic
activations with a known direction (correlated distractor noise), and cos(mean d, cav) on artifact
digits, d = a(x + artifact) - a(x).

Run: .venv/bin/python benchmarks/cav.py [--quick]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV
from sklearn.svm import LinearSVC

from _common import emit

from skdebias import CAVEstimator, cav_alignment

METHODS = ("pattern", "mean_diff", "svm", "ridge", "lasso", "logistic")


def reference_svm_cav(A, t, seed=0):
    search = GridSearchCV(
        LinearSVC(class_weight="balanced", fit_intercept=False, random_state=seed, max_iter=2000),
        {"C": np.logspace(-5, 4, 10)}, cv=3, n_jobs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(A - A.mean(0), t)
    w = search.best_estimator_.coef_.ravel()
    return w / np.linalg.norm(w), search.best_params_["C"]


def synthetic(n, d, seed=0, correlation=0.6, distractor=2.0):
    rng = np.random.RandomState(seed)
    v = rng.randn(d)
    v /= np.linalg.norm(v)
    u = rng.randn(d)
    u -= (u @ v) * v
    u /= np.linalg.norm(u)
    direction = correlation * v + np.sqrt(1 - correlation ** 2) * u
    t = rng.randint(0, 2, n)
    A = (t[:, None] * v + distractor * rng.randn(n, 1) * direction + 0.3 * rng.randn(n, d))
    return A.astype(np.float32), t, v


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_case(label, A, t, score, seed=0):
    row = {"data": label, "n": A.shape[0], "d": A.shape[1]}
    (ref, best_c), ref_s = timed(lambda: reference_svm_cav(A, t, seed))
    row["ref GS-SVM s"] = ref_s
    row["ref align"] = score(ref)
    row["ref C"] = best_c
    for m in METHODS:
        kw = {"alpha": 1e-3} if m == "lasso" else {}
        est, sec = timed(lambda: CAVEstimator(method=m, random_state=seed, **kw).fit(A, t))
        row[f"{m} align"] = score(est.cav_)
        row[f"{m} ms"] = 1000 * sec
    row["pattern speed-up vs ref"] = ref_s / (row["pattern ms"] / 1000)
    return row


def artifact_case(seed=0, epochs=6):
    from skdebias import ActivationExtractor
    from skdebias.datasets import make_artifact_digits
    from skdebias.models import SmallCNN, make_classifier

    data = make_artifact_digits(target_class=0, p=0.3, random_state=seed)
    net = make_classifier(SmallCNN, max_epochs=epochs, lr=2e-3, device="cpu",
                          random_state=seed).fit(data.X, data.y)
    ext = ActivationExtractor(net, "features.6").fit(data.X)
    in_class = data.y == data.target_class  # artifact vs clean images of the same digit
    A = ext.transform(data.X[in_class])
    A_clean, A_art = ext.transform(data.X_test), ext.transform(data.add_artifact(data.X_test))
    return A, data.concept[in_class], lambda cav: cav_alignment(cav, A_art, A_clean)["cos_mean_diff"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    cases = [(500, 64), (2000, 512)] if args.quick else \
        [(500, 64), (5000, 64), (20000, 64), (2000, 512), (1000, 4096)]
    rows = []
    for n, d in cases:
        A, t, v = synthetic(n, d)
        rows.append(run_case("synthetic", A, t, lambda cav, v=v: float(cav @ v)))
    A, t, score = artifact_case()
    rows.append(run_case("artifact digits (class 0)", A, t, score))
    cols = ["data", "n", "d", "ref GS-SVM s", "ref C", "ref align"] + \
        [f"{m} align" for m in METHODS] + [f"{m} ms" for m in METHODS] + ["pattern speed-up vs ref"]
    emit("cav", rows, "CAV methods: alignment with the true direction and fit time "
         "(target: pattern >= 50x faster than the reference at equal or better alignment)",
         columns=cols)


if __name__ == "__main__":
    main()
