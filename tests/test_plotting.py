"""skdebias.plotting: every function returns a matplotlib Figure and leaves pyplot alone."""

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from skdebias.plotting import (  # noqa: E402
    plot_cav_alignment,
    plot_concept_sensitivity,
    plot_correction_comparison,
    plot_relevance_heatmaps,
    plot_spray_clusters,
    plot_spray_embedding,
    plot_spuriosity_grid,
    plot_tcav,
)


def test_plot_spuriosity_grid():
    rng = np.random.RandomState(0)
    X = rng.rand(30, 3, 8, 8).astype(np.float32)
    y = np.repeat([0, 1, 2], 10)
    s = rng.rand(30)
    s[y == 2] = np.nan
    fig = plot_spuriosity_grid(X, y, s, n=3, class_names={0: "zero", 1: "one"})
    assert len(fig.axes) == 2 * 6  # classes 0 and 1, 3 + 3 images each
    ax = fig.axes[0]
    assert ax.get_ylabel() == "zero"
    # the first column holds the lowest, the last the highest spuriosity of the class
    assert float(fig.axes[0].get_title()) == pytest.approx(np.nanmin(s[y == 0]), abs=5e-3)
    assert float(fig.axes[5].get_title()) == pytest.approx(np.nanmax(s[y == 0]), abs=5e-3)
    with pytest.raises(ValueError, match="spuriosity has 29 entries"):
        plot_spuriosity_grid(X, y, s[:-1])
    with pytest.raises(ValueError, match="No class has finite spuriosity"):
        plot_spuriosity_grid(X, y, np.full(30, np.nan))
    # a sequence names every class of y (sorted), also when a class is not plotted
    s_first_nan = rng.rand(30)
    s_first_nan[y == 0] = np.nan
    fig = plot_spuriosity_grid(X, y, s_first_nan, n=1, class_names=["zero", "one", "two"])
    assert [fig.axes[2 * r].get_ylabel() for r in range(2)] == ["one", "two"]
    with pytest.raises(ValueError, match="class_names has 2 names but y has 3 classes"):
        plot_spuriosity_grid(X, y, s, n=1, class_names=["zero", "one"])


@pytest.fixture(autouse=True)
def no_pyplot_figures():
    """Every plotting function builds a bare Figure: nothing is left open in pyplot."""
    plt.close("all")
    yield
    assert plt.get_fignums() == []


def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_plot_spuriosity_grid_returns_a_figure_for_any_image_input():
    rng = np.random.RandomState(0)
    X = rng.rand(12, 1, 6, 6).astype(np.float32)
    y = np.repeat([0, 1], 6)
    s = np.arange(12.0)
    for images in (X, torch.as_tensor(X), torch.utils.data.TensorDataset(torch.as_tensor(X))):
        fig = plot_spuriosity_grid(images, y, s, n=2)
        assert isinstance(fig, Figure) and len(fig.axes) == 2 * 4
        assert fig.axes[0].images[0].get_array().shape == (6, 6)  # one channel: grey
        assert _png(fig).startswith(b"\x89PNG")  # the Agg backend renders it
    # fewer images than n: the middle columns stay empty
    fig = plot_spuriosity_grid(X, y, s, n=7)
    assert sum(ax.axison for ax in fig.axes[:14]) == 12
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        plot_spuriosity_grid(X, y, s, n=0)


@pytest.fixture(scope="module")
def spray():
    from skdebias import SpectralRelevanceAnalysis

    net = torch.nn.Linear(4, 2)
    X = np.random.RandomState(0).rand(30, 4).astype("float32")
    X[:10, 0] += 5.0
    return SpectralRelevanceAnalysis(net, method="gradient_x_input", n_neighbors=5,
                                     random_state=0, device="cpu").fit(X, np.zeros(30, dtype=int))


def test_plot_spray_embedding(spray):
    fig = plot_spray_embedding(spray)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    ax, ax_eig = fig.axes
    k = spray.n_clusters_[0]
    assert len(ax.collections) == k  # one scatter per cluster
    np.testing.assert_allclose(ax_eig.lines[0].get_ydata(), spray.eigenvalues_[0])
    assert _png(fig).startswith(b"\x89PNG")


