"""Spuriosity ranking, spurious gap, low-spuriosity head fine-tuning and SpRAy on built-in data.

Protocol (per seed; the seed drives the data, the network and every split):

Colored digits (rho=0.95; colour spurious; both colouring modes):
  1. A vanilla SmallCNN is trained on the biased train split (20 epochs).
  2. The unbiased test split (colours uniform) is halved, stratified: *val* and *test*.
  3. ``propose_features`` ranks the penultimate features of each class on *val*; a simulated
     labeller looks at the 10 top-activating images of each proposed feature and picks the one
     whose images most often show the class's bias-aligned colour.
  4. ``SpuriosityRanker`` (fitted on the training features) scores *test*:
     "aligned>median" = share of bias-aligned samples above their class median.
  5. Gap = ``spurious_gap`` on *test* (k=10); accuracy on the biased (in-distribution, rho=0.95)
     and unbiased versions of the *test* digits.
  6. ``SpuriosityHeadFinetuner`` fine-tunes the head on the k=10 lowest-spuriosity training samples
     per class (early stop on the *val* gap < 0.1); ``baseline="random"`` takes 10 random samples.

Artifact digits (red patch in 30% of class 0):
  the same for class 0, with a *mixed* test set where a random half of the class-0 test images get
  the artifact; and SpRAy (LRP EpsilonPlusFlat) on the training images of class 0: number of
  clusters from the eigengap and adjusted Rand index of the clusters against the true concept labels.

Run: .venv/bin/python benchmarks/spuriosity.py [--quick] [--seeds 0 1 2]
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

from skdebias import ActivationExtractor, SpectralRelevanceAnalysis, SpuriosityRanker, propose_features
from skdebias.correction import SpuriosityHeadFinetuner
from skdebias.datasets import make_artifact_digits, make_colored_digits
from skdebias.metrics import spurious_gap
from skdebias.models import SmallCNN, make_classifier

K = 10


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
    return net.fit(X, y)


def finetune(net, ranker, X, y, val, seed, baseline=None):
    ft = SpuriosityHeadFinetuner(net, ranker=ranker, head="classifier.2", k=K, target_gap=0.1,
                                 baseline=baseline, max_epochs=300, lr=1e-3, device="cpu",
                                 random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        ft.fit(X, y, validation_data=val)
    return ft, time.perf_counter() - start


def colored_case(seed, mode, epochs):
    data = make_colored_digits(rho=0.95, mode=mode, random_state=seed)
    start = time.perf_counter()
    net = train_net(data.X, data.y, seed, epochs)
    train_s = time.perf_counter() - start
    vi, ti = train_test_split(np.arange(len(data.y_test)), test_size=0.5, stratify=data.y_test,
                              random_state=seed)
    ext = ActivationExtractor(net, "classifier.1", device="cpu").fit(data.X)
    A, A_unb = ext.transform(data.X), ext.transform(data.X_test)
    proposals = propose_features(A_unb[vi], data.y_test[vi], net.module_.classifier[2], top=5,
                                 n_images=10)
    ranker = SpuriosityRanker(spurious_features=labeller(proposals, data.concept_test[vi]))
    ranker.fit(A, data.y)
    y_t = data.y_test[ti]
    s_t = ranker.score_samples(A_unb[ti], y_t)
    above, n_aligned = aligned_above_median(s_t, y_t, data.concept_test[ti])
    X_t, X_tb = data.X_test[ti], data.X_test_biased[ti]
    val = (data.X_test[vi], data.y_test[vi])

    def measure(est):
        return (spurious_gap(y_t, est.predict(X_t), s_t, k=K), float(np.mean(est.predict(X_tb) == y_t)),
                float(np.mean(est.predict(X_t) == y_t)))

    gap0, accb0, accu0 = measure(net)
    ft, ft_s = finetune(net, ranker, data.X, data.y, val, seed)
    gap1, accb1, accu1 = measure(ft)
    rnd, _ = finetune(net, ranker, data.X, data.y, val, seed, baseline="random")
    gap2, accb2, accu2 = measure(rnd)
    return {
        "data": f"colored rho=0.95 {mode}", "seed": seed, "aligned>median": above,
        "n aligned": n_aligned, "gap vanilla": gap0, "gap low-k": gap1, "gap random-k": gap2,
        "gap ratio low-k": gap1 / gap0 if gap0 else float("nan"),
        "acc biased vanilla": accb0, "acc biased low-k": accb1, "acc biased random-k": accb2,
        "acc unbiased vanilla": accu0, "acc unbiased low-k": accu1, "acc unbiased random-k": accu2,
        "epochs low-k": ft.n_epochs_, "finetune s": ft_s, "train s": train_s,
    }


def artifact_case(seed, epochs):
    data = make_artifact_digits(target_class=0, p=0.3, artifact="patch", random_state=seed)
    start = time.perf_counter()
    net = train_net(data.X, data.y, seed, epochs)
    train_s = time.perf_counter() - start
    rng = np.random.RandomState(seed)
    # mixed test set: a random half of the class-0 test images carry the artifact
    X_mix, c_mix = data.X_test.copy(), np.zeros(len(data.y_test), dtype=np.int64)
    zeros = np.flatnonzero(data.y_test == 0)
    poison = rng.choice(zeros, size=len(zeros) // 2, replace=False)
    X_mix[poison] = data.add_artifact(data.X_test[poison])
    c_mix[poison] = 1
    vi, ti = train_test_split(np.arange(len(data.y_test)), test_size=0.5,
                              stratify=data.y_test + 10 * c_mix, random_state=seed)
    ext = ActivationExtractor(net, "classifier.1", device="cpu").fit(data.X)
    A, A_mix = ext.transform(data.X), ext.transform(X_mix)
    proposals = propose_features(A_mix[vi], data.y_test[vi], net.module_.classifier[2], top=5,
                                 n_images=10, classes=[0])
    ranker = SpuriosityRanker(spurious_features=labeller(proposals, c_mix[vi])).fit(A, data.y)
    s_train = ranker.score_samples(A, data.y)
    above_train, n_train = aligned_above_median(s_train[data.y == 0], data.y[data.y == 0],
                                                data.concept[data.y == 0])
    y_t = data.y_test[ti]
    s_t = ranker.score_samples(A_mix[ti], y_t)
    m0 = y_t == 0
    above_test, n_test = aligned_above_median(s_t[m0], y_t[m0], c_mix[ti][m0])
    gap0 = spurious_gap(y_t, net.predict(X_mix[ti]), s_t, k=K)
    attacked = float(np.mean(net.predict(data.add_artifact(data.X_test)) == data.y_test))
    clean = float(np.mean(net.predict(data.X_test) == data.y_test))
    start = time.perf_counter()
    spray = SpectralRelevanceAnalysis(net, classes=[0], method="lrp", composite="EpsilonPlusFlat",
                                      device="cpu", random_state=seed).fit(data.X, data.y)
    spray_s = time.perf_counter() - start
    idx0 = spray.indices_[0]
    ari = adjusted_rand_score(data.concept[idx0], spray.labels_[idx0])
    return {
        "data": "artifact patch p=0.3", "seed": seed, "aligned>median": above_test,
        "n aligned": n_test, "aligned>median train": above_train, "n aligned train": n_train,
        "gap vanilla": gap0, "acc clean": clean, "acc attacked": attacked,
        "spray clusters": spray.n_clusters_[0], "spray ARI": ari, "spray s": spray_s,
        "train s": train_s,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed only")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the colored-digits nets")
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.quick else args.seeds
    torch.set_num_threads(2)
    colored, artifact = [], []
    for seed in seeds:
        for mode in ("background", "foreground"):
            colored.append(colored_case(seed, mode, args.epochs))
        artifact.append(artifact_case(seed, epochs=8))
    cols = ["data", "seed", "aligned>median", "n aligned", "gap vanilla", "gap low-k",
            "gap random-k", "gap ratio low-k", "acc biased vanilla", "acc biased low-k",
            "acc biased random-k", "acc unbiased vanilla", "acc unbiased low-k",
            "acc unbiased random-k", "epochs low-k", "finetune s", "train s"]
    payload = emit("spuriosity", colored,
                   title="Spuriosity ranking, gap (k=10) and head fine-tuning (k=10 per class)",
                   columns=cols,
                   extra={"artifact": artifact, "seeds": seeds, "k": K,
                          "colored_epochs": args.epochs})
    print()
    from skdebias.report import format_table

    print(format_table(artifact, columns=["data", "seed", "aligned>median", "n aligned",
                                          "aligned>median train", "n aligned train", "gap vanilla",
                                          "acc clean", "acc attacked", "spray clusters",
                                          "spray ARI", "spray s"],
                       title="Artifact digits: ranking of class 0 and SpRAy", floatfmt=".3f"))
    return payload


if __name__ == "__main__":
    main()
