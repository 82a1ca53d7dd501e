"""Performance at real image sizes: torchvision networks at 224 px, precisions, devices.

(a) One row per (model, image size, precision, device), models resnet18 / resnet50 / vgg16_bn
    with random weights (``skdebias.models.torchvision_model``, ``weights=None``):
    ``extraction_ratio`` = ActivationExtractor throughput / a raw hooked no-grad forward on the
    same batches (both at the row's precision; target >= 0.9), and ``rr_ce_ratio`` = one
    RR-ClArC training step (``estimator_.train_step``: forward, cross-entropy, the input-gradient
    penalty with its double backward, SGD step) / one plain cross-entropy step with the same
    frozen layers, optimizer and batch (target <= 2.5). Timings are medians of interleaved
    repetitions (A B A B ...), so machine load hits both sides alike.
(b) FastModelDebiaser, exact Hessian vs Hessian-free (conjugate gradient) on a 64 -> 100 head,
    and the Hessian-free path on a 2048 -> 1000 head (the problems of benchmarks/fmd_scale.py):
    time, peak resident memory, bias reached. Each case runs in a fresh process.
(c) SpectralRelevanceAnalysis on 10,000 images of one class (SmallCNN, 28 px, LRP): time and
    peak resident memory growth, in a fresh process.
(d) ``tcav_score`` vs captum's ``TCAV`` on the same network (resnet18, random weights), layers,
    concept set, random sets and target: median times (interleaved; captum writes to a fresh
    folder every run, so neither side reuses earlier work) and the scores per layer. The scores
    agree within sampling noise when the difference of the mean concept scores is at most
    twice its standard error over the random sets (plus 0.05 for the different CAV solvers).
    Untimed, two more comparisons: captum given the CAV classifier of ``tcav_score``
    (``CAVEstimator(method="logistic", C=1)`` on all images of the two sets) must give the same
    scores, and captum's own classifier (SGD on a random two thirds of the images) rerun with
    further seeds shows how much its scores move with the seed alone.

Run: .venv/bin/python benchmarks/image_scale.py [--quick] [--device cuda]
                                                [--precisions float32 bfloat16 float16]
                                                [--only scale fmd spray tcav]
--quick: 64 px, small sets (a smoke run). On the CPU the batch is 8; on CUDA 128 (--batch),
16 batches per timing (--n-batches).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from _common import emit, environment, format_table, interleaved

from skdebias import ActivationExtractor
from skdebias.correction import GradientPenaltyCorrector
from skdebias.models import torchvision_model

#: the layer each network is hooked at: the output of its last convolutional block
LAYERS = {"resnet18": "layer4", "resnet50": "layer4", "vgg16_bn": "features.42"}
SECTIONS = ("scale", "fmd", "spray", "tcav")


def peak_rss_mb():
    """Peak resident memory of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_info(device):
    info = {"device": str(device), "torch": torch.__version__,
            "cuda_version": torch.version.cuda, "cudnn": None, "card": None}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def autocast(precision, device):
    """What a user writes around hand-made code: torch's autocast, or nothing for float32."""
    if precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, precision))


def sync_for(device):
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


# ------------------------------------------------------------------ (a) ratios per row
def raw_forward(module, layer, batches, precision, device):
    """What a user writes by hand: a hook, a full no-grad forward, max pooling, to the CPU."""
    store = []
    handle = module.get_submodule(layer).register_forward_hook(
        lambda m, i, o: store.append(o.detach().amax(dim=(2, 3)).float().cpu()))
    module.eval()
    try:
        with torch.no_grad(), autocast(precision, device):
            for xb in batches:
                module(xb.float() / 255 if xb.dtype == torch.uint8 else xb)
    finally:
        handle.remove()
    return torch.cat(store).numpy()


