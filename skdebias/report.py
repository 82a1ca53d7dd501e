"""The HTML audit report, and the plain-text tables and JSON output shared by the CLI and the
benchmarks."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from contextlib import contextmanager

import numpy as np

__all__ = ["AuditReport", "format_table", "write_json", "Timer", "mean_std", "environment"]


def _fmt(value, floatfmt):
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "nan"
        return format(float(value), floatfmt)
    return str(value)


def format_table(rows, columns=None, floatfmt=".3f", title=None):
    """Render a list of dicts as an aligned plain-text table.

    Parameters
    ----------
    rows : list of dict
    columns : list of str, optional
        Column order (default: keys of the first row).
    floatfmt : str, default=".3f"
    title : str, optional

    Examples
    --------
    >>> print(format_table([{"method": "pattern", "cos": 0.98765}]))
    method   cos
    -------  -----
    pattern  0.988
    """
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, ""), floatfmt) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [] if title is None else [title]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)
    return "\n".join(lines)


def _jsonable(obj):
    """``obj`` with numpy values as Python ones, NaN/inf floats as ``None`` (JSON null) and
    classes as their dotted names."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, type):  # a setting such as optimizer=torch.optim.SGD: its dotted name
        return f"{obj.__module__}.{obj.__qualname__}"
    return obj


def environment():
    """Versions and hardware facts to store beside measured numbers."""
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _new_file_mode(path):
    """The permissions ``open(path, "w")`` gives: the old file's, else 0o666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json(path, payload):
    """Write ``payload`` as indented JSON, atomically, creating folders.

    The whole text is built before anything is written, then written to a
    temporary file in the target's folder and moved onto ``path``: an error or
    a kill midway leaves the previous file as it was.

    Parameters
    ----------
    path : str or path-like
        Target file; its folders are created.
    payload : object
        Dicts, lists, tuples, numbers, strings, ``None``, numpy scalars and
        arrays. NaN and infinite floats are written as ``null`` (JSON has no
        NaN).

    Returns
    -------
    path
        ``path`` as given.

    Raises
    ------
    TypeError
        If ``payload`` holds an object JSON cannot encode (nothing is written).
    """
    text = json.dumps(_jsonable(payload), indent=2, allow_nan=False)
    # write through a symlink as open(path, "w") did, instead of replacing the link itself
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    mode = _new_file_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes the file private (0o600)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself survives a power cut only once the folder is synced (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def anonymous_memory():
    """This process's anonymous resident memory in bytes (``RssAnon`` of /proc/self/status;
    Linux only: raises ``OSError`` elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    raise OSError("anonymous memory is read from /proc/self/status (RssAnon), which this "
                  "system does not provide.")


