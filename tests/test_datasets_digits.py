"""Built-in biased digits: make_colored_digits and make_artifact_digits."""

import numpy as np
import pytest
import torch

from skdebias.datasets import (
    ARTIFACTS,
    COLORS,
    make_artifact_digits,
    make_colored_digits,
)

N_DIGITS = 1797


@pytest.fixture(scope="module")
def colored():
    return make_colored_digits(rho=0.9, counterfactual=True, random_state=0)


@pytest.fixture(scope="module")
def colored_fg():
    return make_colored_digits(rho=0.9, mode="foreground", image_size=16, counterfactual=True,
                               random_state=1)


@pytest.fixture(scope="module", params=ARTIFACTS)
def artifact_data(request):
    return make_artifact_digits(target_class=3, p=0.4, artifact=request.param, random_state=0)


def _check_images(X, n, size=28, channels=3):
    assert isinstance(X, np.ndarray)
    assert X.dtype == np.float32
    assert X.shape == (n, channels, size, size)
    assert np.isfinite(X).all()
    assert X.min() >= 0.0 and X.max() <= 1.0


def _recover_grey(X, bias, mode):
    """Invert the colouring with the channel where each colour is most informative."""
    c = COLORS[bias]  # (n, 3)
    if mode == "background":  # x = g + (1 - g) c  ->  g = (x - c) / (1 - c), c < 1
        k = c.argmin(1)
        ck = c[np.arange(len(c)), k][:, None, None]
        xk = X[np.arange(len(X)), k]
        return (xk - ck) / (1.0 - ck)
    k = c.argmax(1)  # x = g c  ->  g = x / c, c > 0
    ck = c[np.arange(len(c)), k][:, None, None]
    return X[np.arange(len(X)), k] / ck


# --------------------------------------------------------------------------- palette
def test_palette():
    assert COLORS.shape == (10, 3) and COLORS.dtype == np.float32
    assert COLORS.min() >= 0.0 and COLORS.max() <= 1.0
    dist = np.linalg.norm(COLORS[:, None] - COLORS[None], axis=-1)
    assert dist[~np.eye(10, dtype=bool)].min() > 0.3  # well separated
    assert not np.any(np.all(COLORS >= 0.99, axis=1))  # no white: the stroke stays visible


# --------------------------------------------------------------------------- colored digits
def test_colored_shapes_dtypes_ranges(colored):
    n_test = int(np.ceil(0.3 * N_DIGITS))
    n = N_DIGITS - n_test
    for key in ("X", "X_cf"):
        _check_images(colored[key], n)
    for key in ("X_test", "X_test_biased", "X_test_cf"):
        _check_images(colored[key], n_test)
    for key, length in (("y", n), ("bias", n), ("concept", n), ("bias_cf", n),
                        ("y_test", n_test), ("bias_test", n_test), ("concept_test", n_test),
                        ("bias_test_biased", n_test), ("concept_test_biased", n_test),
                        ("bias_test_cf", n_test)):
        assert colored[key].dtype == np.int64, key
        assert colored[key].shape == (length,), key
    assert set(np.unique(colored.y)) == set(range(10))
    assert colored.bias.min() >= 0 and colored.bias.max() <= 9
    np.testing.assert_array_equal(colored.concept, colored.bias == colored.y)
    np.testing.assert_array_equal(colored.concept_test, colored.bias_test == colored.y_test)
    np.testing.assert_array_equal(colored.concept_test_biased,
                                  colored.bias_test_biased == colored.y_test)
    np.testing.assert_array_equal(colored.colors, COLORS)
    assert colored.rho == 0.9 and colored.mode == "background"
    assert isinstance(colored.DESCR, str) and colored.DESCR
    # stratified split: every class in both splits, in proportion
    counts, counts_test = np.bincount(colored.y), np.bincount(colored.y_test)
    assert np.all(np.abs(counts / n - counts_test / n_test) < 0.01)