def rr_and_ce_steps(module, layer, X, y, precision, device):
    """One RR-ClArC step (``train_step`` of the corrector's own skorch net, at ``precision``)
    and one plain cross-entropy step with the same frozen layers, optimizer and batch."""
    import copy

    from correction import EvalModulesNet

    c = np.arange(len(X)) % 2
    rr = GradientPenaltyCorrector(module, layer, penalty=1e3, max_epochs=0, lr=1e-4,
                                  train_layers="after", device=str(device), precision=precision,
                                  random_state=0).fit(X.numpy(), y.numpy(), c)
    net = rr.estimator_
    Xd, yd = X.to(device), y.to(device)
    net.history.new_epoch()
    net.history.new_batch()
    optimizer_args = {k: v for k, v in net.get_params().items() if k.startswith("optimizer__")}
    plain = EvalModulesNet(copy.deepcopy(net.module_), criterion=torch.nn.CrossEntropyLoss,
                           optimizer=net.optimizer, lr=net.lr, max_epochs=0, batch_size=len(X),
                           train_split=None, device=str(device), eval_modules=net.eval_modules,
                           **optimizer_args).initialize()
    sync = sync_for(device)
    scaler = torch.amp.GradScaler(device.type) if precision == "float16" else None

    def rr_step():
        net.train_step((Xd, yd))
        sync()

    def ce_step():
        # the plain step at the same precision: autocast forward, float32 loss
        if scaler is None:
            with autocast(precision, device):
                plain.train_step((Xd, yd))
        else:
            plain.module_.train()
            plain.optimizer_.zero_grad()
            with autocast(precision, device):
                loss = torch.nn.functional.cross_entropy(plain.module_(Xd).float(), yd)
            scaler.scale(loss).backward()
            scaler.step(plain.optimizer_)
            scaler.update()
        sync()

    return {"plain CE": ce_step, "RR-ClArC": rr_step}


def scale_row(module, name, layer, X, y, batches, batch, px, precision, device, repeats):
    """One row of (a): both ratios for one network at one precision (for uint8 images ``X``,
    extraction only: the training steps do not depend on how the images are stored)."""
    ext = ActivationExtractor(module, layer, batch_size=batch, device=str(device),
                              precision=precision).fit(X[:2])
    a = ext.transform(X)
    b = raw_forward(module, layer, batches, precision, device)
    # the extractor runs image batches in channels_last, the hand-made pass in the batch's own
    # layout: other kernels, other float rounding over some fifty layers (on CUDA, float32
    # convolutions may run in TF32, torch's default, in one layout and not the other)
    deviation = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
    tol = 5e-3 if precision == "float32" else 5e-2
    assert deviation <= tol, f"{name}: extractor disagrees (max deviation {deviation:.2g})"
    sync = sync_for(device)
    each = {}
    t = interleaved({"raw": lambda: (raw_forward(module, layer, batches, precision,
                                                 device), sync()),
                     "extractor": lambda: (ext.transform(X), sync())},
                    repeats=repeats, times=each)
    row = {"model": name, "px": px, "precision": precision, "device": str(device),
           "input": str(X.dtype).replace("torch.", ""),
           "card": device_info(device)["card"], "layer": layer, "batch": batch, "n": len(X),
           "extractor_img_s": len(X) / t["extractor"], "raw_img_s": len(X) / t["raw"],
           "extraction_ratio": t["raw"] / t["extractor"], "repeats": repeats,
           "max_deviation": deviation,
           "extractor_s_each": [round(v, 5) for v in each["extractor"]],
           "raw_s_each": [round(v, 5) for v in each["raw"]]}
    if X.dtype != torch.uint8:
        steps = rr_and_ce_steps(module, layer, X[:batch], y[:batch], precision, device)
        s = interleaved(steps, repeats=repeats)
        row.update({"ce_step_ms": 1000 * s["plain CE"], "rr_step_ms": 1000 * s["RR-ClArC"],
                    "rr_ce_ratio": s["RR-ClArC"] / s["plain CE"]})
        del steps
    return row


