"""The demo and the method comparison behind ``python -m skdebias demo``.

Private: the settings here are tuned for :class:`~skdebias.models.SmallCNN` on
artifact digits and mean nothing for other networks or data. The command line
(:mod:`skdebias.cli`) and the tests use this module; the benchmarks carry
their own copy of the comparison so that they exercise the public API only.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ._utils._modules import get_module, predict_proba
from .attribution import attribute
from .concepts import CAVEstimator, cav_alignment, tcav_score
from .correction import ClassArtifactCompensator, GradientPenaltyCorrector
from .extraction import ActivationExtractor
from .metrics import artifact_relevance, attacked_accuracy, concept_sensitivity
from .report import Timer, format_table

__all__ = ["run_demo", "compare_corrections", "CORRECTION_METHODS", "DEFAULT_SETTINGS"]

CORRECTION_METHODS = ("vanilla", "P-ClArC", "P-ClArC flatten", "A-ClArC", "RR-ClArC")

#: Settings for SmallCNN on artifact digits (the demo configuration). The
#: reference recipe uses lr=1e-4; the tiny network needs a larger step to move within a
#: few epochs. The penalty is the one GridSearchCV with ``make_debias_scorer`` picks on
#: most seeds of ``benchmarks/correction.py`` (grid 1e3 .. 1e6; 1e6 diverges): the
#: concept sensitivity at ``features.6`` is ~1e-2, so ``L_RR`` is ~1e-4 and needs a
#: weight of ~1e5 to matter next to the cross-entropy.
DEFAULT_SETTINGS = {
    "P-ClArC": {},
    "P-ClArC flatten": {"pooling": "flatten"},
    # the reference recipe's optimizer (SGD, momentum 0.9), not the vanilla network's Adam
    "A-ClArC": {"max_epochs": 4, "lr": 2e-3, "optimizer": torch.optim.SGD},
    "RR-ClArC": {"penalty": 1e5, "max_epochs": 4, "lr": 2e-3, "optimizer": torch.optim.SGD},
}


def _concept_labels(data):
    """Artifact labels within the target class, -1 elsewhere.

    Parameters
    ----------
    data : Bunch
        With ``concept`` and ``y``, and optionally ``target_class``.

    Returns
    -------
    ndarray of shape (n_samples,)
        The CAV is then fitted on images of the target class only, so it
        separates the artifact and not the digit.
    """
    target = getattr(data, "target_class", None)
    c = np.asarray(data.concept).astype(np.int64)
    if target is None:
        return c
    return np.where(np.asarray(data.y) == target, c, -1)


def compare_corrections(net, data, layer="features.6", cav=None, methods=CORRECTION_METHODS,
                        settings=None, n_relevance=100, sensitivity_target="target_class",
                        device="cpu", random_state=None, return_models=False):
    """Vanilla vs P-ClArC (max-pooled and flattened CAV) vs A-ClArC vs RR-ClArC: one row per method.

    Parameters
    ----------
    net : torch.nn.Module or fitted skorch NeuralNet
        The (Clever-Hans) network; never modified.
    data : Bunch
        As returned by :func:`skdebias.datasets.make_artifact_digits` (``X``,
        ``y``, ``concept``, ``X_test``, ``y_test``, ``add_artifact``,
        ``artifact_mask``, ``target_class``).
    layer : str, default="features.6"
    cav : CAVEstimator, vector or None, default=None
        Passed to the correctors (a CAVEstimator is cloned and refitted on the
        artifact vs clean images of the target class). A vector is one value
        per channel; a method with ``pooling="flatten"`` (``"P-ClArC flatten"``)
        then fits the default CAV over the flattened map instead.
    methods : sequence of str, default=CORRECTION_METHODS
        ``("vanilla", "P-ClArC", "P-ClArC flatten", "A-ClArC", "RR-ClArC")``;
        ``"P-ClArC flatten"`` is P-ClArC with ``pooling="flatten"`` (the CAV over
        the whole activation map).
    settings : dict or None, default=None
        Per-method keyword arguments updating :data:`DEFAULT_SETTINGS`, e.g.
        ``{"RR-ClArC": {"penalty": 1000.0}}``.
    n_relevance : int, default=100
        Attacked test images used for the artifact relevance (LRP is the
        slowest metric).
    sensitivity_target : "target_class", "predicted" or int, default="target_class"
        Logit whose gradient is projected on the CAV.
    device : str, default="cpu"
    random_state : int or None, default=None
    return_models : bool, default=False
        Also return ``{method: model}``, the fitted correctors (``net`` for
        ``"vanilla"``).

    Returns
    -------
    rows : list of dict
        Keys ``method``, ``clean acc``, ``attacked acc``, ``concept sensitivity``
        (mean ``|grad . cav|`` at the layer on the attacked test set),
        ``sensitivity ratio`` (relative to vanilla), ``artifact relevance``
        (share of ``|LRP|`` in the artifact on attacked test images) and
        ``fit s``.
    models : dict
        Only with ``return_models=True``.

    Raises
    ------
    ValueError
        For a method not in :data:`CORRECTION_METHODS` or a ``settings`` key
        naming none of the corrections.
    """
    unknown = [m for m in methods if m not in CORRECTION_METHODS]
    if unknown:
        raise ValueError(f"Unknown methods {unknown}; choose from {CORRECTION_METHODS}.")
    cfg = {k: dict(v) for k, v in DEFAULT_SETTINGS.items()}
    for key, value in (settings or {}).items():
        if key not in cfg:
            raise ValueError(f"settings has unknown method {key!r}; choose from {tuple(cfg)}.")
        cfg[key].update(value)
    c = _concept_labels(data)
    X_att = data.add_artifact(data.X_test)
    rel_idx = np.arange(min(int(n_relevance), len(X_att)))
    if sensitivity_target == "target_class":
        s_target = int(data.target_class)
    elif sensitivity_target == "predicted":
        s_target = None
    else:
        s_target = int(sensitivity_target)

    common = dict(layer=layer, cav=cav, device=device, random_state=random_state)
    cav_vec = None
    rows = []
    models = {}
    vanilla_s = None
    for method in methods:
        start = time.perf_counter()
        if method == "vanilla":
            model, measure = net, layer
            if cav_vec is None:
                # a P-ClArC fit without fine-tuning is just the CAV fit; reuse its vector
                cav_vec = ClassArtifactCompensator(net, **common).fit(data.X, data.y, c).cav_
            seconds = 0.0
        else:
            kw = {**common, **cfg[method]}
            if kw.get("pooling") == "flatten" and cav is not None and not hasattr(cav, "fit"):
                kw["cav"] = None  # a vector CAV is max-pooled: fit the flattened one instead
            if method in ("P-ClArC", "P-ClArC flatten"):
                est = ClassArtifactCompensator(net, mode="projective", **kw)
            elif method == "A-ClArC":
                est = ClassArtifactCompensator(net, mode="augmentative", **kw)
            else:
                est = GradientPenaltyCorrector(net, **kw)
            est.fit(data.X, data.y, concept_labels=c)
            seconds = time.perf_counter() - start
            model, measure = est, est.measure_layer_
            if cav_vec is None and getattr(est, "pooling", "max") == "max":
                cav_vec = est.cav_  # sensitivity is measured along a max-pooled CAV
        if cav_vec is None:
            cav_vec = ClassArtifactCompensator(net, **common).fit(data.X, data.y, c).cav_
        sens = concept_sensitivity(model, X_att, measure, cav_vec, target=s_target)["mean_abs"]
        if method == "vanilla":
            vanilla_s = sens
        models[method] = model
        rows.append({
            "method": method,
            "clean acc": float(np.mean(_predict(model, data.X_test) == data.y_test)),
            "attacked acc": attacked_accuracy(model, data.X_test, data.y_test, data.add_artifact),
            "concept sensitivity": sens,
            "sensitivity ratio": None,  # filled in below, once vanilla's is known
            "artifact relevance": artifact_relevance(model, X_att[rel_idx],
                                                     data.artifact_mask, device=device),
            "fit s": seconds,
        })
    for row in rows:  # whatever the order of methods
        if vanilla_s is None:
            row.pop("sensitivity ratio")
        else:
            row["sensitivity ratio"] = (row["concept sensitivity"] / vanilla_s if vanilla_s
                                        else float("nan"))
    return (rows, models) if return_models else rows


def _predict(model, X):
    """Class labels from a fitted corrector, a skorch net or a module that outputs logits."""
    if isinstance(model, torch.nn.Module):
        return predict_proba(model, X).argmax(axis=1)
    return np.asarray(model.predict(X))


def _accuracy(net, X, y):
    return float(np.mean(net.predict(X) == y))


def _conv_layers(module, layer, most=3):
    """Names of up to ``most`` convolutions up to and including ``layer`` (the last ones)."""
    names = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            names.append(name)
        if name == layer:
            break
    if layer not in names:
        names.append(layer)
    return names[-most:]


def _layer_sensitivity(models, data, layers, layer, batch_size, device):
    """``{name: {model name: mean |grad . cav|}}`` on attacked test images of the target class,
    with a pattern CAV fitted per layer on the vanilla network (artifact vs clean training
    images of the target class)."""
    net = models["vanilla"]
    target = int(data.target_class)
    in_class = data.y == target
    X_att = data.add_artifact(data.X_test[data.y_test == target])
    out = {}
    for name in layers:
        ext = ActivationExtractor(net, layer=name, batch_size=batch_size, device=device)
        A = ext.fit_transform(data.X[in_class])
        cav = CAVEstimator(method="pattern").fit(A, data.concept[in_class]).cav_
        out[name] = {}
        for label, model in models.items():
            # a ClArC network reads the activation before its compensation at measure_layer_
            measure = getattr(model, "measure_layer_", name) if name == layer else name
            out[name][label] = concept_sensitivity(model, X_att, measure, cav, target=target,
                                                   batch_size=batch_size)["mean_abs"]
    return out


def _tcav(model, data, layer, seed, batch_size):
    """TCAV of the artifact for the target class: artifact images of that class against random
    sets of clean images of the other classes."""
    target = int(data.target_class)
    rng = np.random.RandomState(seed)
    in_class = np.flatnonzero((data.y == target) & (data.concept == 1))
    others = np.flatnonzero(data.y != target)
    concept_X = data.X[in_class[:30]]
    random_X = data.X[rng.choice(others, size=min(len(others), 150), replace=False)]
    X = data.X_test[data.y_test == target][:40]
    # tcav_score's activations are read from the network a corrector holds. Pattern CAVs (the
    # demo's CAV method): logistic ones on the 3,136 flattened entries take ~1 s each on a CPU
    return tcav_score(getattr(model, "estimator_", model), X, layer, concept_X, random_X,
                      target=target, n_random=5, cav_method="pattern", batch_size=batch_size,
                      random_state=seed)


def _heatmaps(model, data, batch_size, device, progress, n=6):
    """LRP maps of the predicted class on test images of other classes with the artifact added:
    where the network looks when the artifact flips its decision."""
    target = int(data.target_class)
    idx = np.flatnonzero(data.y_test != target)[:n]
    X_att = data.add_artifact(data.X_test[idx])
    pred = _predict(model, X_att)
    R = attribute(getattr(model, "estimator_", model), X_att, batch_size=batch_size,
                  device=device, verbose=int(progress))
    titles = [f"true {int(t)} -> pred {int(p)}" for t, p in zip(data.y_test[idx], pred)]
    return {"X": X_att, "relevance": R, "titles": titles}


def _demo_report(net, data, layer, cavs, A, A_test_att, A_test, models, rows, seed, batch_size,
                 device, progress, description):
    """The :class:`~skdebias.report.AuditReport` of the demo (and of its corrected network)."""
    from .detection import SpectralRelevanceAnalysis
    from .ranking import SpuriosityRanker
    from .report import AuditReport

    target = int(data.target_class)
    spray = SpectralRelevanceAnalysis(net, classes=[target], n_clusters=None, max_clusters=4,
                                      batch_size=batch_size, device=device, random_state=seed,
                                      verbose=int(progress)).fit(data.X, data.y)
    # the artifact is spurious for the target class only: the other classes are not scored
    ranker = SpuriosityRanker(cav={target: cavs["pattern"].cav_}).fit(A, data.y)
    spuriosity = ranker.score_samples(A, data.y)
    all_models = {"vanilla": net, **{k: v for k, v in (models or {}).items() if k != "vanilla"}}
    # the corrected network shown in full: RR-ClArC when it ran, else the last method
    fixed = "RR-ClArC" if "RR-ClArC" in all_models else list(all_models)[-1]
    sens_models = {k: all_models[k] for k in dict.fromkeys(("vanilla", fixed))}
    sensitivity = _layer_sensitivity(sens_models, data, _conv_layers(get_module(net), layer),
                                     layer, batch_size, device)
    corrected = None
    if fixed != "vanilla":
        model = all_models[fixed]
        corrected = AuditReport(
            model, data.X, data.y, title=f"The corrected network ({fixed})",
            tcav={fixed: _tcav(model, data, layer, seed, batch_size)},
            heatmaps=_heatmaps(model, data, batch_size, device, progress), max_classes=3,
            n_images=4)
    return AuditReport(
        net, data.X, data.y, title="skdebias demo: a Clever-Hans CNN on artifact digits",
        description=description, spray=spray, spuriosity=spuriosity,
        cav={k: v.cav_ for k, v in cavs.items()}, concept_pairs=(A_test_att, A_test),
        tcav={"vanilla": _tcav(net, data, layer, seed, batch_size)}, sensitivity=sensitivity,
        heatmaps=_heatmaps(net, data, batch_size, device, progress), correction=rows,
        corrected=corrected, max_classes=3, n_images=4)


def run_demo(seed=0, epochs=8, artifact="patch", target_class=0, p=0.3, layer="features.6",
             correction=True, verbose=True, batch_size=64, device="auto", progress=False,
             report=None, figures=None, methods=CORRECTION_METHODS, settings=None):
    """Train a Clever-Hans CNN on artifact digits, audit it with CAVs, and (optionally) correct it.

    Parameters
    ----------
    seed : int, default=0
        Seeds the data, the training and the corrections.
    epochs : int, default=8
        Training epochs of the SmallCNN.
    artifact : {"patch", "timestamp", "lsb", "brightness"}, default="patch"
    target_class : int, default=0
        The class whose images carry the artifact.
    p : float, default=0.3
        Share of the target class's training images with the artifact.
    layer : str, default="features.6"
        Layer of the CAVs and the corrections.
    correction : bool, default=True
        Also run :func:`compare_corrections`.
    verbose : bool, default=True
        Print the tables.
    batch_size : int, default=64
        Training and inference batch size.
    device : str, default="auto"
    progress : bool, default=False
        Progress bars over the long steps.
    report : str or path-like, optional
        Write the HTML audit report (:class:`~skdebias.report.AuditReport`) here;
        needs jinja2 (``pip install skdebias[report]``).
    figures : str or path-like, optional
        Write the report's figures as PNG files into this folder.
    methods, settings
        Passed to :func:`compare_corrections` (e.g. fewer methods or epochs
        for a quick run).

    Returns
    -------
    dict
        The configuration, ``clean_accuracy``, ``attacked_accuracy``, the CAV
        rows (``cav``), the correction rows (``correction``, with
        ``correction=True``), ``timings_s``, and with ``report`` / ``figures``
        the paths written (``report``, ``figures``).
    """
    # only the demo needs the data and model factories; `python -m skdebias audit` does not
    from .datasets import make_artifact_digits
    from .models import SmallCNN, make_classifier

    if report is not None:  # fail before training when jinja2 is missing
        from .report import jinja_environment

        jinja_environment()
    say = print if verbose else (lambda *a, **k: None)
    timer = Timer()
    data = make_artifact_digits(target_class=target_class, p=p, artifact=artifact, random_state=seed)
    X_att = data.add_artifact(data.X_test)
    n_art = int(data.concept.sum())
    intro = (f"Artifact digits: {len(data.y)} train images, artifact '{artifact}' in {n_art} "
             f"images of class {target_class} (p={p}); {len(data.y_test)} clean test images. "
             f"Seed {seed}.")
    say(intro)

    with timer("train"):
        net = make_classifier(SmallCNN, max_epochs=epochs, lr=2e-3, batch_size=batch_size,
                              device=device, random_state=seed, verbose=int(progress))
        net.fit(data.X, data.y)
    clean, attacked = _accuracy(net, data.X_test, data.y_test), _accuracy(net, X_att, data.y_test)

    with timer("extract"):
        extractor = ActivationExtractor(net, layer=layer, batch_size=batch_size, device=device,
                                        verbose=int(progress)).fit(data.X)
        A = extractor.transform(data.X)
        A_test, A_test_att = extractor.transform(data.X_test), extractor.transform(X_att)
    # CAVs are fitted within the target class: artifact vs clean images of the same digit, so the
    # direction separates the artifact and not the digit class.
    in_class = data.y == target_class
    cav_rows = []
    cavs = {}
    for method in ("pattern", "svm"):
        name = f"fit_{method}"
        with timer(name):
            est = CAVEstimator(method=method, random_state=seed).fit(A[in_class],
                                                                    data.concept[in_class])
        cavs[method] = est
        align = cav_alignment(est.cav_, A_test_att, A_test)
        cav_rows.append({"cav": method, "cos(mean d, cav)": align["cos_mean_diff"],
                         "mean cos(d, cav)": align["mean_cos"],
                         "fit ms": 1000 * timer[name]})
    summary = [
        {"quantity": "clean test accuracy", "value": f"{clean:.3f}"},
        {"quantity": "attacked test accuracy (artifact in every image)", "value": f"{attacked:.3f}"},
        {"quantity": "accuracy lost to the artifact (points)", "value": f"{100 * (clean - attacked):.1f}"},
        {"quantity": f"training ({epochs} epochs, {net.device})", "value": f"{timer['train']:.1f} s"},
        {"quantity": f"activation extraction at {layer!r}", "value": f"{timer['extract']:.2f} s"},
    ]
    say("")
    say(format_table(summary, title="Audit of the trained network"))
    say("")
    say(format_table(cav_rows, title="CAV alignment with the true artifact direction "
                                     f"(CAVs fitted on class {target_class}; "
                                     "d = a(x + artifact) - a(x) on test images)"))
    result = {"seed": seed, "epochs": epochs, "artifact": artifact, "target_class": target_class,
              "p": p, "layer": layer, "clean_accuracy": clean, "attacked_accuracy": attacked,
              "cav": cav_rows, "timings_s": dict(timer.seconds)}

    rows = models = None
    if correction:
        with timer("correction"):
            rows, models = compare_corrections(net, data, layer=layer, cav=cavs["pattern"],
                                               methods=methods, settings=settings,
                                               device=device, random_state=seed,
                                               return_models=True)
        say("")
        say(format_table(rows, title="Correction on artifact digits "
                                     "(concept sensitivity: mean |grad . cav| at the layer)"))
        result["correction"] = rows
    if report is not None or figures is not None:
        with timer("report"):
            description = (f"{intro} A SmallCNN trained for {epochs} epochs: clean test accuracy "
                           f"{clean:.3f}, {attacked:.3f} with the artifact pasted into every test "
                           f"image. The audited images below are the training images.")
            audit = _demo_report(net, data, layer, cavs, A, A_test_att, A_test, models, rows, seed,
                                 batch_size, device, progress, description)
            if report is not None:
                result["report"] = str(audit.save(report))
            if figures is not None:
                result["figures"] = audit.save_figures(figures)
        if figures is not None:
            say("")
            say(f"Figures written to {figures} ({len(result['figures'])} PNG files)")
        if report is not None:
            say("")
            say(f"Report written to {result['report']}")
    result["timings_s"] = dict(timer.seconds)
    say("")
    say(f"Total time: {sum(timer.seconds.values()):.1f} s (torch threads: {torch.get_num_threads()})")
    return result