def test_colored_bias_rates(colored):
    assert abs(colored.concept.mean() - 0.9) < 0.05
    assert abs(colored.concept_test.mean() - 0.1) < 0.05  # unbiased: uniform over 10 colours
    assert abs(colored.concept_test_biased.mean() - 0.9) < 0.05
    # unbiased test colours are (roughly) uniform over all ten
    freq = np.bincount(colored.bias_test, minlength=10) / len(colored.bias_test)
    assert np.all(np.abs(freq - 0.1) < 0.05)
    # misaligned training colours are spread over the other nine
    off = colored.concept == 0
    assert len(np.unique((colored.bias[off] - colored.y[off]) % 10)) >= 7
    assert np.all((colored.bias[off] - colored.y[off]) % 10 != 0)


@pytest.mark.parametrize("rho, expected", [(1.0, 1.0), (0.0, 0.0)])
def test_colored_extreme_rho(rho, expected):
    data = make_colored_digits(rho=rho, image_size=8, random_state=0)
    assert data.concept.mean() == expected
    assert data.concept_test_biased.mean() == expected


def test_colored_background_mode(colored):
    corner = colored.X[:, :, 0, 0]  # digits never touch the corner: background colour
    np.testing.assert_allclose(corner, COLORS[colored.bias], atol=1e-6)
    # stroke pixels are white
    assert np.any(np.all(colored.X > 0.999, axis=1))


def test_colored_foreground_mode(colored_fg):
    _check_images(colored_fg.X, len(colored_fg.y), size=16)
    assert colored_fg.mode == "foreground"
    np.testing.assert_allclose(colored_fg.X[:, :, 0, 0], 0.0)  # black background
    # the brightest stroke pixel of each image has (nearly) the image's colour
    n = len(colored_fg.X)
    flat = colored_fg.X.reshape(n, 3, -1)
    brightest = flat[np.arange(n), :, flat.sum(1).argmax(1)]
    assert np.mean(np.abs(brightest - COLORS[colored_fg.bias]).max(1) < 0.2) > 0.95


@pytest.mark.parametrize("fixture", ["colored", "colored_fg"])
def test_colored_counterfactual(fixture, request):
    data = request.getfixturevalue(fixture)
    assert np.all(data.bias_cf != data.bias)
    assert np.all(data.bias_test_cf != data.bias_test)
    assert len(np.unique(data.bias_cf)) == 10
    # same digit (grey structure), different colour
    for X, X_cf, b, b_cf in ((data.X, data.X_cf, data.bias, data.bias_cf),
                             (data.X_test, data.X_test_cf, data.bias_test, data.bias_test_cf)):
        g, g_cf = _recover_grey(X, b, data.mode), _recover_grey(X_cf, b_cf, data.mode)
        np.testing.assert_allclose(g, g_cf, atol=1e-4)
        assert g.max() > 0.9  # a real digit was recovered
        assert np.all(np.abs(X - X_cf).reshape(len(X), -1).max(1) > 0.1)
    if data.mode == "background":  # stroke pixels (white) coincide
        stroke = np.all(data.X > 0.999, axis=1)
        assert stroke.sum() > 1000
        assert np.all(data.X_cf.transpose(0, 2, 3, 1)[stroke] > 0.99)


def test_colored_same_digits_in_both_modes():
    bg = make_colored_digits(rho=0.5, image_size=12, random_state=3)
    fg = make_colored_digits(rho=0.5, mode="foreground", image_size=12, random_state=3)
    np.testing.assert_array_equal(bg.y, fg.y)
    np.testing.assert_array_equal(bg.bias, fg.bias)
    np.testing.assert_allclose(_recover_grey(bg.X, bg.bias, "background"),
                               _recover_grey(fg.X, fg.bias, "foreground"), atol=1e-4)