def scale_rows(models, px, batch, n_batches, precisions, device, repeats, on_row=None,
               inputs=("float32",)):
    """Rows of (a) for every model, input type (float32 images in [0, 1], or the same as
    uint8 0..255, which the extractor sends as they are and scales on the device) and
    precision."""
    rows = []
    for name in models:
        layer = LAYERS[name]
        torch.manual_seed(0)
        module = torchvision_model(name, weights=None).to(device).eval()
        X = torch.rand(batch * n_batches, 3, px, px)
        y = torch.randint(0, 10, (len(X),))
        for kind, Xk in (("float32", X), ("uint8", (X * 255).round().to(torch.uint8))):
            if kind not in inputs:
                continue
            batches = [Xk[i:i + batch].to(device) for i in range(0, len(Xk), batch)]
            for precision in precisions:
                try:
                    rows.append(scale_row(module, name, layer, Xk, y, batches, batch, px,
                                          precision, device, repeats))
                except Exception as exc:  # noqa: BLE001 - recorded, the other rows still run
                    rows.append({"model": name, "px": px, "precision": precision,
                                 "device": str(device), "input": kind,
                                 "error": repr(exc)[:500]})
                print(format_table([rows[-1]], floatfmt=".3f"), flush=True)
                if on_row is not None:
                    on_row(rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ (b) FMD, (c) SpRAy: own process
def fmd_case(case, quick):
    """One FMD case in this (fresh) process; prints its row as a JSON line."""
    from fmd_scale import make_problem, row, run

    torch.set_num_threads(2)
    if case == "large":
        d, K = (512, 100) if quick else (2048, 1000)
        net, X, y, X_cf = make_problem(d, K, n_per_class=100 if quick else 20)
        before = peak_rss_mb()
        fmd, seconds = run(net, X, y, X_cf)
        out = row("large head, auto", d, K, fmd, seconds, peak_rss_mb=peak_rss_mb(),
                  rss_before_fit_mb=before)
    else:
        net, X, y, X_cf = make_problem(64, 100, n_per_class=40, seed=1)
        before = peak_rss_mb()
        fmd, seconds = run(net, X, y, X_cf, solver=case)
        out = row(f"small head, {case}", 64, 100, fmd, seconds, peak_rss_mb=peak_rss_mb(),
                  rss_before_fit_mb=before)
    print(json.dumps(out))


def spray_case(n, device):
    """SpRAy on ``n`` images of one class in this (fresh) process; prints a JSON line."""
    from skdebias import SpectralRelevanceAnalysis
    from skdebias.models import SmallCNN

    torch.manual_seed(0)
    X = np.random.RandomState(0).rand(n, 3, 28, 28).astype(np.float32)
    y = np.zeros(n, dtype=np.int64)
    before = peak_rss_mb()
    spray = SpectralRelevanceAnalysis(SmallCNN(), batch_size=256, device=device, random_state=0)
    start = time.perf_counter()
    spray.fit(X, y)
    seconds = time.perf_counter() - start
    print(json.dumps({"images per class": n, "classes": 1, "device": device, "time_s": seconds,
                      "peak_rss_growth_mb": peak_rss_mb() - before,
                      "input_mb": X.nbytes / 2**20, "clusters": int(spray.n_clusters_[0])}))


def in_subprocess(*args):
    res = subprocess.run([sys.executable, os.path.abspath(__file__), *args],
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def fmd_rows(quick):
    rows = [in_subprocess("--fmd-case", case, *(["--quick"] if quick else []))
            for case in ("large", "exact", "cg")]
    exact, cg = rows[1], rows[2]
    checks = {"cg_bias_within_10_percent_of_exact":
              abs(cg["bias_after"] - exact["bias_after"]) <= 0.1 * exact["bias_after"],
              "large_head_under_5_min": rows[0]["time_s"] < 300,
              "large_head_under_4_GB": rows[0]["peak_rss_mb"] < 4096}
    return rows, checks


# ------------------------------------------------------------------ (d) TCAV vs captum
def tcav_images(n, px, rng, concept=False):
    X = rng.rand(n, 3, px, px).astype(np.float32)
    if concept:  # a red square in the top left corner
        X[:, 0, :px // 3, :px // 3] = 1.0
        X[:, 1:, :px // 3, :px // 3] = 0.0
    return X


def tcav_compare(px, layers, n, n_random, device, repeats):
    from captum.concept import TCAV, Concept

    from skdebias import tcav_score

    rng = np.random.RandomState(0)
    torch.manual_seed(0)
    module = torchvision_model("resnet18", weights=None).to(device).eval()
    X = tcav_images(n, px, rng)
    concept = tcav_images(n, px, rng, concept=True)
    randoms = [tcav_images(n, px, rng) for _ in range(n_random)]
    target = 0

    def ours():
        return tcav_score(module, X, layers, concept, randoms, target=target, batch_size=64,
                          random_state=0)

    def loader(A):
        return torch.utils.data.DataLoader(torch.as_tensor(A).to(device), batch_size=64)

    c_concept = Concept(0, "concept", loader(concept))
    c_random = [Concept(i + 1, f"random{i}", loader(R)) for i, R in enumerate(randoms)]
    # the same runs as tcav_score: concept vs each random set, random i vs random i+1
    sets = [[c_concept, r] for r in c_random] + \
        [[c_random[(i + 1) % n_random], r] for i, r in enumerate(c_random)]
    X_t = torch.as_tensor(X).to(device)

    def theirs(classifier=None):
        folder = tempfile.mkdtemp(prefix="skdebias_captum_")
        try:
            tcav = TCAV(module, layers, save_path=folder, classifier=classifier)
            return tcav.interpret(X_t, sets, target=target)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sync = sync_for(device)
        t = interleaved({"skdebias": lambda: (ours(), sync()),
                         "captum": lambda: (theirs(), sync())}, repeats=repeats)
        res, cap = ours(), theirs()
        same_cav = theirs(classifier=logistic_cav_classifier(C=1.0))
        reseeded = []
        for seed in CAPTUM_SEEDS:  # captum's classifier splits and shuffles with torch's RNG
            torch.manual_seed(seed)
            reseeded.append(theirs())
    key = [f"{s[0].id}-{s[1].id}" for s in sets]

    def sign_counts(out, layer):
        return np.array([float(out[k][layer]["sign_count"][0]) for k in key])

    rows = []
    for layer in layers:
        cap_scores = sign_counts(cap, layer)
        same = sign_counts(same_cav, layer)
        seeds = [sign_counts(out, layer)[:n_random] for out in reseeded]
        ours_c, ours_r = res[layer].scores, res[layer].random_scores
        cap_c, cap_r = cap_scores[:n_random], cap_scores[n_random:]
        se = np.sqrt(ours_c.var(ddof=1) / n_random + cap_c.var(ddof=1) / n_random)
        diff = abs(ours_c.mean() - cap_c.mean())
        rows.append({"layer": layer, "px": px, "inputs": n, "set size": n,
                     "random sets": n_random, "device": str(device),
                     "skdebias_s": t["skdebias"], "captum_s": t["captum"],
                     "time_ratio": t["skdebias"] / t["captum"],
                     "skdebias_concept_mean": float(ours_c.mean()),
                     "captum_concept_mean": float(cap_c.mean()),
                     "skdebias_random_mean": float(ours_r.mean()),
                     "captum_random_mean": float(cap_r.mean()),
                     "concept_mean_diff": float(diff), "diff_standard_error": float(se),
                     "agree_within_noise": bool(diff <= 2 * se + 0.05),
                     "skdebias_scores": ours_c.tolist(), "captum_scores": cap_c.tolist(),
                     "captum_same_cav_scores": same[:n_random].tolist(),
                     "captum_same_cav_random_scores": same[n_random:].tolist(),
                     "same_cav_max_abs_diff": float(np.abs(
                         same - np.concatenate([ours_c, ours_r])).max()),
                     "captum_seeds": list(CAPTUM_SEEDS),
                     "captum_seed_scores": [c.tolist() for c in seeds],
                     "captum_seed_means": [float(c.mean()) for c in seeds]})
    return rows


#: further seeds for captum's own (SGD) CAV classifier, untimed
CAPTUM_SEEDS = (1, 2)


def logistic_cav_classifier(C):
    """A captum ``Classifier`` whose CAV is fitted by the estimator ``tcav_score`` uses,
    ``CAVEstimator(method="logistic", C=C)``, on every activation of the two sets (no held-out
    split). Its weight rows are ordered like ``classes()``."""
    from captum.concept._utils.classifier import Classifier

    from skdebias import CAVEstimator

    class LogisticCAV(Classifier):
        def __init__(self):
            self.cav = None

        def train_and_eval(self, dataloader, **kwargs):
            acts, labels = zip(*dataloader)
            A = torch.cat(acts).flatten(1).double().cpu().numpy()
            y = torch.cat(labels).cpu().numpy()
            self.cav = CAVEstimator(method="logistic", C=C).fit(A, y)
            return {"accs": torch.tensor(self.cav.score(A, y))}

        def weights(self):
            v = torch.as_tensor(self.cav.cav_, dtype=torch.float32)
            return torch.stack([-v, v])  # cav_ points towards classes_[1]

        def classes(self):
            return [int(c) for c in self.cav.classes_]

    return LogisticCAV()


# ------------------------------------------------------------------ main
def merge_with_earlier(rows, payload, run_key):
    """Rows of this run merged with those of earlier runs in image_scale.json (one row per
    (model, px, precision, device, input, n): a new row replaces the old one), and the other
    sections stored per run kind (``cpu``, ``cuda``, ``cpu_quick``, ...)."""
    from _common import result_path

    old_rows, runs = [], {}
    try:
        with open(result_path("image_scale")) as fh:
            old = json.load(fh)
        old_rows, runs = old.get("rows", []), old.get("runs", {})
    except (OSError, ValueError):
        pass

    def key(r):
        return (r["model"], r["px"], r["precision"], r["device"], r.get("input", "float32"),
                r.get("n"))

    new = {key(r) for r in rows}
    merged = [r for r in old_rows if key(r) not in new] + rows
    runs = dict(runs)
    runs[run_key] = {**runs.get(run_key, {}), **payload}
    return merged, runs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px and small sets")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--precisions", nargs="+", default=None,
                        choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on the CPU; all three on CUDA")
    parser.add_argument("--models", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--inputs", nargs="+", choices=["float32", "uint8"], default=None,
                        help="image storage of the scale rows (default: float32 on the CPU, "
                             "both on CUDA)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size of the scale rows (default: 8 on the CPU, 128 on CUDA)")
    parser.add_argument("--n-batches", type=int, default=None,
                        help="batches per timing of the scale rows (default: 2 on the CPU, "
                             "16 on CUDA); throughput includes filling and draining the "
                             "pipeline once per timing, which weighs less with more batches")
    parser.add_argument("--fmd-case", help=argparse.SUPPRESS)
    parser.add_argument("--spray-case", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fmd_case:
        return fmd_case(args.fmd_case, args.quick)
    if args.spray_case:
        return spray_case(args.spray_case, args.device)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    precisions = args.precisions or (["float32", "bfloat16", "float16"] if cuda else ["float32"])
    px = 64 if args.quick else 224
    batch = args.batch or (128 if cuda else 8)
    repeats = args.repeats or (3 if args.quick else 5)
    n_batches = args.n_batches or (16 if cuda else 2)
    if n_batches < 1:
        parser.error(f"--n-batches must be at least 1, got {n_batches}")
    payload = {"quick": args.quick, "device_info": device_info(device),
               "environment": environment(), "only": args.only}
    start = time.perf_counter()
    run_key = device.type + ("_quick" if args.quick else "")

    def save_partial():
        # after every section, so that a run stopped midway keeps what it measured
        from _common import result_path
        from skdebias.report import write_json

        part = dict(payload)
        rows, runs = merge_with_earlier(part.pop("rows", []), part, run_key)
        write_json(result_path("image_scale"), {"benchmark": "image_scale", "rows": rows,
                                                "environment": environment(), "runs": runs})

    if "scale" in args.only:
        def on_row(rows):
            payload["rows"] = rows
            save_partial()

        inputs = args.inputs or (["float32", "uint8"] if cuda else ["float32"])
        payload["rows"] = scale_rows(args.models, px, batch, n_batches, precisions,
                                     device, repeats, on_row=on_row, inputs=inputs)
        payload["checks"] = {
            "extraction_ratio_at_least_0.9": all(r.get("extraction_ratio", 0) >= 0.9
                                                 for r in payload["rows"]),
            "rr_ce_ratio_at_most_2.5": all(r.get("rr_ce_ratio", 99) <= 2.5
                                           for r in payload["rows"]
                                           if r.get("input", "float32") == "float32")}
        for kind in inputs:
            fast = {r["precision"]: r["extractor_img_s"] for r in payload["rows"]
                    if r["model"] == "resnet50" and "error" not in r
                    and r.get("input", "float32") == kind}
            if "float32" in fast and "bfloat16" in fast:
                suffix = "" if kind == "float32" else f"_{kind}_input"
                payload["checks"][f"resnet50_bfloat16_over_float32_throughput{suffix}"] = \
                    fast["bfloat16"] / fast["float32"]
        save_partial()
    if "fmd" in args.only:
        payload["fmd"], payload["fmd_checks"] = fmd_rows(args.quick)
        print(format_table(payload["fmd"], title="FMD exact vs Hessian-free", floatfmt=".4g"))
        save_partial()
    if "spray" in args.only:
        n = 1000 if args.quick else 10_000
        try:
            payload["spray"] = [in_subprocess("--spray-case", str(n), "--device", args.device)]
            print(format_table(payload["spray"], title="SpRAy, one class", floatfmt=".4g"))
        except RuntimeError as exc:  # recorded, so that the other sections still report
            payload["spray_error"] = str(exc)[-2000:]
            print(payload["spray_error"])
        save_partial()
    if "tcav" in args.only:
        tpx = 64 if args.quick else (224 if cuda else 112)
        layers = ["layer3", "layer4"]
        n = 20 if args.quick else (50 if cuda else 30)
        payload["tcav"] = tcav_compare(tpx, layers, n, 5, device,
                                       repeats=args.repeats or (2 if cuda else 3))
        print(format_table(payload["tcav"], columns=[
            "layer", "px", "skdebias_s", "captum_s", "time_ratio", "skdebias_concept_mean",
            "captum_concept_mean", "concept_mean_diff", "diff_standard_error",
            "agree_within_noise", "same_cav_max_abs_diff", "captum_seed_means"],
            title="tcav_score vs captum TCAV", floatfmt=".3f"))
    payload["total_s"] = time.perf_counter() - start
    rows, runs = merge_with_earlier(payload.pop("rows", []), payload, run_key)
    emit("image_scale", rows, "Image scale, every device and size run so far "
         "(extraction_ratio >= 0.9, rr_ce_ratio <= 2.5)",
         columns=["model", "px", "precision", "device", "input", "batch", "extractor_img_s",
                  "raw_img_s", "extraction_ratio", "ce_step_ms", "rr_step_ms", "rr_ce_ratio"],
         extra={"runs": runs})
    for key in ("checks", "fmd_checks"):
        for check, ok in payload.get(key, {}).items():
            print(f"{check}: {ok}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