def test_plot_spray_embedding_with_concept_labels(spray):
    concept = (np.arange(30) < 10).astype(int)
    fig = plot_spray_embedding(spray, class_=0, concept=concept)
    # labels "cluster j, concept=v (count)": every sample drawn once, the 10 concept samples
    counts = {c.get_label(): int(c.get_label().rsplit("(", 1)[1].rstrip(")"))
              for c in fig.axes[0].collections}
    assert sum(counts.values()) == 30
    assert sum(v for label, v in counts.items() if "concept=1" in label) == 10
    with pytest.raises(ValueError, match=r"concept must have one label per sample of class 0 "
                                         r"\(30\) or per fitted sample \(30\), got 5"):
        plot_spray_embedding(spray, concept=concept[:5])


# ------------------------------------------------------------------ heatmaps
def test_relevance_heatmaps_are_centred_at_zero_over_a_grey_image():
    rng = np.random.RandomState(0)
    X = rng.rand(3, 3, 8, 8).astype(np.float32)
    R = rng.randn(3, 8, 8)
    R[1] *= 10
    fig = plot_relevance_heatmaps(X, R, titles=["a", "b", "c"], n_cols=2)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3 and [ax.get_title() for ax in panels] == ["a", "b", "c"]
    for ax, r in zip(panels, R):
        grey, heat = ax.images
        assert grey.get_array().shape == (8, 8) and grey.get_cmap().name == "gray"
        assert heat.get_cmap().name == "bwr"
        vmin, vmax = heat.get_clim()
        assert vmin == -vmax == pytest.approx(-np.abs(r).max(), rel=1e-5)  # per map, symmetric
    fig = plot_relevance_heatmaps(None, torch.as_tensor(R), shared_scale=True)
    clims = {ax.images[0].get_clim() for ax in fig.axes if ax.images}
    assert len(clims) == 1  # one range for all maps: the largest |R| of any
    assert clims.pop() == pytest.approx((-np.abs(R).max(), np.abs(R).max()), rel=1e-5)
    # an all-zero map still has a valid (non-degenerate) colour range
    fig = plot_relevance_heatmaps(X[:1], np.zeros((1, 8, 8)))
    assert fig.axes[0].images[1].get_clim() == (-1.0, 1.0)
    assert _png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="X has 2 images but relevance has 3 maps"):
        plot_relevance_heatmaps(X[:2], R)
    with pytest.raises(ValueError, match=r"relevance must have shape \(n, H, W\)"):
        plot_relevance_heatmaps(X, R[0])


def test_plot_spray_clusters_rows_are_clusters(spray_images):
    spray, X = spray_images
    k = spray.n_clusters_[0]
    fig = plot_spray_clusters(spray, X, n_prototypes=3)
    assert len(fig.axes) == k * 4
    # the mean heatmap of each row is the mean of the pooled maps of its members
    labels = spray.labels_[spray.indices_[0]]
    for j in range(k):
        mean = fig.axes[j * 4 + 3].images[0].get_array()
        np.testing.assert_allclose(mean, spray.maps_[0][labels == j].mean(axis=0).reshape(4, 4),
                                   rtol=1e-5)
        assert f"{int(spray.cluster_sizes_[0][j])} imgs" in fig.axes[j * 4].get_ylabel()
    R = np.random.RandomState(1).randn(len(X), 4, 4)
    fig = plot_spray_clusters(spray, X, n_prototypes=1, relevance=R)
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), R[labels == 0].mean(axis=0),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="relevance must have one map per fitted sample"):
        plot_spray_clusters(spray, X, relevance=R[:3])


@pytest.fixture(scope="module")
def spray_images():
    from skdebias import SpectralRelevanceAnalysis

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    X = np.random.RandomState(0).rand(30, 1, 4, 4).astype("float32")
    X[:10, 0, 0, 0] += 5.0
    spray = SpectralRelevanceAnalysis(net, method="gradient_x_input", n_clusters=2, map_size=4,
                                      random_state=0, device="cpu").fit(X, np.zeros(30, int))
    return spray, X