def test_colored_reproducible(colored):
    again = make_colored_digits(rho=0.9, counterfactual=True, random_state=0)
    for key in ("X", "y", "bias", "X_test", "bias_test", "X_test_biased", "X_cf", "X_test_cf"):
        np.testing.assert_array_equal(again[key], colored[key], err_msg=key)
    # counterfactual=True does not change the other outputs
    plain = make_colored_digits(rho=0.9, random_state=0)
    assert "X_cf" not in plain
    for key in ("X", "bias", "X_test", "bias_test", "X_test_biased"):
        np.testing.assert_array_equal(plain[key], colored[key], err_msg=key)
    other = make_colored_digits(rho=0.9, random_state=1)
    assert not np.array_equal(other.bias, colored.bias)
    assert not np.array_equal(other.y, colored.y)
    # a RandomState instance is accepted
    a = make_colored_digits(rho=0.9, image_size=8, random_state=np.random.RandomState(5))
    b = make_colored_digits(rho=0.9, image_size=8, random_state=np.random.RandomState(5))
    np.testing.assert_array_equal(a.X, b.X)


def test_colored_cache_not_mutable():
    data = make_colored_digits(rho=0.5, image_size=10, random_state=0)
    expected = data.X.copy()
    data.X[:] = 0.0
    data.colors[:] = 0.0
    again = make_colored_digits(rho=0.5, image_size=10, random_state=0)
    np.testing.assert_array_equal(again.X, expected)
    assert COLORS.max() > 0


def test_colored_image_size():
    data = make_colored_digits(image_size=20, test_size=0.5, random_state=0)
    assert data.X.shape[1:] == (3, 20, 20) and data.X_test.shape[1:] == (3, 20, 20)
    assert abs(len(data.y_test) - N_DIGITS / 2) <= 1


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": 1.5}, r"rho must be a finite number >= 0 and <= 1, got 1.5"),
    ({"rho": -0.1}, r"rho must be a finite number >= 0 and <= 1, got -0.1"),
    ({"rho": "0.9"}, r"rho must be a finite number >= 0 and <= 1, got '0.9'"),
    ({"rho": float("nan")}, r"rho.*nan"),
    ({"mode": "stroke"}, r"mode must be one of \('background', 'foreground'\), got 'stroke'"),
    ({"image_size": 4}, r"image_size must be an integer >= 8, got 4"),
    ({"image_size": 28.0}, r"image_size.*28.0"),
    ({"test_size": 0.0}, r"test_size must be a finite number > 0 and < 1, got 0.0"),
    ({"test_size": 1.0}, r"test_size must be a finite number > 0 and < 1, got 1.0"),
])
def test_colored_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_colored_digits(**kwargs)


# --------------------------------------------------------------------------- artifact digits
def test_artifact_shapes_and_concept(artifact_data):
    d = artifact_data
    n, n_test = len(d.y), len(d.y_test)
    assert n + n_test == N_DIGITS
    _check_images(d.X, n)
    _check_images(d.X_test, n_test)
    assert d.y.dtype == np.int64 and d.y_test.dtype == np.int64
    assert d.concept.dtype == np.int64 and set(np.unique(d.concept)) == {0, 1}
    assert d.masks.shape == (n, 28, 28) and d.masks_test.shape == (n_test, 28, 28)
    assert set(np.unique(d.masks)) <= {0, 1}
    # only target_class carries the artifact, round(p * n_target) of them
    assert np.all(d.y[d.concept == 1] == 3)
    assert d.concept.sum() == round(0.4 * np.sum(d.y == 3))
    # masks non-zero exactly for concept == 1
    np.testing.assert_array_equal(d.masks.reshape(n, -1).any(1), d.concept == 1)
    np.testing.assert_array_equal(d.masks[d.concept == 1][0], d.artifact_mask)
    # the test split is clean
    assert not d.concept_test.any() and not d.masks_test.any()
    np.testing.assert_array_equal(d.X_test[:, 0], d.X_test[:, 1])
    np.testing.assert_array_equal(d.X_test[:, 0], d.X_test[:, 2])
    # clean training images are grey in three channels
    clean = d.X[d.concept == 0]
    np.testing.assert_array_equal(clean[:, 0], clean[:, 2])
    assert d.target_class == 3 and d.p == 0.4 and d.artifact in ARTIFACTS
    assert isinstance(d.DESCR, str) and d.DESCR


