"""Side-by-side comparison of the CAV-based corrections on artifact data (CLI demo, benchmark)."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["compare_corrections", "CORRECTION_METHODS", "DEFAULT_SETTINGS"]

CORRECTION_METHODS = ("vanilla", "P-ClArC", "P-ClArC flatten", "A-ClArC", "RR-ClArC")

#: Settings for SmallCNN on artifact digits (the demo and benchmark configuration). The
#: reference recipe uses lr=1e-4; the tiny network needs a larger step to move within a
#: few epochs. The penalty is the one GridSearchCV with ``make_debias_scorer`` picks on
#: most seeds of ``benchmarks/correction.py`` (grid 1e3 .. 1e6; 1e6 diverges): the
#: concept sensitivity at ``features.6`` is ~1e-2, so ``L_RR`` is ~1e-4 and needs a
#: weight of ~1e5 to matter next to the cross-entropy.
DEFAULT_SETTINGS = {
    "P-ClArC": {},
    "P-ClArC flatten": {"pooling": "flatten"},
    "A-ClArC": {"max_epochs": 4, "lr": 2e-3},
    "RR-ClArC": {"penalty": 1e5, "max_epochs": 4, "lr": 2e-3},
}


def _concept_labels(data):
    """Artifact labels within the target class, -1 elsewhere (the CAV separates the artifact,
    not the digit)."""
    target = getattr(data, "target_class", None)
    c = np.asarray(data.concept).astype(np.int64)
    if target is None:
        return c
    return np.where(np.asarray(data.y) == target, c, -1)


def compare_corrections(net, data, layer="features.6", cav=None, methods=CORRECTION_METHODS,
                        settings=None, n_relevance=100, sensitivity_target="target_class",
                        device="cpu", random_state=None):
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

    Returns
    -------
    rows : list of dict
        Keys ``method``, ``clean acc``, ``attacked acc``, ``concept sensitivity``
        (mean ``|grad . cav|`` at the layer on the attacked test set),
        ``sensitivity ratio`` (relative to vanilla), ``artifact relevance``
        (share of ``|LRP|`` in the artifact on attacked test images) and
        ``fit s``.
    """
    from ..metrics import artifact_relevance, attacked_accuracy, concept_sensitivity
    from ._clarc import ClassArtifactCompensator
    from ._rrclarc import GradientPenaltyCorrector

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
    return rows


def _predict(model, X):
    from ..metrics import _predict_labels

    return _predict_labels(model, X)
