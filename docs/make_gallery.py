"""Draw the figures of docs/gallery.md: one PNG per function of skdebias.plotting.

    python docs/make_gallery.py                   # writes docs/images/gallery_*.png
    python docs/make_gallery.py --screenshot      # also the report's first screen
    python docs/make_gallery.py --quick --out DIR # small and fast (what the test runs)

A SmallCNN is trained on artifact digits (a red patch in 30 % of the zeros), audited with
the public API, and corrected with P-ClArC (no training), so every plot shows real results.
The screenshot needs Chromium (Debian's ``chromium`` package) and the playwright package.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = "/usr/bin/chromium"
#: Chromium switches for a headless run that never goes on the network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-quic"]

#: File name of each plot function's figure (without the folder).
FIGURES = {
    "plot_relevance_heatmaps": "gallery_relevance_heatmaps.png",
    "plot_spray_clusters": "gallery_spray_clusters.png",
    "plot_spray_embedding": "gallery_spray_embedding.png",
    "plot_spuriosity_grid": "gallery_spuriosity_grid.png",
    "plot_cav_alignment": "gallery_cav_alignment.png",
    "plot_tcav": "gallery_tcav.png",
    "plot_concept_sensitivity": "gallery_concept_sensitivity.png",
    "plot_correction_comparison": "gallery_correction_comparison.png",
}
SCREENSHOT = "report_first_screen.png"


def make_figures(out, quick=False, seed=0):
    """Write every figure of :data:`FIGURES` into ``out``; returns ``{function: path}``."""
    from skdebias import (
        ActivationExtractor,
        CAVEstimator,
        ClassArtifactCompensator,
        SpectralRelevanceAnalysis,
        SpuriosityRanker,
        tcav_score,
    )
    from skdebias import plotting
    from skdebias.attribution import attribute
    from skdebias.datasets import make_artifact_digits
    from skdebias.metrics import attacked_accuracy, concept_sensitivity
    from skdebias.models import SmallCNN, make_classifier

    os.makedirs(out, exist_ok=True)
    layer = "features.6"
    data = make_artifact_digits(target_class=0, p=0.3, artifact="patch", random_state=seed)
    if quick:  # a third of the training images
        keep = np.arange(len(data.y)) % 3 == 0
        data.X, data.y, data.concept = data.X[keep], data.y[keep], data.concept[keep]
    net = make_classifier(SmallCNN, max_epochs=1 if quick else 6, lr=2e-3, device="cpu",
                          random_state=seed).fit(data.X, data.y)
    zeros = data.y == 0
    figs = {}

    # where the network looks on test digits with the patch pasted in
    idx = np.flatnonzero(data.y_test != 0)[:4 if quick else 6]
    X_att = data.add_artifact(data.X_test[idx])
    R = attribute(net, X_att, device="cpu")
    pred = net.predict(X_att)
    figs["plot_relevance_heatmaps"] = plotting.plot_relevance_heatmaps(
        X_att, R, titles=[f"true {t} -> pred {p}" for t, p in zip(data.y_test[idx], pred)])

    # SpRAy on the zeros: the patched ones form their own strategy
    spray = SpectralRelevanceAnalysis(net, classes=[0], max_clusters=4, device="cpu",
                                      random_state=seed).fit(data.X, data.y)
    figs["plot_spray_embedding"] = plotting.plot_spray_embedding(spray, concept=data.concept)
    figs["plot_spray_clusters"] = plotting.plot_spray_clusters(spray, data.X,
                                                               n_prototypes=3 if quick else 4)

    # CAVs of the patch at the last convolution, and the spuriosity along them
    ext = ActivationExtractor(net, layer=layer, device="cpu").fit(data.X)
    A = ext.transform(data.X)
    cavs = {m: CAVEstimator(method=m, random_state=seed).fit(A[zeros], data.concept[zeros])
            for m in ("pattern", "svm")}
    X_test0 = data.X_test[data.y_test == 0][:40]
    figs["plot_cav_alignment"] = plotting.plot_cav_alignment(
        {m: c.cav_ for m, c in cavs.items()}, ext.transform(data.add_artifact(data.X_test)),
        ext.transform(data.X_test))
    s = SpuriosityRanker(cav={0: cavs["pattern"].cav_}, k=5).fit(A, data.y).score_samples(A, data.y)
    figs["plot_spuriosity_grid"] = plotting.plot_spuriosity_grid(data.X, data.y, s, n=4)

    # P-ClArC: projects the patch direction out at the layer (no training)
    pclarc = ClassArtifactCompensator(net, layer, device="cpu").fit(
        data.X, data.y, np.where(zeros, data.concept, -1))
    models = {"vanilla": net, "P-ClArC": pclarc}
    X_att0 = data.add_artifact(X_test0)
    rng = np.random.RandomState(seed)
    random_X = data.X[rng.choice(np.flatnonzero(~zeros), 100, replace=False)]
    concept_X = data.X[zeros & (data.concept == 1)][:30]
    figs["plot_tcav"] = plotting.plot_tcav({
        name: tcav_score(getattr(m, "estimator_", m), X_test0, layer, concept_X, random_X,
                         target=0, n_random=4, cav_method="pattern", random_state=seed)
        for name, m in models.items()})
    sens = {}
    for name_layer in ("features.3", layer):
        A_l = ActivationExtractor(net, layer=name_layer, device="cpu").fit_transform(data.X[zeros])
        cav_l = CAVEstimator().fit(A_l, data.concept[zeros]).cav_
        # P-ClArC reads its uncompensated activation at measure_layer_
        sens[name_layer] = {
            name: concept_sensitivity(m, X_att0, getattr(m, "measure_layer_", name_layer)
                                      if name_layer == layer else name_layer, cav_l,
                                      target=0)["mean_abs"]
            for name, m in models.items()}
    figs["plot_concept_sensitivity"] = plotting.plot_concept_sensitivity(sens)
    rows = [{"method": name,
             "clean acc": float(np.mean(m.predict(data.X_test) == data.y_test)),
             "attacked acc": attacked_accuracy(m, data.X_test, data.y_test, data.add_artifact),
             "concept sensitivity": sens[layer][name]} for name, m in models.items()]
    figs["plot_correction_comparison"] = plotting.plot_correction_comparison(rows)

    paths = {}
    for name, fig in figs.items():
        paths[name] = os.path.join(out, FIGURES[name])
        fig.savefig(paths[name], dpi=80)
    return paths


def screenshot(html, png, width=1280, height=800):
    """A PNG of the first screen of ``html`` in headless Chromium; returns the page's
    ``naturalWidth`` of every image (0 for an image that did not load) and the errors."""
    from playwright.sync_api import sync_playwright

    errors = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto("file://" + os.path.abspath(html), wait_until="load")
            widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
            page.screenshot(path=png)
        finally:
            browser.close()
    return widths, errors


def make_screenshot(out, quick=False):
    """Build a demo report (audit only when ``quick``) and save its first screen."""
    from skdebias._demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        html = os.path.join(tmp, "report.html")
        kw = dict(methods=("vanilla", "P-ClArC")) if quick else {}
        run_demo(epochs=2 if quick else 8, verbose=False, device="cpu", report=html, **kw)
        path = os.path.join(out, SCREENSHOT)
        widths, errors = screenshot(html, path)
    if errors or not all(widths):
        raise RuntimeError(f"the report did not render cleanly: errors {errors}, image widths "
                           f"{widths}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "images"))
    parser.add_argument("--quick", action="store_true", help="short training, fewer images")
    parser.add_argument("--screenshot", action="store_true",
                        help=f"also write {SCREENSHOT} (needs Chromium and playwright)")
    args = parser.parse_args(argv)
    for path in make_figures(args.out, quick=args.quick).values():
        print(path)
    if args.screenshot:
        print(make_screenshot(args.out, quick=args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main())
