"""Load a user's ImageFolder-style directory (``root/<class name>/<image>``)."""

from __future__ import annotations

import functools
import numbers
import os

import numpy as np
from sklearn.utils import Bunch

__all__ = ["load_image_folder"]


def _check_size(image_size):
    """``None``, an int or an ``(h, w)`` pair of positive ints -> ``None`` or ``(h, w)``."""
    if image_size is None:
        return None
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif (isinstance(image_size, (tuple, list)) and len(image_size) == 2
          and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in image_size)):
        size = (int(image_size[0]), int(image_size[1]))
    else:
        size = None
    if size is None or min(size) < 1:
        raise ValueError(
            f"image_size must be None, a positive int or a pair (height, width) of positive "
            f"ints, got {image_size!r}.")
    return size


def _load_rgb(path):
    """PIL image as RGB; 16-bit and 32-bit integer or float images are rescaled to 8 bits first
    (PIL's ``convert("RGB")`` would clip them to 255, i.e. white)."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif img.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        else:  # "I" (often a 16-bit PNG) or "F" beyond 1: the bit depth the values need
            top = 255.0 if arr.max() <= 255 else 65535.0 if arr.max() <= 65535 else arr.max()
        arr = np.clip(arr / top, 0.0, 1.0)
        img = Image.fromarray(np.round(arr * 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


@functools.lru_cache(maxsize=None)
def _visible_image_folder():
    """``torchvision.datasets.ImageFolder`` that skips hidden class folders
    (``.ipynb_checkpoints``, ...). Built on first use (torchvision is imported lazily) and
    reachable as ``skdebias.datasets._folder.VisibleImageFolder``, so its datasets pickle."""
    from torchvision.datasets import ImageFolder

    class VisibleImageFolder(ImageFolder):
        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory)
                             if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}

    VisibleImageFolder.__module__ = __name__
    VisibleImageFolder.__qualname__ = "VisibleImageFolder"
    return VisibleImageFolder


def __getattr__(name):  # PEP 562: the lazily built class, for pickle
    if name == "VisibleImageFolder":
        return _visible_image_folder()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_image_folder(root, image_size=None, grayscale=False, return_dataset=False):
    """Load images arranged as ``root/<class name>/<image>`` (the torchvision ImageFolder layout).

    Class labels are the indices of the sorted sub-folder names (hidden folders,
    whose names start with ".", are skipped). Images are read
    with PIL (any format :class:`torchvision.datasets.ImageFolder` accepts:
    png, jpg, jpeg, bmp, tif, webp, ...) and converted to float32 in [0, 1],
    channels first. 16-bit and 32-bit images (PIL modes ``I;16``, ``I``, ``F``)
    are rescaled to 8 bits by their bit depth first.

    Parameters
    ----------
    root : str or path-like
        The directory holding one sub-folder per class.
    image_size : int or (int, int), default=None
        Resize every image to ``(image_size, image_size)`` or ``(height, width)``.
        Without it all images must already have the same size.
    grayscale : bool, default=False
        Load one (luminance) channel instead of RGB.
    return_dataset : bool, default=False
        Return the lazy torchvision ``ImageFolder`` Dataset instead of loading
        everything into memory; it yields ``(x, y)`` with ``x`` a float32 tensor
        ``(C, H, W)`` in [0, 1] and ``y`` an int. It can be passed wherever
        skdebias accepts a Dataset.

    Returns
    -------
    data : :class:`~sklearn.utils.Bunch` or torchvision Dataset
        ``X`` float32 ``(n, C, H, W)`` in [0, 1] (``C`` is 3, or 1 with
        ``grayscale=True``), ``y`` int64 ``(n,)``, ``target_names`` (the class
        folder names, ``target_names[y[i]]`` is the class of image ``i``) and
        ``filenames`` (paths); or the Dataset when ``return_dataset=True``.

    Raises
    ------
    FileNotFoundError
        If ``root`` is not an existing directory.
    ValueError
        If it holds no class folder with images, or the images differ in size
        and no ``image_size`` was given.

    Examples
    --------
    >>> from skdebias.datasets import load_image_folder
    >>> data = load_image_folder("path/to/images", image_size=64)  # doctest: +SKIP
    >>> data.X.shape, data.target_names  # doctest: +SKIP
    ((120, 3, 64, 64), ['cats', 'dogs'])
    """
    from torchvision import transforms

    size = _check_size(image_size)
    path = os.fspath(root)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Image folder {path!r} does not exist or is not a directory.")
    steps = []
    if grayscale:
        steps.append(transforms.Grayscale(num_output_channels=1))
    if size is not None:
        steps.append(transforms.Resize(size, antialias=True))
    steps.append(transforms.ToTensor())  # float32 in [0, 1], (C, H, W)
    try:
        dataset = _visible_image_folder()(path, transform=transforms.Compose(steps),
                                          loader=_load_rgb)
    except (FileNotFoundError, RuntimeError) as exc:  # no class folder / no image files
        raise ValueError(
            f"No images found in {path!r}: expected root/<class name>/<image files>. ({exc})"
        ) from exc
    if return_dataset:
        return dataset

    X, y = [], []
    for i in range(len(dataset)):
        x, label = dataset[i]
        if X and tuple(x.shape) != tuple(X[0].shape):
            raise ValueError(
                f"Images in {path!r} have different sizes: {dataset.samples[0][0]!r} is "
                f"{tuple(X[0].shape)}, {dataset.samples[i][0]!r} is {tuple(x.shape)} "
                f"(channels, height, width). Pass image_size=... to resize them.")
        X.append(x.numpy())
        y.append(label)
    return Bunch(
        X=np.stack(X).astype(np.float32, copy=False),
        y=np.asarray(y, dtype=np.int64),
        target_names=list(dataset.classes),
        filenames=[p for p, _ in dataset.samples],
        DESCR=(f"Images loaded from {path!r}: {len(y)} images in {len(dataset.classes)} "
               f"classes {list(dataset.classes)}."),
    )