# ------------------------------------------------------------------ concept plots
def test_plot_cav_alignment_marks_the_mean_difference_cosine():
    rng = np.random.RandomState(0)
    A0 = rng.rand(40, 3)
    A1 = A0 + np.array([2.0, 0.0, 0.0]) + 0.05 * rng.randn(40, 3)
    fig = plot_cav_alignment({"true": np.array([1.0, 0, 0]), "other": np.array([0, 1.0, 0])},
                             A1, A0)
    ax = fig.axes[0]
    lines = [line.get_xdata()[0] for line in ax.lines]
    assert lines[0] > 0.99 and abs(lines[1]) < 0.1
    assert "true: cos(mean d, cav) = 1.00" in [t.get_text() for t in ax.get_legend().texts]
    with pytest.raises(ValueError, match="A_with has shape"):
        plot_cav_alignment(np.ones(3), A1[:5], A0)


def test_plot_tcav_bars_are_the_mean_scores():
    from sklearn.utils import Bunch

    res = {"vanilla": Bunch(scores=np.array([0.9, 0.7]), random_scores=np.array([0.5, 0.3]),
                            significant=True),
           "corrected": Bunch(scores=np.array([0.5, 0.5]), random_scores=np.array([0.4, 0.6]),
                              significant=False)}
    ax = plot_tcav(res).axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.8, 0.4, 0.5, 0.5])
    assert [t.get_text() for t in ax.texts] == ["*"]  # only the significant one
    assert [t.get_text() for t in ax.get_xticklabels()] == ["vanilla", "corrected"]
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_tcav({})


def test_plot_concept_sensitivity_and_correction_comparison():
    sens = {"features.3": {"vanilla": 0.1, "RR-ClArC": 0.01}, "features.6": {"vanilla": 0.2}}
    ax = plot_concept_sensitivity(sens).axes[0]
    assert ax.get_yscale() == "log"
    heights = [p.get_height() for p in ax.patches]
    assert heights[:2] == pytest.approx([0.1, 0.2]) and heights[2] == pytest.approx(0.01)
    assert np.isnan(heights[3])  # a model missing at a layer: no bar
    assert plot_concept_sensitivity({"l": 0.5}, log=False).axes[0].get_yscale() == "linear"
    rows = [{"method": "vanilla", "clean acc": 0.97, "attacked acc": 0.80, "fit s": 0.0,
             "concept sensitivity": 1e-2},
            {"method": "RR-ClArC", "clean acc": 0.96, "attacked acc": 0.95, "fit s": 3.0,
             "concept sensitivity": 1e-5}]
    fig = plot_correction_comparison(rows)
    assert [ax.get_title() for ax in fig.axes] == ["clean acc", "attacked acc",
                                                   "concept sensitivity"]
    assert [p.get_height() for p in fig.axes[1].patches] == pytest.approx([0.80, 0.95])
    assert fig.axes[2].get_yscale() == "log"
    with pytest.raises(ValueError, match="not in every row"):
        plot_correction_comparison(rows, metrics=["worst group"])
    assert _png(fig).startswith(b"\x89PNG")


# ------------------------------------------------------------------ the gallery (docs/)
def _gallery_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "make_gallery.py"
    spec = importlib.util.spec_from_file_location("make_gallery", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path.parent


def test_gallery_script_draws_every_plot_function_and_the_page_shows_them(tmp_path):
    from skdebias import plotting

    gallery, docs = _gallery_module()
    public = {name for name in plotting.__all__ if name.startswith("plot_")}
    assert set(gallery.FIGURES) == public
    paths = gallery.make_figures(str(tmp_path), quick=True)
    assert set(paths) == public
    for path in paths.values():
        with open(path, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    page = (docs / "gallery.md").read_text()
    for name, file in gallery.FIGURES.items():
        assert f"`{name}(" in page and f"(images/{file})" in page
        assert (docs / "images" / file).exists()  # the committed figure
    assert (docs / "images" / gallery.SCREENSHOT).exists()
    assert plt.get_fignums() == []