def test_artifact_add_artifact_numpy(artifact_data):
    d = artifact_data
    X = d.X_test[:50]
    before = X.copy()
    X_art, masks = d.add_artifact(X, return_mask=True)
    np.testing.assert_array_equal(X, before)  # input untouched
    assert X_art is not X and not np.shares_memory(X_art, X)
    _check_images(X_art, 50)
    assert masks.shape == (50, 28, 28) and masks.any()
    np.testing.assert_array_equal(masks, np.broadcast_to(d.artifact_mask, masks.shape))
    # every artifact changes every image, and only inside its mask
    changed = np.abs(X_art - X).max(1) > 0  # (n, H, W)
    assert changed.reshape(50, -1).any(1).all()
    assert not np.any(changed & (masks == 0))
    np.testing.assert_array_equal(d.add_artifact(X), X_art)  # deterministic
    if d.artifact in ("patch", "timestamp"):  # pasted: the same pixels as in training
        m = d.artifact_mask > 0
        pasted = d.X[d.concept == 1][0][:, m]
        np.testing.assert_array_equal(X_art[:, :, m], np.broadcast_to(pasted, X_art[:, :, m].shape))


def test_artifact_add_artifact_torch(artifact_data):
    d = artifact_data
    X = torch.from_numpy(d.X_test[:20].copy())
    before = X.clone()
    out = d.add_artifact(X)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.shape == X.shape and out.device == X.device
    assert torch.equal(X, before)
    np.testing.assert_array_equal(out.numpy(), d.add_artifact(d.X_test[:20]))
    out2, masks = d.add_artifact(X, return_mask=True)
    assert torch.equal(out2, out) and tuple(masks.shape) == (20, 28, 28)
    # float64 and requires_grad inputs are fine too
    out3 = d.add_artifact(X.double().requires_grad_(True))
    assert out3.dtype == torch.float32 and torch.allclose(out3, out)


