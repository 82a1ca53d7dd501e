"""skdebias.plotting: every function returns a matplotlib Figure and leaves pyplot alone."""

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from skdebias.plotting import plot_spray_embedding, plot_spuriosity_grid  # noqa: E402


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
