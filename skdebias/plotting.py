"""Figures for inspection: heatmaps, SpRAy strategies, spuriosity, CAV/TCAV and corrections.

Every function returns a :class:`matplotlib.figure.Figure` and never shows it;
save it with ``fig.savefig(path)``. No pyplot state is used, so the functions
work with any backend (also headless).
"""

from __future__ import annotations

import numpy as np

__all__ = ["plot_spuriosity_grid", "plot_spray_embedding", "plot_spray_clusters",
           "plot_relevance_heatmaps", "overlay_relevance", "plot_cav_alignment", "plot_tcav",
           "plot_concept_sensitivity", "plot_correction_comparison"]


def _figure(figsize):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _as_image(x):
    """(C, H, W) or (H, W) array/tensor -> something imshow understands, values clipped to [0, 1]."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    return np.clip(x, 0.0, 1.0)


def _take(X, i):
    if hasattr(X, "__getitem__") and not isinstance(X, np.ndarray) and not hasattr(X, "shape"):
        item = X[int(i)]
        return item[0] if isinstance(item, (tuple, list)) else item
    return X[int(i)]


def plot_spuriosity_grid(X, y, spuriosity, n=5, classes=None, class_names=None, figsize=None):
    """Lowest- and highest-spuriosity images of each class, one row per class.

    Parameters
    ----------
    X : array-like or tensor of shape (n_samples, C, H, W) (or (n, H, W)), or Dataset
        The images (values in [0, 1]; C = 1 or 3).
    y : array-like of shape (n_samples,)
    spuriosity : array-like of shape (n_samples,)
        E.g. :meth:`SpuriosityRanker.score_samples <skdebias.SpuriosityRanker.score_samples>`;
        classes whose spuriosity is NaN are left out.
    n : int, default=5
        Images per end.
    classes : sequence, optional
        Classes to show (default: every class with finite spuriosity).
    class_names : dict or sequence, optional
        Row labels: ``{class: name}``, or one name per class of ``y`` in sorted
        order (e.g. a loader's ``target_names``), whichever classes are plotted.
    figsize : tuple, optional

    Returns
    -------
    fig : matplotlib.figure.Figure
        The left ``n`` columns hold the lowest spuriosity (ascending), the
        right ``n`` the highest (highest last); titles give the values.

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.plotting import plot_spuriosity_grid
    >>> X = np.random.rand(20, 3, 8, 8); y = np.repeat([0, 1], 10)
    >>> fig = plot_spuriosity_grid(X, y, np.arange(20.0), n=2)
    >>> len(fig.axes)
    8
    """
    y = np.asarray(y).ravel()
    s = np.asarray(spuriosity, dtype=np.float64).ravel()
    if len(s) != len(y):
        raise ValueError(f"spuriosity has {len(s)} entries but y has {len(y)}.")
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")
    if classes is None:
        classes = [c for c in np.unique(y).tolist() if np.isfinite(s[y == c]).any()]
    if not len(classes):
        raise ValueError("No class has finite spuriosity values to plot.")
    all_classes = np.unique(y).tolist()
    if class_names is not None and not isinstance(class_names, dict) \
            and len(class_names) != len(all_classes):
        raise ValueError(
            f"class_names has {len(class_names)} names but y has {len(all_classes)} classes; "
            "give one name per class of y (sorted), or a dict {class: name}.")
    fig = _figure(figsize or (1.2 * 2 * n + 1, 1.35 * len(classes) + 0.6))
    axes = fig.subplots(len(classes), 2 * n, squeeze=False)
    for row, c in enumerate(classes):
        idx = np.flatnonzero((y == c) & np.isfinite(s))
        if len(idx) == 0:
            raise ValueError(f"Class {c!r} has no samples with finite spuriosity.")
        order = idx[np.argsort(s[idx], kind="stable")]
        m = min(n, len(order))
        picks = list(order[:m]) + [None] * (n - m) + [None] * (n - m) + list(order[len(order) - m:])
        for col, i in enumerate(picks):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if i is None:
                ax.set_axis_off()
                continue
            img = _as_image(_take(X, i))
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_title(f"{s[i]:.2f}", fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:blue" if col < n else "tab:red")
                spine.set_linewidth(1.5)
        name = c
        if class_names is not None:
            name = (class_names[c] if isinstance(class_names, dict)
                    else class_names[all_classes.index(c)])
        axes[row, 0].set_ylabel(str(name), rotation=0, ha="right", va="center")
    fig.suptitle(f"lowest spuriosity (blue, left)  |  highest spuriosity (red, right); n={n}",
                 fontsize=9)
    return fig


def plot_spray_embedding(spray, class_=None, concept=None, figsize=(8, 3.4)):
    """SpRAy result of one class: spectral embedding coloured by cluster, and the eigenvalues.

    Parameters
    ----------
    spray : fitted SpectralRelevanceAnalysis
    class_ : class label, optional
        Required when several classes were analysed.
    concept : array-like of 0/1, optional
        True concept labels of the class's samples (``len == len(indices_[class_])``)
        or of all fitted samples; concept samples are drawn as crosses.
    figsize : tuple, default=(8, 3.4)

    Returns
    -------
    fig : matplotlib.figure.Figure
        Left: eigenvectors 1 and 2 of the normalised Laplacian (the first
        non-trivial ones), one colour per cluster. Right: the smallest
        eigenvalues with the eigengap marked.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias import SpectralRelevanceAnalysis
    >>> from skdebias.plotting import plot_spray_embedding
    >>> net = torch.nn.Linear(4, 2)
    >>> X = np.random.RandomState(0).rand(30, 4).astype("float32")
    >>> spray = SpectralRelevanceAnalysis(net, method="gradient", random_state=0)
    >>> fig = plot_spray_embedding(spray.fit(X, np.zeros(30, dtype=int)))
    >>> len(fig.axes)
    2
    """
    c = spray._class_key(class_)
    idx = spray.indices_[c]
    labels = spray.labels_[idx]
    emb = spray.embedding_[c]
    vals = spray.eigenvalues_[c]
    k = spray.n_clusters_[c]
    if concept is not None:
        concept = np.asarray(concept).ravel()
        if len(concept) == spray.n_samples_fit_ and len(concept) != len(idx):
            concept = concept[idx]
        if len(concept) != len(idx):
            raise ValueError(
                f"concept must have one label per sample of class {c!r} ({len(idx)}) or per "
                f"fitted sample ({spray.n_samples_fit_}), got {len(concept)}.")
    fig = _figure(figsize)
    ax, ax_eig = fig.subplots(1, 2, width_ratios=[1.4, 1])
    xs = emb[:, 1] if emb.shape[1] > 1 else np.zeros(len(idx))
    ys = emb[:, 2] if emb.shape[1] > 2 else np.arange(len(idx), dtype=float)
    cmap = __import__("matplotlib").colormaps["tab10"]
    for j in range(k):
        sel = labels == j
        if concept is None:
            ax.scatter(xs[sel], ys[sel], s=14, color=cmap(j % 10), label=f"cluster {j} ({sel.sum()})")
        else:
            for val, marker in ((0, "o"), (1, "x")):
                part = sel & (concept == val)
                if part.any():
                    ax.scatter(xs[part], ys[part], s=18, marker=marker, color=cmap(j % 10),
                               label=f"cluster {j}, concept={val} ({part.sum()})")
    ax.set_xlabel("eigenvector 1")
    ax.set_ylabel("eigenvector 2" if emb.shape[1] > 2 else "sample")
    ax.set_title(f"SpRAy embedding, class {c!r}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax_eig.plot(np.arange(len(vals)), vals, "o-", color="k", ms=4)
    if 0 < k < len(vals):
        if getattr(spray, "cluster_selection", "eigengap") == "eigengap":
            label = f"eigengap -> {k} clusters"
        else:  # chosen by the silhouette of the partition; the gap is shown for reference
            conf = getattr(spray, "confidence_", {}).get(c, float("nan"))
            label = f"{k} clusters (silhouette {conf:.2f})"
        ax_eig.axvspan(k - 1, k, color="tab:orange", alpha=0.3, label=label)
        ax_eig.legend(fontsize=7, loc="lower right")
    ax_eig.set_xlabel("index")
    ax_eig.set_ylabel("eigenvalue (normalised Laplacian)")
    ax_eig.set_title("eigenvalues", fontsize=9)
    return fig


def _symmetric_limit(R):
    """Largest absolute value of ``R`` (1 for an all-zero map), the colour range ``[-v, v]``."""
    v = float(np.nanmax(np.abs(R))) if np.size(R) else 0.0
    return v if np.isfinite(v) and v > 0 else 1.0


def _grey(img):
    """Luminance of an (H, W) or (H, W, 3) image in [0, 1], as (H, W)."""
    return img if img.ndim == 2 else img[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)


def _relevance_2d(r):
    if hasattr(r, "detach"):
        r = r.detach().cpu().numpy()
    r = np.asarray(r, dtype=np.float32)
    if r.ndim == 3:  # (C, H, W) relevance: summed over channels as attribute() does
        r = r.sum(axis=0)
    if r.ndim != 2:
        raise ValueError(f"each relevance map must be (H, W) or (C, H, W), got shape {r.shape}.")
    return r


def overlay_relevance(ax, image, relevance, alpha=0.65, vmax=None):
    """Draw ``relevance`` over a greyed ``image`` on ``ax``, diverging colours centred at 0.

    Positive relevance (evidence for the explained class) is red, negative blue;
    the colour range is symmetric, ``[-vmax, vmax]`` (default: the map's largest
    absolute value), so white always means zero.

    Returns
    -------
    matplotlib.image.AxesImage
        The relevance layer (for a colour bar).
    """
    r = _relevance_2d(relevance)
    v = _symmetric_limit(r) if vmax is None else float(vmax)
    if image is not None:
        ax.imshow(_grey(_as_image(image)), cmap="gray", vmin=0, vmax=1)
    layer = ax.imshow(r, cmap="bwr", vmin=-v, vmax=v, alpha=alpha if image is not None else 1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    return layer


def plot_relevance_heatmaps(X, relevance, titles=None, n_cols=6, shared_scale=False,
                            figsize=None):
    """Relevance maps over their images: red where the pixel speaks for the class, blue against.

    Parameters
    ----------
    X : array-like or tensor of shape (n, C, H, W) or (n, H, W), or None
        The images (values in [0, 1]), drawn in grey under the maps; ``None``
        draws the maps alone.
    relevance : array-like of shape (n, H, W) or (n, C, H, W)
        E.g. :func:`skdebias.attribution.attribute`; channels are summed.
    titles : sequence of str, optional
        One title per image.
    n_cols : int, default=6
        Images per row.
    shared_scale : bool, default=False
        One colour range for all maps (compare magnitudes across images);
        default one per map (compare where the relevance sits).
    figsize : tuple, optional

    Returns
    -------
    fig : matplotlib.figure.Figure
        One panel per image and a colour bar; the colour map ``"bwr"`` is
        centred at 0 (white = no relevance).

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.plotting import plot_relevance_heatmaps
    >>> X = np.random.rand(3, 3, 8, 8); R = np.random.randn(3, 8, 8)
    >>> fig = plot_relevance_heatmaps(X, R, titles=["a", "b", "c"])
    >>> len(fig.axes)  # three panels and the colour bar
    4
    """
    R = relevance.detach().cpu().numpy() if hasattr(relevance, "detach") else np.asarray(relevance)
    if R.ndim not in (3, 4) or len(R) == 0:
        raise ValueError(f"relevance must have shape (n, H, W) or (n, C, H, W) with n >= 1, got "
                         f"{R.shape}.")
    n = len(R)
    if X is not None and len(X) != n:
        raise ValueError(f"X has {len(X)} images but relevance has {n} maps.")
    if titles is not None and len(titles) != n:
        raise ValueError(f"titles has {len(titles)} entries but relevance has {n} maps.")
    if not isinstance(n_cols, (int, np.integer)) or n_cols < 1:
        raise ValueError(f"n_cols must be a positive integer, got {n_cols!r}.")
    cols = min(int(n_cols), n)
    rows = -(-n // cols)
    fig = _figure(figsize or (1.5 * cols + 0.9, 1.6 * rows + 0.3))
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = _symmetric_limit(R) if shared_scale else None
    layer = None
    for i, ax in enumerate(axes.ravel()):
        if i >= n:
            ax.set_axis_off()
            continue
        layer = overlay_relevance(ax, None if X is None else _take(X, i), R[i], vmax=vmax)
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    cbar = fig.colorbar(layer, ax=axes, shrink=0.8, ticks=[layer.norm.vmin, 0, layer.norm.vmax])
    cbar.ax.set_yticklabels(["against", "0", "for"] if not shared_scale else
                            [f"{layer.norm.vmin:.2g}", "0", f"{layer.norm.vmax:.2g}"], fontsize=7)
    return fig


def _cluster_prototypes(spray, c, n):
    """Per cluster of class ``c``: the indices (into X) of the ``n`` members closest to the
    cluster's centre in the spectral embedding."""
    idx = spray.indices_[c]
    labels = spray.labels_[idx]
    k = spray.n_clusters_[c]
    emb = spray.embedding_[c][:, 1:max(k, 2)]
    out = []
    for j in range(k):
        members = np.flatnonzero(labels == j)
        d = np.linalg.norm(emb[members] - emb[members].mean(axis=0), axis=1)
        out.append(idx[members[np.argsort(d, kind="stable")[:n]]])
    return out


def plot_spray_clusters(spray, X, class_=None, n_prototypes=4, relevance=None, figsize=None):
    """The strategies SpRAy found for one class: prototype images and the mean heatmap per cluster.

    Parameters
    ----------
    spray : fitted SpectralRelevanceAnalysis
    X : array-like or tensor of shape (n_samples, C, H, W), or Dataset
        The images ``spray`` was fitted on.
    class_ : class label, optional
        Required when several classes were analysed.
    n_prototypes : int, default=4
        Images per cluster: the members nearest the cluster's centre in the
        spectral embedding.
    relevance : array-like of shape (n_samples, H, W), optional
        Full-size maps of the fitted samples for the mean heatmap; default the
        pooled, normalised maps SpRAy clustered (``spray.maps_``).
    figsize : tuple, optional

    Returns
    -------
    fig : matplotlib.figure.Figure
        One row per cluster: its size and separability, the prototypes, and
        the mean relevance of its members (diverging colours centred at 0). A
        small, well separated cluster whose heatmap sits off the object is a
        Clever-Hans candidate.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias import SpectralRelevanceAnalysis
    >>> from skdebias.plotting import plot_spray_clusters
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    >>> X = np.random.RandomState(0).rand(30, 1, 4, 4).astype("float32")
    >>> X[:10, 0, 0, 0] += 5   # a second strategy: a bright corner
    >>> spray = SpectralRelevanceAnalysis(net, method="gradient_x_input", n_clusters=2, map_size=4,
    ...                                   random_state=0).fit(X, np.zeros(30, dtype=int))
    >>> fig = plot_spray_clusters(spray, X, n_prototypes=2)
    >>> len(fig.axes)  # 2 clusters x (2 prototypes + mean map)
    6
    """
    if not isinstance(n_prototypes, (int, np.integer)) or n_prototypes < 1:
        raise ValueError(f"n_prototypes must be a positive integer, got {n_prototypes!r}.")
    c = spray._class_key(class_)
    idx = spray.indices_[c]
    labels = spray.labels_[idx]
    k = spray.n_clusters_[c]
    if relevance is not None:
        R = np.asarray(relevance, dtype=np.float32)
        if len(R) == spray.n_samples_fit_:
            R = R[idx]
        if len(R) != len(idx):
            raise ValueError(f"relevance must have one map per fitted sample "
                             f"({spray.n_samples_fit_}) or per sample of class {c!r} "
                             f"({len(idx)}), got {len(R)}.")
        R = R.reshape(len(R), *R.shape[-2:]) if R.ndim == 3 else R.sum(axis=1)
    else:
        M = spray.maps_[c]
        side = int(round(np.sqrt(M.shape[1])))
        if side * side != M.shape[1]:
            raise ValueError(f"SpRAy's pooled maps of class {c!r} are not square "
                             f"({M.shape[1]} pixels); pass the full-size maps as relevance=.")
        R = M.reshape(len(M), side, side)
    protos = _cluster_prototypes(spray, c, int(n_prototypes))
    cols = int(n_prototypes) + 1
    fig = _figure(figsize or (1.35 * cols + 1.2, 1.45 * k + 0.4))
    axes = fig.subplots(k, cols, squeeze=False)
    for j in range(k):
        for col in range(cols - 1):
            ax = axes[j, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(protos[j]):
                ax.set_axis_off()
                continue
            img = _as_image(_take(X, protos[j][col]))
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)
        mean = R[labels == j].mean(axis=0)
        overlay_relevance(axes[j, -1], None, mean)
        axes[j, -1].set_title("mean heatmap" if j == 0 else "", fontsize=7)
        axes[j, 0].set_ylabel(f"cluster {j}\n{int(spray.cluster_sizes_[c][j])} imgs\n"
                              f"sep {float(spray.separability_[c][j]):.2f}",
                              rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(f"SpRAy strategies of class {c!r}: prototypes and mean relevance", fontsize=9)
    return fig


def plot_cav_alignment(cav, A_with, A_without, bins=20, figsize=(5.5, 3.0)):
    """How well CAVs point along the true concept direction: per-pair cosines.

    For paired activations of the same images with and without the concept,
    ``d_i = A_with[i] - A_without[i]``; the histogram shows ``cos(d_i, cav)``
    per pair and the line ``cos(mean d, cav)`` (see
    :func:`skdebias.cav_alignment`). A CAV that captures the concept has
    both near 1.

    Parameters
    ----------
    cav : array-like of shape (n_features,), fitted CAVEstimator, or dict
        One direction, or ``{name: direction}`` to compare several.
    A_with, A_without : array-like of shape (n_pairs, n_features)
        Paired activations.
    bins : int, default=20
    figsize : tuple, default=(5.5, 3.0)

    Returns
    -------
    fig : matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.plotting import plot_cav_alignment
    >>> rng = np.random.RandomState(0)
    >>> A0 = rng.rand(50, 4); A1 = A0 + [1.0, 0, 0, 0] + 0.1 * rng.rand(50, 4)
    >>> fig = plot_cav_alignment({"true": [1, 0, 0, 0], "off": [0, 1, 0, 0]}, A1, A0)
    >>> len(fig.axes)
    1
    """
    from .concepts import cav_alignment

    cavs = cav if isinstance(cav, dict) else {"cav": cav}
    if not cavs:
        raise ValueError("cav is an empty dict; give at least one direction.")
    A_with = np.asarray(A_with, dtype=np.float64)
    A_without = np.asarray(A_without, dtype=np.float64)
    fig = _figure(figsize)
    ax = fig.subplots()
    cmap = __import__("matplotlib").colormaps["tab10"]
    edges = np.linspace(-1, 1, int(bins) + 1)
    for j, (name, vec) in enumerate(cavs.items()):
        vec = getattr(vec, "cav_", vec)
        summary = cav_alignment(vec, A_with, A_without)  # validates shapes, unit-normalises
        v = np.asarray(vec, dtype=np.float64)
        v = v / np.linalg.norm(v)
        D = A_with - A_without
        norms = np.linalg.norm(D, axis=1)
        cos = D[norms > 0] @ v / norms[norms > 0]
        color = cmap(j % 10)
        ax.hist(cos, bins=edges, alpha=0.45, color=color,
                label=f"{name}: cos(mean d, cav) = {summary['cos_mean_diff']:.2f}")
        ax.axvline(summary["cos_mean_diff"], color=color, lw=2)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("cos(d_i, cav) per image pair  (d = a(with) - a(without))")
    ax.set_ylabel("pairs")
    ax.set_title("CAV alignment with the true concept direction", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def plot_tcav(results, figsize=None):
    """TCAV scores with their spread over random concepts, beside random-vs-random runs.

    Parameters
    ----------
    results : Bunch or dict
        A :func:`skdebias.tcav_score` result, or ``{label: result}`` (e.g. one
        per model or layer).
    figsize : tuple, optional

    Returns
    -------
    fig : matplotlib.figure.Figure
        Per label, the concept's mean TCAV score (bar), the score against each
        random set (dots) and the random-vs-random scores (grey). A concept the
        network uses has its bar far from the grey one; ``*`` marks a
        significant t-test.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.utils import Bunch
    >>> from skdebias.plotting import plot_tcav
    >>> res = Bunch(scores=np.array([0.9, 0.8]), random_scores=np.array([0.5, 0.4]),
    ...             p_value=0.01, significant=True)
    >>> len(plot_tcav({"vanilla": res}).axes)
    1
    """
    if hasattr(results, "scores"):
        results = {"concept": results}
    if not isinstance(results, dict) or not results:
        raise ValueError("results must be a tcav_score result or a non-empty dict of them.")
    fig = _figure(figsize or (1.6 * len(results) + 2.4, 3.0))
    ax = fig.subplots()
    rng = np.random.RandomState(0)  # jitter of the dots only
    for i, (name, res) in enumerate(results.items()):
        for offset, values, color in ((-0.18, res.scores, "tab:red"),
                                      (0.18, res.random_scores, "0.6")):
            values = np.asarray(values, dtype=float)
            ax.bar(i + offset, values.mean(), width=0.34, color=color, alpha=0.6,
                   yerr=values.std(), capsize=3)
            ax.scatter(i + offset + rng.uniform(-0.08, 0.08, len(values)), values, s=10,
                       color="k", zorder=3)
        if getattr(res, "significant", False):
            ax.text(i, 1.03, "*", ha="center", fontsize=12)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(range(len(results)), [str(k) for k in results])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("TCAV score")
    ax.set_title("TCAV: concept (red) vs random concepts (grey); * p < alpha", fontsize=9)
    return fig


def plot_concept_sensitivity(sensitivity, log=True, figsize=None):
    """Concept sensitivity (mean ``|grad . cav|``) per layer, for one or several models.

    Parameters
    ----------
    sensitivity : dict
        ``{layer: value}`` or ``{layer: {model: value}}``, e.g. the
        ``"mean_abs"`` of :func:`skdebias.metrics.concept_sensitivity`.
    log : bool, default=True
        Logarithmic y axis (sensitivities span orders of magnitude after a
        correction).
    figsize : tuple, optional

    Returns
    -------
    fig : matplotlib.figure.Figure

    Examples
    --------
    >>> from skdebias.plotting import plot_concept_sensitivity
    >>> fig = plot_concept_sensitivity({"features.3": {"vanilla": 0.1, "RR-ClArC": 0.01},
    ...                                 "features.6": {"vanilla": 0.2, "RR-ClArC": 0.002}})
    >>> len(fig.axes)
    1
    """
    if not isinstance(sensitivity, dict) or not sensitivity:
        raise ValueError("sensitivity must be a non-empty dict {layer: value} or "
                         "{layer: {model: value}}.")
    layers = list(sensitivity)
    table = {k: (v if isinstance(v, dict) else {"model": v}) for k, v in sensitivity.items()}
    models = list(dict.fromkeys(m for v in table.values() for m in v))
    fig = _figure(figsize or (1.3 * len(layers) + 2.6, 3.0))
    ax = fig.subplots()
    width = 0.8 / len(models)
    cmap = __import__("matplotlib").colormaps["tab10"]
    for j, m in enumerate(models):
        vals = [float(table[layer].get(m, np.nan)) for layer in layers]
        ax.bar(np.arange(len(layers)) - 0.4 + width * (j + 0.5), vals, width=width,
               color=cmap(j % 10), label=str(m))
    ax.set_xticks(range(len(layers)), layers)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel("mean |grad . cav|")
    ax.set_xlabel("layer")
    ax.set_title("Concept sensitivity per layer", fontsize=9)
    if len(models) > 1:
        ax.legend(fontsize=7)
    return fig


def plot_correction_comparison(rows, metrics=None, figsize=None):
    """Before / after a correction: one panel per metric, one bar per method.

    Parameters
    ----------
    rows : list of dict
        One per method with a ``"method"`` key, e.g. the rows of the demo's
        correction table (``clean acc``, ``attacked acc``, ``concept
        sensitivity``, ``artifact relevance``).
    metrics : sequence of str, optional
        Keys to plot (default: every numeric key of the first row except
        ``fit s`` and ``sensitivity ratio``).
    figsize : tuple, optional

    Returns
    -------
    fig : matplotlib.figure.Figure

    Examples
    --------
    >>> from skdebias.plotting import plot_correction_comparison
    >>> rows = [{"method": "vanilla", "clean acc": 0.97, "attacked acc": 0.80},
    ...         {"method": "RR-ClArC", "clean acc": 0.96, "attacked acc": 0.95}]
    >>> len(plot_correction_comparison(rows).axes)
    2
    """
    if not rows or not all(isinstance(r, dict) and "method" in r for r in rows):
        raise ValueError("rows must be a non-empty list of dicts with a 'method' key.")
    if metrics is None:
        skip = ("method", "fit s", "sensitivity ratio")
        metrics = [k for k, v in rows[0].items() if k not in skip
                   and isinstance(v, (int, float, np.integer, np.floating))
                   and not isinstance(v, bool)]
    missing = [m for m in metrics if any(m not in r for r in rows)]
    if missing or not metrics:
        raise ValueError(f"metrics {missing or metrics!r} are not in every row; the rows have "
                         f"{sorted(rows[0])}.")
    methods = [str(r["method"]) for r in rows]
    fig = _figure(figsize or (2.5 * len(metrics) + 0.4, 2.9))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    cmap = __import__("matplotlib").colormaps["tab10"]
    for ax, m in zip(axes, metrics):
        vals = np.array([np.nan if r[m] is None else float(r[m]) for r in rows])
        ax.bar(range(len(rows)), vals, color=[cmap(j % 10) for j in range(len(rows))])
        ax.set_xticks(range(len(rows)), methods, rotation=40, ha="right", fontsize=7)
        ax.set_title(m, fontsize=9)
        if "acc" in m:
            ax.set_ylim(0, 1)
        elif np.all(vals[np.isfinite(vals)] > 0) and np.nanmax(vals) > 100 * np.nanmin(vals):
            ax.set_yscale("log")
        for j, v in enumerate(vals):
            if np.isfinite(v):
                ax.text(j, v, f"{v:.2g}", ha="center", va="bottom", fontsize=6)
    fig.suptitle("Correction comparison", fontsize=9)
    return fig