@pytest.mark.parametrize("bad_shape", [(4, 1, 28, 28), (4, 3, 16, 16), (3, 28, 28), (4, 28, 28, 3)])
def test_artifact_add_artifact_bad_shape(artifact_data, bad_shape):
    with pytest.raises(ValueError, match=r"shape \(n, 3, 28, 28\)"):
        artifact_data.add_artifact(np.zeros(bad_shape, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        artifact_data.add_artifact(torch.zeros(bad_shape))


def test_artifact_patch_is_red_square():
    d = make_artifact_digits(target_class=0, p=1.0, artifact="patch", random_state=0)
    m = d.artifact_mask > 0
    assert m.sum() == (28 // 5) ** 2
    assert m[-2, -2] and not m[-1, -1] and not m[0, 0]  # bottom-right, 1-pixel margin
    patched = d.X[d.concept == 1]
    assert len(patched) == np.sum(d.y == 0)
    np.testing.assert_array_equal(patched[:, :, m], np.broadcast_to(
        np.array([1.0, 0.0, 0.0], dtype=np.float32)[None, :, None], (len(patched), 3, m.sum())))


def test_artifact_timestamp_top_left():
    d = make_artifact_digits(p=0.5, artifact="timestamp", random_state=0)
    m = d.artifact_mask > 0
    rows, cols = np.nonzero(m)
    assert rows.max() < 28 // 2 and cols.max() < 28  # top part
    assert rows.min() >= 1 and cols.min() >= 1 and m.sum() > 10
    assert not m[0].any()
    small = make_artifact_digits(artifact="timestamp", image_size=8, random_state=0)
    assert small.artifact_mask.any()
    X_art = small.add_artifact(small.X_test[:5])
    assert np.abs(X_art - small.X_test[:5]).max() > 0.3


def test_artifact_lsb_is_faint_and_brightness_global():
    lsb = make_artifact_digits(artifact="lsb", random_state=0)
    X = lsb.X_test[:30]
    diff = lsb.add_artifact(X) - X
    assert np.abs(diff).max() <= 0.1 + 1e-6  # faint
    assert np.mean(np.abs(diff) > 0) > 0.5  # but everywhere
    assert lsb.artifact_mask.all()
    bright = make_artifact_digits(artifact="brightness", random_state=0)
    X_b = bright.add_artifact(X)
    assert X_b.min() >= 0.5 and X_b.mean() > X.mean() + 0.3
    assert bright.artifact_mask.all()


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_artifact_extreme_p(p):
    d = make_artifact_digits(target_class=7, p=p, image_size=8, random_state=0)
    assert d.concept.sum() == p * np.sum(d.y == 7)
    assert d.masks.any() == bool(p)


def test_artifact_reproducible():
    a = make_artifact_digits(p=0.3, artifact="timestamp", random_state=0)
    b = make_artifact_digits(p=0.3, artifact="timestamp", random_state=0)
    for key in ("X", "y", "concept", "masks", "X_test", "y_test"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    c = make_artifact_digits(p=0.3, artifact="timestamp", random_state=1)
    assert not np.array_equal(a.y, c.y)
    assert not np.array_equal(a.X, c.X)


def test_artifact_mutation_does_not_leak():
    a = make_artifact_digits(image_size=12, random_state=0)
    expected = a.X_test.copy()
    a.X_test[:] = 0.5
    a.X[:] = 0.5
    b = make_artifact_digits(image_size=12, random_state=0)
    np.testing.assert_array_equal(b.X_test, expected)


@pytest.mark.parametrize("kwargs, match", [
    ({"target_class": 10}, r"target_class must be an integer in 0\.\.9, got 10"),
    ({"target_class": -1}, r"target_class.*0\.\.9.*-1"),
    ({"target_class": 1.5}, r"target_class.*1.5"),
    ({"p": 1.2}, r"p must be a finite number >= 0 and <= 1, got 1.2"),
    ({"p": -0.5}, r"p must be a finite number >= 0 and <= 1, got -0.5"),
    ({"artifact": "sticker"}, r"artifact must be one of \('patch', 'timestamp', 'lsb', "
                              r"'brightness'\), got 'sticker'"),
    ({"image_size": 7}, r"image_size must be an integer >= 8, got 7"),
    ({"test_size": 2}, r"test_size"),
])
def test_artifact_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_artifact_digits(**kwargs)


def test_colored_validation_split_recolours_training_digits():
    plain = make_colored_digits(rho=0.95, counterfactual=True, random_state=3)
    d = make_colored_digits(rho=0.95, counterfactual=True, validation_size=0.5, random_state=3)
    for key in ("X", "y", "bias", "X_test", "X_test_biased", "X_cf", "X_test_cf"):
        np.testing.assert_array_equal(d[key], plain[key])
    n = int(round(0.5 * len(d.y)))
    assert d.X_val.shape == (n, 3, 28, 28) and len(d.y_val) == len(d.bias_val) == n
    # each validation image is a training digit of its class in a new colour: the grey digit,
    # read back from the channel where its colour is darkest (x = g + (1 - g) c), is the same

    def grey(X, bias):
        c = d.colors[bias].astype(np.float64)
        k = c.argmin(1)
        ck = c[np.arange(len(bias)), k][:, None, None]
        g = (X[np.arange(len(bias)), k] - ck) / (1.0 - ck)
        return g.reshape(len(bias), -1)

    from sklearn.metrics import pairwise_distances

    dist = pairwise_distances(grey(d.X_val, d.bias_val), grey(d.X, d.bias))
    assert dist.min(axis=1).max() < 1e-3
    np.testing.assert_array_equal(d.y[dist.argmin(axis=1)], d.y_val)
    assert d.concept_val.mean() < 0.25 and d.concept.mean() > 0.9
    with pytest.raises(ValueError, match=r"validation_size must be a finite number >= 0 and < 1"):
        make_colored_digits(validation_size=1.0)