def peak_memory_growth(fn):
    """``(fn(), peak growth of anonymous memory in bytes)`` while ``fn()`` runs, sampled every
    millisecond by a thread (:func:`anonymous_memory`).

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.report import peak_memory_growth
    >>> out, grown = peak_memory_growth(lambda: np.ones(2**24).sum())
    >>> int(out), grown > 2**26
    (16777216, True)
    """
    import threading

    base, peak, done = anonymous_memory(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_memory())
            done.wait(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out = fn()
    finally:
        done.set()
        thread.join()
    return out, max(peak[0], anonymous_memory()) - base


class Timer:
    """Wall-clock seconds of named blocks: ``with timer("fit"): ...``; ``timer["fit"]``."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def __getitem__(self, name):
        return self.seconds[name]


def mean_std(values, fmt=".3f"):
    """``"m ± s"`` of a sequence of numbers."""
    values = np.asarray(values, dtype=float)
    return f"{format(values.mean(), fmt)} ± {format(values.std(ddof=0), fmt)}"


# ----------------------------------------------------------------------------- HTML report
def jinja_environment():
    """The jinja2 environment of the report templates; raises an ImportError naming the extra
    ``skdebias[report]`` when jinja2 is missing (call it to check before long work)."""
    try:
        import jinja2
    except ImportError:
        raise ImportError("The HTML report needs jinja2: pip install skdebias[report]") from None
    return jinja2.Environment(loader=jinja2.PackageLoader("skdebias", "templates"),
                              autoescape=jinja2.select_autoescape(["html"]),
                              undefined=jinja2.StrictUndefined)


def _png(fig, dpi):
    """``fig`` as PNG bytes and its pixel size; the figure is closed (no pyplot state is used)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    width, height = (int(round(v * dpi)) for v in fig.get_size_inches())
    return buf.getvalue(), width, height


def _cell(value):
    if isinstance(value, (float, np.floating)):
        return _fmt(value, ".3g" if abs(value) < 1e-2 and value != 0 else ".3f")
    return "" if value is None else str(value)


def _table(rows, caption=None, text=False):
    """A table for the template; ``text`` aligns every column left (default: numbers right)."""
    columns = list(rows[0].keys())
    return {"columns": columns, "rows": [[_cell(r.get(c)) for c in columns] for r in rows],
            "caption": caption, "text": text}


def _section(id_, title, note=None):
    return {"id": id_, "title": title, "note": note, "text": [], "tables": [], "figures": [],
            "children": [], "css": None}


class AuditReport:
    """One self-contained HTML page with the results of an audit: tables, heatmaps and plots.

    Built from what an audit produced; every argument is optional, and a
    section without data is kept with a one-line note saying what to pass.
    Figures are embedded as PNG (no external files, no network access when
    the page is opened), so the file can be mailed or archived as it is.

    Parameters
    ----------
    model : torch.nn.Module, skorch NeuralNet or fitted corrector, optional
        The audited network (summary; predictions when ``y_pred`` is not given).
    X : array-like or tensor of shape (n_samples, C, H, W), optional
        The audited images, values in [0, 1]. Rows of ``spray`` and
        ``spuriosity`` refer to these images.
    y : array-like of shape (n_samples,), optional
        Their labels (class indices of the network's outputs).
    y_pred : array-like of shape (n_samples,), optional
        Predicted labels; default ``model``'s predictions on ``X``.
    class_names : sequence of str, optional
        One name per class index.
    spray : fitted SpectralRelevanceAnalysis, optional
        Fitted on ``X`` and ``y``: the strategies section.
    spuriosity : array-like of shape (n_samples,), optional
        Spuriosity of each image of ``X`` (e.g.
        :meth:`SpuriosityRanker.score_samples <skdebias.SpuriosityRanker.score_samples>`).
    cav : array-like of shape (n_features,), fitted CAVEstimator or dict, optional
        The concept direction(s), ``{name: direction}`` to compare several.
    concept_pairs : tuple (A_with, A_without), optional
        Activations of the same images with and without the concept (for the
        CAV alignment).
    tcav : Bunch or dict, optional
        A :func:`skdebias.tcav_score` result, or ``{label: result}``.
    sensitivity : dict, optional
        Concept sensitivity ``{layer: value}`` or ``{layer: {model: value}}``.
    heatmaps : tuple (images, relevance) or dict, optional
        Relevance maps to show over their images, e.g. of images with the
        artifact; a dict has keys ``X``, ``relevance`` and optionally ``titles``.
    correction : list of dict, optional
        Before / after table, one row per method with a ``"method"`` key.
    corrected : AuditReport, optional
        The same sections for the corrected model (its title heads them).
    title : str, default="Audit report"
    description : str, optional
        A paragraph under the model and data summary.
    max_classes : int, default=4
        Classes shown in the per-class figures (SpRAy, spuriosity).
    n_images : int, default=5
        Images per end of the spuriosity grid and prototypes per SpRAy cluster.
    dpi : int, default=80
        Resolution of the embedded figures.
    notes : dict, optional
        ``{section id: note}`` replacing the default note of a section left
        empty (ids in :attr:`SECTIONS`), e.g. why a step did not run.

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.report import AuditReport
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(12, 3, 8, 8); y = np.repeat([0, 1], 6)
    >>> report = AuditReport(X=X, y=y, y_pred=y, spuriosity=rng.rand(12), n_images=2)
    >>> html = report.to_html()
    >>> html.startswith("<!DOCTYPE html>"), "Spuriosity" in html
    (True, True)
    """

    #: Section ids and titles, in page order.
    SECTIONS = (("summary", "Model and data"), ("accuracy", "Per-class accuracy"),
                ("strategies", "Discovered strategies (SpRAy)"),
                ("spuriosity", "Spuriosity: most and least spurious images"),
                ("concept", "The concept: CAV alignment, TCAV and sensitivity"),
                ("heatmaps", "Relevance heatmaps"), ("correction", "Correction"))

    def __init__(self, model=None, X=None, y=None, *, y_pred=None, class_names=None, spray=None,
                 spuriosity=None, cav=None, concept_pairs=None, tcav=None, sensitivity=None,
                 heatmaps=None, correction=None, corrected=None, title="Audit report",
                 description=None, max_classes=4, n_images=5, dpi=80, notes=None):
        self.model = model
        self.X = X
        self.y = y
        self.y_pred = y_pred
        self.class_names = class_names
        self.spray = spray
        self.spuriosity = spuriosity
        self.cav = cav
        self.concept_pairs = concept_pairs
        self.tcav = tcav
        self.sensitivity = sensitivity
        self.heatmaps = heatmaps
        self.correction = correction
        self.corrected = corrected
        self.title = title
        self.description = description
        self.max_classes = max_classes
        self.n_images = n_images
        self.dpi = dpi
        self.notes = notes
        self._sections = None
        self._pngs = {}

    # -- checks and helpers
    def _check(self):
        from ._utils._validation import check_int

        check_int("max_classes", self.max_classes)
        check_int("n_images", self.n_images)
        check_int("dpi", self.dpi, low=20)
        n = None if self.X is None else len(self.X)
        for name in ("y", "y_pred", "spuriosity"):
            value = getattr(self, name)
            if value is not None and n is not None and len(value) != n:
                raise ValueError(f"{name} has {len(value)} entries but X has {n} images.")
        if self.spuriosity is not None and (self.X is None or self.y is None):
            raise ValueError("spuriosity needs X and y (the images it scores and their classes).")
        if self.spray is not None and self.X is None:
            raise ValueError("spray needs X, the images it was fitted on.")
        if self.spray is not None and self.spray.n_samples_fit_ != n:
            raise ValueError(f"spray was fitted on {self.spray.n_samples_fit_} samples but X has "
                             f"{n} images; pass the images it was fitted on.")
        ids = [i for i, _ in self.SECTIONS]
        unknown = sorted(set(self.notes or {}) - set(ids))
        if unknown:
            raise ValueError(f"notes has unknown section ids {unknown}; choose from {ids}.")
        if self.corrected is not None and not isinstance(self.corrected, AuditReport):
            raise ValueError(f"corrected must be an AuditReport of the corrected model, got "
                             f"{type(self.corrected).__name__}.")

    def _name(self, c):
        if self.class_names is not None and 0 <= int(c) < len(self.class_names):
            return str(self.class_names[int(c)])
        return str(c)

    def _module(self):
        """The ``torch.nn.Module`` of ``model`` (a corrector's is its corrected network)."""
        from ._utils._modules import get_module

        return get_module(getattr(self.model, "estimator_", self.model))

    def _predictions(self):
        if self.y_pred is not None:
            return np.asarray(self.y_pred).ravel()
        if self.model is None or self.X is None:
            return None
        from ._utils._modules import predict_proba

        self.y_pred = predict_proba(self._module(), self.X).argmax(axis=1)
        return self.y_pred

    def _figure(self, section, key, fig, caption, alt):
        data, width, height = _png(fig, self.dpi)
        name = f"{section['id']}_{key}"
        self._pngs[name] = data
        import base64

        section["figures"].append({"data": base64.b64encode(data).decode("ascii"),
                                   "caption": caption, "alt": alt, "width": width,
                                   "height": height})

    # -- sections
    def _summary(self, s):
        rows = []
        if self.model is not None:
            module = self._module()
            n_params = sum(p.numel() for p in module.parameters())
            rows += [{"item": "network", "value": type(module).__name__},
                     {"item": "parameters", "value": f"{n_params:,}"},
                     {"item": "layers (leaf modules)",
                      "value": sum(1 for m in module.modules() if not list(m.children()))}]
        if self.X is not None:
            shape = tuple(np.shape(self.X[0])) if len(self.X) else ()
            rows += [{"item": "images", "value": len(self.X)},
                     {"item": "image shape", "value": "x".join(map(str, shape))}]
        if self.y is not None:
            classes, counts = np.unique(np.asarray(self.y), return_counts=True)
            rows.append({"item": "classes", "value": len(classes)})
            rows.append({"item": "images per class",
                         "value": ", ".join(f"{self._name(c)}: {k}"
                                            for c, k in zip(classes, counts))})
        if not rows:
            s["note"] = "No model or data given (pass model=, X=, y=)."
            return
        if self.description:
            s["text"].append(self.description)
        s["tables"].append(_table(rows, text=True))

    def _accuracy(self, s):
        y_pred = self._predictions()
        if self.y is None or y_pred is None:
            s["note"] = "Needs labels and predictions (pass y= and model= or y_pred=)."
            return
        y = np.asarray(self.y).ravel()
        rows = [{"class": self._name(c), "images": int((y == c).sum()),
                 "accuracy": float(np.mean(y_pred[y == c] == c))} for c in np.unique(y)]
        rows.append({"class": "all", "images": len(y), "accuracy": float(np.mean(y_pred == y))})
        s["tables"].append(_table(rows, "Accuracy per class on the audited images. A class "
                                        "far below the others may rely on a cue that its "
                                        "images do not all share."))

    def _strategies(self, s):
        if self.spray is None:
            s["note"] = "No SpRAy result (pass spray=, a fitted SpectralRelevanceAnalysis)."
            return
        from .detection import WEAK_CONFIDENCE
        from .plotting import plot_spray_clusters, plot_spray_embedding

        classes = self.spray.classes_.tolist()
        shown = classes[:self.max_classes]
        if len(shown) < len(classes):
            s["text"].append(f"The first {len(shown)} of {len(classes)} analysed classes "
                             f"(max_classes={self.max_classes}).")
        rows = [dict(r, **{"class": self._name(r["class"])}) for r in self.spray.summary()
                if r["class"] in shown]
        s["tables"].append(_table(rows, "Clusters of relevance maps per class. A small cluster "
                                        "with high separability is a distinct strategy, often "
                                        "a Clever Hans."))
        weak = [self._name(c) for c in self.spray.weak_classes_ if c in shown]
        if weak:
            s["text"].append(
                f"The clusters of {', '.join(map(str, weak))} barely separate (confidence below "
                f"{WEAK_CONFIDENCE}): they most often cut one continuous strategy rather than "
                "separate distinct ones. Read them as one strategy unless the images of a "
                "cluster show otherwise.")
        for c in shown:
            sub = _section(f"strategies-{c}", f"Class {self._name(c)}")
            self._figure(sub, f"embedding_{c}", plot_spray_embedding(self.spray, class_=c),
                         "Left: the images of the class in the spectral embedding of their "
                         "relevance maps, one colour per cluster. Right: the smallest eigenvalues "
                         "of the graph Laplacian, shaded at the number of clusters chosen (by the "
                         "eigengap, or by the silhouette given in the legend: near 1 the "
                         "strategies are clearly distinct). Look for a cluster that lies apart "
                         "from the rest.",
                         f"SpRAy embedding of class {self._name(c)}")
            self._figure(sub, f"clusters_{c}",
                         plot_spray_clusters(self.spray, self.X, class_=c,
                                             n_prototypes=self.n_images),
                         "Each row is one strategy: the images nearest its centre and the mean "
                         "relevance of its members (red for, blue against the class). A strategy "
                         "whose relevance sits off the object (a corner, a mark, the background) "
                         "is a shortcut.", f"SpRAy clusters of class {self._name(c)}")
            s["children"].append(sub)

    def _spuriosity(self, s):
        if self.spuriosity is None:
            s["note"] = ("No spuriosity scores (pass spuriosity=, e.g. "
                         "SpuriosityRanker.score_samples).")
            return
        from .plotting import plot_spuriosity_grid

        y = np.asarray(self.y).ravel()
        sp = np.asarray(self.spuriosity, dtype=np.float64).ravel()
        classes = [c for c in np.unique(y).tolist() if np.isfinite(sp[y == c]).any()]
        if not classes:
            s["note"] = "Every spuriosity value is NaN: no class was scored."
            return
        y_pred = self._predictions()
        if y_pred is not None:
            k = int(min(10, *(np.isfinite(sp[y == c]).sum() // 2 for c in classes)))
            rows = []
            for c in classes:
                idx = np.flatnonzero((y == c) & np.isfinite(sp))
                order = idx[np.argsort(sp[idx], kind="stable")]
                low, high = order[:k], order[len(order) - k:]
                acc_low = float(np.mean(y_pred[low] == y[low]))
                acc_high = float(np.mean(y_pred[high] == y[high]))
                rows.append({"class": self._name(c), "k": k, "acc. least spurious": acc_low,
                             "acc. most spurious": acc_high, "gap": acc_high - acc_low})
            if k >= 1:
                s["tables"].append(_table(rows, "Accuracy on the k most minus the k least "
                                                "spurious images per class. A large positive gap "
                                                "means the network is right when the cue is "
                                                "there and wrong without it."))
        shown = classes[:self.max_classes]
        fig = plot_spuriosity_grid(self.X, y, sp, n=self.n_images, classes=shown,
                                   class_names={c: self._name(c) for c in shown})
        self._figure(s, "grid", fig,
                     "Per class, the images with the lowest (left, blue frames) and highest "
                     "(right, red frames) spuriosity. The right-hand images should show the "
                     "spurious cue, the left-hand ones should not.", "spuriosity grid")

    def _concept(self, s):
        from .plotting import plot_cav_alignment, plot_concept_sensitivity, plot_tcav

        if self.cav is not None and self.concept_pairs is not None:
            A_with, A_without = self.concept_pairs
            self._figure(s, "cav_alignment", plot_cav_alignment(self.cav, A_with, A_without),
                         "Cosine between the CAV and the change of the activation when the concept "
                         "is added to an image, per image pair; the line is the cosine with the "
                         "mean change. Near 1: the CAV points along the concept and not along a "
                         "correlated feature.", "CAV alignment")
        if self.tcav is not None:
            # a tcav_score result is a Bunch (a dict) itself
            res = {"concept": self.tcav} if hasattr(self.tcav, "scores") else self.tcav
            rows = [{"": name, "TCAV mean": float(np.mean(r.scores)),
                     "TCAV std": float(np.std(r.scores)),
                     "random mean": float(np.mean(r.random_scores)),
                     "p-value": getattr(r, "p_value", None)} for name, r in res.items()]
            s["tables"].append(_table(rows))
            self._figure(s, "tcav", plot_tcav(res),
                         "The share of images whose class logit rises when the activation moves "
                         "along the concept (red), against the same score for random directions "
                         "(grey), with the spread over random sets. A red bar far above the grey "
                         "one means the network uses the concept for this class.", "TCAV scores")
        if self.sensitivity is not None:
            self._figure(s, "sensitivity", plot_concept_sensitivity(self.sensitivity),
                         "Mean absolute directional derivative of the class logit along the CAV, "
                         "per layer. After a correction it should drop by orders of magnitude at "
                         "the corrected layer.", "concept sensitivity per layer")
        if not s["figures"]:
            s["note"] = ("No concept results (pass cav= with concept_pairs=, tcav= or "
                         "sensitivity=).")

    def _heatmaps(self, s):
        if self.heatmaps is None:
            s["note"] = "No relevance maps (pass heatmaps=(images, relevance))."
            return
        from .plotting import plot_relevance_heatmaps

        h = self.heatmaps
        if isinstance(h, dict):
            images, R, titles = h.get("X"), h["relevance"], h.get("titles")
        else:
            (images, R), titles = h, None
        self._figure(s, "relevance", plot_relevance_heatmaps(images, R, titles=titles),
                     "Relevance of each pixel for the explained class over the greyed image: red "
                     "speaks for the class, blue against it, white is neutral (the colour scale "
                     "is centred at 0 per image). Relevance concentrated on the artifact rather "
                     "than the object shows the shortcut.", "relevance heatmaps")

    def _correction(self, s):
        if self.correction is None and self.corrected is None:
            s["note"] = "No correction ran (pass correction= rows and corrected=)."
            return
        if self.correction:
            from .plotting import plot_correction_comparison

            s["tables"].append(_table(self.correction, "Before (vanilla) and after each "
                                                       "correction."))
            self._figure(s, "comparison", plot_correction_comparison(self.correction),
                         "Each panel compares the methods on one measure. A good correction keeps "
                         "the clean accuracy, raises the accuracy on images with the artifact, and "
                         "lowers the concept sensitivity and the relevance on the artifact.",
                         "correction comparison")
        if self.corrected is not None:
            sub = _section("corrected", self.corrected.title)
            sub["css"] = "corrected"
            for child in self.corrected._build():
                if child["id"] in ("summary", "correction") or child["note"]:
                    continue
                child = dict(child, id=f"corrected-{child['id']}",
                             children=[dict(c, id=f"corrected-{c['id']}")
                                       for c in child["children"]])
                sub["children"].append(child)
            self._pngs.update({f"corrected_{k}": v for k, v in self.corrected._pngs.items()})
            s["children"].append(sub)

    def _build(self):
        if self._sections is None:
            self._check()
            sections = []
            for id_, title in self.SECTIONS:
                s = _section(id_, title)
                getattr(self, f"_{id_}")(s)
                if s["note"] and id_ in (self.notes or {}):
                    s["note"] = str(self.notes[id_])
                sections.append(s)
            self._sections = sections
        return self._sections

    # -- output
    def to_html(self):
        """The report as one HTML string (figures inline as base64 PNG)."""
        from importlib.metadata import PackageNotFoundError, version

        try:  # the installed version (importing the package here would be an import cycle)
            installed = version("skdebias")
        except PackageNotFoundError:  # pragma: no cover - run from a source tree
            installed = "(not installed)"
        sections = self._build()
        template = jinja_environment().get_template("report.html")
        return template.render(title=self.title, version=installed,
                               created=time.strftime("%Y-%m-%d %H:%M"), sections=sections)

    def save(self, path):
        """Write the report to ``path`` (folders are created); returns ``path``."""
        html = self.to_html()
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(html)
        return path

    def figures(self):
        """``{name: PNG bytes}`` of every figure of the report (the corrected model's included)."""
        self._build()
        return dict(self._pngs)

    def save_figures(self, folder):
        """Write every figure as ``folder/<name>.png``; returns the list of paths."""
        os.makedirs(folder, exist_ok=True)
        paths = []
        for name, data in self.figures().items():
            path = os.path.join(folder, f"{name}.png")
            with open(path, "wb") as fh:
                fh.write(data)
            paths.append(path)
        return paths
