"""SpRAy over many seeds of the zoo: how often its clusters match a local artifact.

Configuration (why): each zoo network of ``robustness.py`` trained the same way (``TRAIN``) on
``make_artifact_digits`` with a patch or a timestamp in ``P_ARTIFACT`` of class 0, one network per
seed. On each, ``SpectralRelevanceAnalysis`` with its defaults analyses the training images of
class 0, once per LRP composite in ``COMPOSITES`` (the default ``"EpsilonPlus"``, and
``"EpsilonPlusFlat"``, which differs in the first layer only). A run *applies* when the artifact
holds at least 10 % of the relevance on the artifact images (``artifact_relevance`` with its
defaults, the yardstick of ``robustness.py``) and *meets* the target when SpRAy finds at least
2 clusters with ARI >= 0.8 against the artifact labels. ``WeakClustersWarning`` is recorded per
run. Three seeds per row, as in ``robustness.py``, say little about a criterion judged run by
run: this benchmark counts over many.

Next to the defaults, SpRAy as its authors' analysis software runs it (``reference_spray`` in
``robustness.py``: full-resolution maps of the default composite divided by their sum, a
32-neighbour graph, k-means on 32 eigenvectors; k by the eigengap, and 2 clusters) on the same
maps: a baseline, as the warning columns do not apply to it.

Rows: per network, artifact and variant (composite, or the authors' recipe), the runs, the runs
that apply, the runs that meet the target among them, the misses that warned, and the runs that
matched the artifact but warned. A last table counts the runs where the two composites disagree.

Usage::

    python benchmarks/spray_seeds.py              # 4 networks x 2 artifacts x seeds 0-39
    python benchmarks/spray_seeds.py --archs small_cnn --seeds $(seq 0 39) --jobs 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import emit, format_table
from robustness import ARCHS, reference_spray, relevance_share, spray_row, train_on_artifact
from skdebias.models import make_zoo_model

ARTIFACTS = ("patch", "timestamp")
COMPOSITES = ("EpsilonPlus", "EpsilonPlusFlat")
MIN_SHARE = 0.10
REFERENCE = "authors' recipe"
VARIANTS = (*COMPOSITES, f"{REFERENCE} (eigengap)", f"{REFERENCE} (2 clusters)")


def run_seed(arch, artifact, seed, device="cpu"):
    """One network: the relevance share and, per variant, SpRAy's clusters on class 0."""
    torch.set_num_threads(1)
    module, _, _ = make_zoo_model(arch, random_state=seed)
    data, net = train_on_artifact(module, artifact, seed, device)
    share = relevance_share(net, data, device)
    base = {"arch": arch, "artifact": artifact, "seed": seed, "relevance share": share,
            "applies": share >= MIN_SHARE}
    out = []
    for composite in COMPOSITES:
        row = spray_row(net, data, seed, device, composite=composite)
        out.append({**base, "variant": composite, "composite": composite,
                    "clusters": int(row["clusters"]), "ARI": float(row["ARI"]),
                    "confidence": float(row["confidence"]), "warned": row["warned weak clusters"],
                    "meets": bool(row["clusters"] >= 2 and row["ARI"] >= 0.8)})
    for name, row in reference_spray(net, data, seed, device, COMPOSITES[0]).items():
        out.append({**base, "variant": f"{REFERENCE} ({name})", "composite": COMPOSITES[0],
                    "clusters": int(row["clusters"]), "ARI": float(row["ARI"]),
                    "confidence": float("nan"), "warned": False,
                    "meets": bool(row["clusters"] >= 2 and row["ARI"] >= 0.8)})
    return out


def summarise(runs):
    rows = []
    keys = sorted({(r["arch"], r["artifact"], r["variant"]) for r in runs},
                  key=lambda k: (ARCHS.index(k[0]), k[1], VARIANTS.index(k[2])))
    for arch, artifact, variant in keys:
        rs = [r for r in runs if (r["arch"], r["artifact"], r["variant"]) == (arch, artifact,
                                                                              variant)]
        held = [r for r in rs if r["applies"]]
        missed = [r for r in held if not r["meets"]]
        rows.append({"arch": arch, "artifact": artifact, "variant": variant, "runs": len(rs),
                     "apply": len(held), "meet": len(held) - len(missed),
                     "share met": (len(held) - len(missed)) / len(held) if held else np.nan,
                     "misses warned": sum(r["warned"] for r in missed),
                     "matches warned": sum(r["warned"] for r in rs if r["meets"]),
                     "mean confidence": float(np.mean([r["confidence"] for r in rs]))})
    return rows


def disagreements(runs):
    """Per network and artifact: runs where only one composite meets the target."""
    by = {}
    for r in runs:
        if r["variant"] in COMPOSITES:
            by.setdefault((r["arch"], r["artifact"], r["seed"]), {})[r["variant"]] = r["meets"]
    rows = []
    for arch in ARCHS:
        for artifact in ARTIFACTS:
            seeds = [v for k, v in by.items() if k[:2] == (arch, artifact)]
            if seeds:
                rows.append({"arch": arch, "artifact": artifact, "runs": len(seeds),
                             **{f"only {c}": sum(v[c] and not any(v[o] for o in v if o != c)
                                                 for v in seeds) for c in COMPOSITES}})
    return rows


def _seed_text(seeds):
    """``0-19`` for a run of consecutive seeds, else the list."""
    if len(seeds) > 2 and list(seeds) == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small_cnn, seeds 0 and 1")
    parser.add_argument("--archs", nargs="*", choices=ARCHS, default=None)
    parser.add_argument("--artifacts", nargs="*", choices=ARTIFACTS, default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--jobs", type=int, default=1, help="processes over networks")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    archs = args.archs or (["small_cnn"] if args.quick else list(ARCHS))
    artifacts = args.artifacts or list(ARTIFACTS)
    seeds = args.seeds if args.seeds is not None else list(range(2 if args.quick else 40))
    configs = [(a, b, s) for a in archs for b in artifacts for s in seeds]
    start = time.perf_counter()
    if args.jobs > 1:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=args.jobs)(delayed(run_seed)(a, b, s, args.device)
                                           for a, b, s in configs)
    else:
        parts = [run_seed(a, b, s, args.device) for a, b, s in configs]
    runs = [r for part in parts for r in part]
    wall = time.perf_counter() - start
    table = summarise(runs)
    split = disagreements(runs)
    print(format_table(split, title="Runs where only one composite meets the target"))
    print()
    emit("spray_seeds", table,
         title=f"SpRAy on class 0 over seeds ({len(configs)} networks; {', '.join(archs)}; "
               f"{', '.join(artifacts)}; seeds {_seed_text(seeds)}); {wall:.0f} s wall, "
               f"{args.jobs} job(s), device {args.device}",
         extra={"runs": runs, "disagreements": split, "wall s": wall, "seeds": seeds,
                "quick": args.quick},
         floatfmt=".2f")
    return 0


if __name__ == "__main__":
    main()
