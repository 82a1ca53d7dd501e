"""Biased image datasets made from scikit-learn's bundled 8x8 digits (no downloads).

Two controlled settings, both built from the 1,797 real digits of
:func:`sklearn.datasets.load_digits`, upsampled to ``image_size`` pixels:

- :func:`make_colored_digits`: the Colored-MNIST / Biased-MNIST protocol, a colour
  spuriously correlated with the class;
- :func:`make_artifact_digits`: an artifact (patch, timestamp, invisible pattern,
  brightness shift) inserted into a fraction of one class, the "Clever Hans" setting.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.utils import Bunch, check_random_state

from .._utils._validation import check_int, check_real
from ._base import (COLORS, _add_validation_split, _check_rho_mode, _colored_bunch,
                    _stratified_split)

__all__ = ["make_colored_digits", "make_artifact_digits", "ARTIFACTS", "COLORS"]

#: Names of the artifacts :func:`make_artifact_digits` can insert.
ARTIFACTS = ("patch", "timestamp", "lsb", "brightness")

_PATCH_COLOR = np.array([1.0, 0.0, 0.0], dtype=np.float32)  # saturated red
_STAMP_COLOR = np.array([1.0, 1.0, 0.0], dtype=np.float32)  # bright yellow
_LSB_AMPLITUDE = 0.1

# A 3x5 pixel font for the "timestamp" artifact, which reads "10:42".
_FONT = {
    "1": [".#.", "##.", ".#.", ".#.", "###"],
    "0": ["###", "#.#", "#.#", "#.#", "###"],
    ":": [".", "#", ".", "#", "."],
    "4": ["#.#", "#.#", "###", "..#", "..#"],
    "2": ["###", "..#", "###", "#..", "###"],
}
_STAMP_TEXT = "10:42"


# ------------------------------------------------------------------ base digits
@functools.lru_cache(maxsize=8)
def _load_base_digits(image_size):
    """Cached, read-only upsampled digits; use :func:`_base_digits` for copies."""
    digits = load_digits()
    imgs = torch.as_tensor(digits.images / 16.0, dtype=torch.float32)[:, None]
    up = torch.nn.functional.interpolate(imgs, size=(image_size, image_size), mode="bilinear",
                                         align_corners=False)[:, 0].clamp_(0.0, 1.0)
    grey = np.ascontiguousarray(up.numpy(), dtype=np.float32)
    y = digits.target.astype(np.int64)
    grey.setflags(write=False)
    y.setflags(write=False)
    return grey, y


def _base_digits(image_size=28):
    """sklearn's digits scaled to [0, 1] and bilinearly upsampled.

    Returns ``(images, y)``: float32 ``(1797, image_size, image_size)`` and int64
    labels, fresh copies of a cache keyed on ``image_size``.
    """
    grey, y = _load_base_digits(check_int("image_size", image_size, low=8))
    return grey.copy(), y.copy()


def _split(image_size, test_size, rng):
    """Seeded stratified split of the upsampled digits: (g_train, y_train, g_test, y_test)."""
    grey, y = _base_digits(image_size)
    return _stratified_split(grey, y, test_size, rng)


# ------------------------------------------------------------------ colored digits
def _checked_split(image_size, test_size, random_state):
    """The checked ``image_size``, the random state and the train/test split of the digits."""
    image_size = check_int("image_size", image_size, low=8)
    test_size = check_real("test_size", test_size, low=0, high=1, low_open=True, high_open=True)
    rng = check_random_state(random_state)
    return image_size, rng, _split(image_size, test_size, rng)


def make_colored_digits(rho=0.99, mode="background", image_size=28, counterfactual=False,
                        test_size=0.3, validation_size=0.0, random_state=None):
    """Colored digits: a colour spuriously correlated with the class (Colored/Biased-MNIST).

    sklearn's 1,797 bundled digits are upsampled to ``image_size`` pixels and split
    (stratified) into a train and a test split. In the train split each digit of
    class ``c`` gets colour ``COLORS[c]`` with probability ``rho`` and a colour drawn
    uniformly from the other nine otherwise. The unbiased test split uses
    ``rho=0.1`` (colours uniform over all ten); a biased test split with the
    training ``rho`` is returned as well.

    Parameters
    ----------
    rho : float in [0, 1], default=0.99
        Strength of the colour/class correlation in the train split and in the
        biased test split.
    mode : {"background", "foreground"}, default="background"
        ``"background"``: the background takes the colour and the stroke stays
        white, ``x = digit + (1 - digit) * colour``. ``"foreground"``: the stroke
        takes the colour on black, ``x = digit * colour``.
    image_size : int >= 8, default=28
        Height and width of the images (bilinear upsampling of the 8x8 digits).
    counterfactual : bool, default=False
        Also return every image re-coloured with another colour (drawn uniformly
        from the nine others), same digit: ``X_cf``, ``bias_cf`` and
        ``X_test_cf``, ``bias_test_cf`` (for the unbiased test split).
    test_size : float in (0, 1), default=0.3
        Fraction of the digits in the test split.
    validation_size : float in [0, 1), default=0.0
        Fraction of the *training* digits copied into an unbiased validation
        split, recoloured uniformly at random: ``X_val``, ``y_val``,
        ``bias_val``, ``concept_val`` (the digits stay in ``X``; the other
        arrays do not depend on it). See
        :func:`~skdebias.datasets.load_biased_mnist`.
    random_state : int, RandomState instance or None, default=None
        Seeds the split and the colours; the same seed gives identical data.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        - ``X`` : float32 ``(n, 3, H, W)`` in [0, 1], ``y`` : int64 ``(n,)``,
          ``bias`` : int64 colour index, ``concept`` : int64 0/1, 1 where
          ``bias == y`` (the bias-aligned colour);
        - ``X_test``, ``y_test``, ``bias_test``, ``concept_test``: unbiased
          test split (``rho=0.1``);
        - ``X_test_biased``, ``bias_test_biased``, ``concept_test_biased``:
          the same test digits coloured with the training ``rho``;
        - ``colors`` (the palette, ``(10, 3)``), ``rho``, ``mode``, ``DESCR``;
        - with ``counterfactual=True`` also ``X_cf``, ``bias_cf``,
          ``X_test_cf``, ``bias_test_cf``;
        - with ``validation_size > 0`` also ``X_val``, ``y_val``, ``bias_val``,
          ``concept_val``.

    See Also
    --------
    make_artifact_digits : An artifact in a fraction of one class.

    Examples
    --------
    >>> from skdebias.datasets import make_colored_digits
    >>> data = make_colored_digits(rho=0.99, random_state=0)
    >>> data.X.shape, data.X.dtype
    ((1257, 3, 28, 28), dtype('float32'))
    >>> bool(data.concept.mean() > 0.95), bool(data.concept_test.mean() < 0.2)
    (True, True)
    """
    rho = _check_rho_mode(rho, mode)
    check_real("validation_size", validation_size, low=0, high=1, high_open=True)
    image_size, rng, (g_tr, y_tr, g_te, y_te) = _checked_split(image_size, test_size,
                                                                random_state)
    descr = (f"Colored digits ({mode} colour): sklearn's bundled digits upsampled to "
             f"{image_size}x{image_size}; {len(y_tr)} train images, colour = class colour "
             f"with probability rho={rho}, otherwise one of the other nine; {len(y_te)} test "
             f"images, unbiased (rho=0.1: X_test) and biased (rho={rho}: X_test_biased).")
    out = _colored_bunch(g_tr, y_tr, g_te, y_te, rho, mode, counterfactual, rng, descr)
    return _add_validation_split(out, g_tr, y_tr, validation_size, mode, rng)


# ------------------------------------------------------------------ artifact digits
def _glyph_mask(image_size):
    """Mask of a small yellow 'timestamp' ("10:42", 3x5 pixel font) in the top-left corner."""
    scale = max(1, image_size // 28)
    rows = [""] * 5
    for k, char in enumerate(_STAMP_TEXT):
        for r, line in enumerate(_FONT[char]):
            rows[r] += ("." if k else "") + line
    glyph = np.array([[ch == "#" for ch in line] for line in rows], dtype=np.float32)
    glyph = np.kron(glyph, np.ones((scale, scale), dtype=np.float32))
    mask = np.zeros((image_size, image_size), dtype=np.float32)
    h = min(glyph.shape[0], image_size - 2)
    w = min(glyph.shape[1], image_size - 2)
    mask[1:1 + h, 1:1 + w] = glyph[:h, :w]  # cropped on small images, 1-pixel margin
    return mask


def _artifact_mask(artifact, image_size):
    """Where ``artifact`` changes an ``image_size`` image: float32 0/1 ``(H, W)``."""
    if artifact == "patch":
        side = max(2, image_size // 5)
        mask = np.zeros((image_size, image_size), dtype=np.float32)
        mask[-1 - side:-1, -1 - side:-1] = 1.0  # bottom-right, 1-pixel margin
        return mask
    if artifact == "timestamp":
        return _glyph_mask(image_size)
    return np.ones((image_size, image_size), dtype=np.float32)  # lsb, brightness: everywhere


def _insert(X, artifact, mask):
    """A float32 copy of numpy ``X`` (n, 3, H, W) with the artifact inserted in every image."""
    X = np.array(X, dtype=np.float32, copy=True)
    if artifact == "patch":
        X = np.where(mask > 0, _PATCH_COLOR[:, None, None], X)
    elif artifact == "timestamp":
        X = np.where(mask > 0, _STAMP_COLOR[:, None, None], X)
    elif artifact == "lsb":
        H, W = X.shape[-2:]
        checker = (np.add.outer(np.arange(H), np.arange(W)) % 2) * 2.0 - 1.0  # +-1
        X = np.clip(X + _LSB_AMPLITUDE * checker.astype(np.float32), 0.0, 1.0)
    else:  # brightness
        X = np.clip(X * 0.5 + 0.5, 0.0, 1.0)
    return np.ascontiguousarray(X, dtype=np.float32)


def _make_add_artifact(artifact, mask, image_size):
    """The ``add_artifact(X, return_mask=False)`` function returned by make_artifact_digits."""

    def add_artifact(X, return_mask=False):
        """Return a copy of ``X`` (n, 3, H, W) with the artifact inserted in every image.

        ``X`` may be a numpy array or a torch tensor; the result is float32 of the
        same kind (a tensor on ``X``'s device). ``X`` is never modified. With
        ``return_mask=True`` returns ``(X_art, masks)``, masks 0/1 ``(n, H, W)``.
        """
        is_tensor = isinstance(X, torch.Tensor)
        arr = X.detach().cpu().numpy() if is_tensor else np.asarray(X)
        if arr.ndim != 4 or arr.shape[1] != 3 or arr.shape[2:] != (image_size, image_size):
            raise ValueError(
                f"add_artifact expects images of shape (n, 3, {image_size}, {image_size}), "
                f"got shape {arr.shape}.")
        out = _insert(arr, artifact, mask)
        masks = np.repeat(mask[None], arr.shape[0], axis=0)
        if is_tensor:
            out = torch.from_numpy(out).to(X.device)
            masks = torch.from_numpy(masks).to(X.device)
        return (out, masks) if return_mask else out

    return add_artifact


def make_artifact_digits(target_class=0, p=0.3, artifact="patch", image_size=28, test_size=0.3,
                         random_state=None):
    """Digits with an artifact in a fraction ``p`` of one class (controlled Clever-Hans setting).

    sklearn's 1,797 bundled digits are upsampled to ``image_size`` pixels, replicated
    to three (grey) channels and split (stratified) into a train and a test split.
    In the train split a fraction ``p`` of the images of ``target_class`` get the
    artifact; no other image does. The test split is clean; ``add_artifact``
    poisons any set (the "attacked" test set).

    Parameters
    ----------
    target_class : int in 0..9, default=0
        The class whose images carry the artifact.
    p : float in [0, 1], default=0.3
        Fraction of the training images of ``target_class`` with the artifact
        (``round(p * n_target)`` images).
    artifact : {"patch", "timestamp", "lsb", "brightness"}, default="patch"
        ``"patch"``: a saturated red square (side ``image_size // 5``) in the
        bottom-right corner; ``"timestamp"``: small yellow text in the top-left
        corner; ``"lsb"``: a faint (amplitude 0.1) checkerboard over the whole
        image; ``"brightness"``: the whole image brightened, ``x * 0.5 + 0.5``.
    image_size : int >= 8, default=28
        Height and width of the images (bilinear upsampling of the 8x8 digits).
    test_size : float in (0, 1), default=0.3
        Fraction of the digits in the test split.
    random_state : int, RandomState instance or None, default=None
        Seeds the split and the choice of poisoned images.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch`
        - ``X`` : float32 ``(n, 3, H, W)`` in [0, 1], ``y`` : int64 ``(n,)``,
          ``concept`` : int64 0/1 artifact presence, ``masks`` : float32 0/1
          ``(n, H, W)``, where the artifact was inserted (zeros for clean images);
        - ``X_test``, ``y_test`` (clean), ``concept_test`` (zeros),
          ``masks_test`` (zeros);
        - ``add_artifact(X, return_mask=False)`` : returns a float32 copy of
          ``X`` (numpy array or torch tensor, ``(n, 3, H, W)``) with the artifact
          in every image, never modifying ``X``; with ``return_mask=True``
          returns ``(X_art, masks)``;
        - ``artifact_mask`` (the ``(H, W)`` mask of one image), ``target_class``,
          ``p``, ``artifact``, ``DESCR``.

    See Also
    --------
    make_colored_digits : A colour spuriously correlated with every class.

    Examples
    --------
    >>> from skdebias.datasets import make_artifact_digits
    >>> data = make_artifact_digits(target_class=0, p=0.3, artifact="patch", random_state=0)
    >>> data.X.shape, int(data.concept.sum()), set(data.y[data.concept == 1].tolist())
    ((1257, 3, 28, 28), 37, {0})
    >>> X_attacked = data.add_artifact(data.X_test)  # the "attacked" test set
    >>> X_attacked.shape == data.X_test.shape
    True
    """
    target_class = check_int("target_class", target_class, low=0, high=9)
    p = check_real("p", p, low=0, high=1)
    if not isinstance(artifact, str) or artifact not in ARTIFACTS:
        raise ValueError(f"artifact must be one of {ARTIFACTS}, got {artifact!r}.")
    image_size, rng, (g_tr, y_tr, g_te, y_te) = _checked_split(image_size, test_size,
                                                                random_state)
    mask = _artifact_mask(artifact, image_size)

    X = np.repeat(g_tr[:, None], 3, axis=1)
    target_idx = np.flatnonzero(y_tr == target_class)
    n_art = int(round(p * len(target_idx)))
    chosen = np.sort(rng.choice(target_idx, size=n_art, replace=False))
    concept = np.zeros(len(y_tr), dtype=np.int64)
    concept[chosen] = 1
    masks = np.zeros((len(y_tr), image_size, image_size), dtype=np.float32)
    if n_art:
        X[chosen] = _insert(X[chosen], artifact, mask)
        masks[chosen] = mask
    return Bunch(
        X=X, y=y_tr, concept=concept, masks=masks,
        X_test=np.repeat(g_te[:, None], 3, axis=1), y_test=y_te,
        concept_test=np.zeros(len(y_te), dtype=np.int64),
        masks_test=np.zeros((len(y_te), image_size, image_size), dtype=np.float32),
        add_artifact=_make_add_artifact(artifact, mask, image_size), artifact_mask=mask.copy(),
        target_class=int(target_class), p=p, artifact=artifact,
        DESCR=(f"Artifact digits: sklearn's bundled digits upsampled to {image_size}x{image_size}, "
               f"grey in 3 channels; artifact {artifact!r} inserted in {n_art} of "
               f"{len(target_idx)} training images of class {target_class} (p={p}); "
               f"{len(y_te)} clean test images; add_artifact(X) poisons any set."),
    )
