"""Figures for inspection: spuriosity extremes per class and SpRAy embeddings.

Every function returns a :class:`matplotlib.figure.Figure` and never shows it;
save it with ``fig.savefig(path)``. No pyplot state is used, so the functions
work with any backend (also headless).
"""

from __future__ import annotations

import numpy as np

__all__ = ["plot_spuriosity_grid", "plot_spray_embedding"]


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
        ax_eig.axvspan(k - 1, k, color="tab:orange", alpha=0.3, label=f"eigengap -> {k} clusters")
        ax_eig.legend(fontsize=7, loc="lower right")
    ax_eig.set_xlabel("index")
    ax_eig.set_ylabel("eigenvalue (normalised Laplacian)")
    ax_eig.set_title("eigenvalues", fontsize=9)
    return fig
