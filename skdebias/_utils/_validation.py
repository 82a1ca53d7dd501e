"""Checks of parameters, labels and concept vectors: one message style, one place.

Each check returns the value converted to a plain type, or raises a
``ValueError`` naming the parameter, what is allowed and the value received.
"""

from __future__ import annotations

import contextlib
import numbers
import re

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import check_array, column_or_1d

__all__ = ["check_int", "check_real", "check_choice", "check_y", "check_concept_labels",
           "encode_y", "unit_vector", "UNLABELLED", "check_group_labels",
           "check_seed", "check_labels", "named_errors", "check_target"]

#: Value of ``concept_labels`` that marks a sample without a concept label.
UNLABELLED = -1


def check_int(name, value, low=1, high=None):
    """``value`` as an ``int`` in ``[low, high]`` (``high=None``: unbounded); bools are rejected."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
    ok = ok and (high is None or value <= high)
    if not ok:
        if high is not None:
            what = f"an integer in {low}..{high}"
        elif low == 1:
            what = "a positive integer"
        else:
            what = f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return int(value)


def check_real(name, value, low=None, high=None, low_open=False, high_open=False):
    """``value`` as a finite ``float`` within the given bounds (closed unless ``*_open``)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            bounds.append(f"{'<' if high_open else '<='} {high}")
        rng = (" " + " and ".join(bounds)) if bounds else ""
        raise ValueError(f"{name} must be a finite number{rng}, got {value!r}.")
    return float(value)


def check_choice(name, value, choices):
    """``value`` if it is one of ``choices`` (compared by equality, e.g. strings or None)."""
    try:
        ok = any(value is c or (isinstance(value, type(c)) and value == c) for c in choices)
    except Exception:  # e.g. arrays compared with strings
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {tuple(choices)}.")
    return value


def check_seed(name, value):
    """``value`` if scikit-learn's ``check_random_state`` takes it (None, an int in
    0..2**32-1 or a ``RandomState``); else a ``ValueError`` naming ``name``."""
    try:
        check_random_state(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be None, an integer in 0..2**32-1 or a numpy RandomState, "
                         f"got {value!r}.") from exc
    return value


def _names(message, name):
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


@contextlib.contextmanager
def named_errors(name):
    """Re-raise a ``ValueError`` / ``TypeError`` of a third-party check (e.g. scikit-learn's
    ``validate_data``, whose messages say "X" or nothing) with ``"<name>: "`` in front, unless
    its message already names ``name``. The class is kept (scikit-learn's checks match it)."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        if _names(str(exc), name):
            raise
        try:
            renamed = type(exc)(f"{name}: {exc}")
        except Exception:  # an exception class with another signature
            renamed = ValueError(f"{name}: {exc}")
        raise renamed from exc


def check_labels(y, n, name="y", other="X"):
    """``y`` as a 1-d array of ``n`` labels of any type (no network involved), checked as
    scikit-learn's ``check_X_y`` checks it (a column vector is raveled with a
    ``DataConversionWarning``; NaN, infinity and complex values are refused) with messages
    naming ``name`` (and ``other``, the data the labels go with)."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = column_or_1d(y, warn=True)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-d (one label per sample), got shape {y.shape}.")
    if len(y) != n:
        raise ValueError(f"{other} and {name} have inconsistent numbers of samples: {other} has "
                         f"{n}, {name} has {len(y)}.")
    with named_errors(name):
        check_array(y, ensure_2d=False, dtype=None, input_name=name, ensure_min_samples=0)
    return y


def check_target(target, n, name="target"):
    """``target=`` of the metrics that differentiate one class output per sample: ``None``
    (the predicted class), one class index for every sample, or one index per sample.

    Returns ``None``, an ``int`` or an int64 array of length ``n`` (integer-valued floats are
    accepted); anything else raises a ``ValueError`` naming ``name``. Whether the indices
    exist among the network's outputs is checked where the outputs are known.
    """
    if target is None:
        return None
    if isinstance(target, torch.Tensor):
        target = target.detach().cpu().numpy()
    if np.ndim(target) == 0:
        value = target.item() if isinstance(target, (np.ndarray, np.generic)) else target
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not float(value).is_integer():
            raise ValueError(f"{name} must be None, a class index or one class index per sample, "
                             f"got {target!r}.")
        return int(value)
    t = np.asarray(target)
    if t.ndim != 1 or len(t) != n:
        raise ValueError(f"{name} has {t.size} entries but X has {n} samples; give one class "
                         f"index per sample (shape ({n},)), got shape {t.shape}.")
    if t.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(t) | (t != np.round(t)))
        if len(bad):
            raise ValueError(f"{name} must hold integer class indices; sample {bad[0]} is "
                             f"{t[bad[0]]}.")
    elif t.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class indices, got dtype {t.dtype}.")
    return t.astype(np.int64)


def check_y(y, n):
    """``y`` as a 1-d array of class labels of length ``n``."""
    if y is None:
        raise ValueError("requires y to be passed, but the target y is None.")
    y = check_labels(y, n)
    kind = type_of_target(y, input_name="y", raise_unknown=True)
    if kind not in ("binary", "multiclass"):
        raise ValueError(
            f"Unknown label type: {kind}. y must hold class labels (binary or multiclass).")
    return y


def check_concept_labels(concept_labels, n, required=True):
    """Concept labels as int64 in {-1, 0, 1} (-1: no label), or ``None`` if not given.

    Raises if they are required and missing, have the wrong length, hold other
    values, or the labelled samples do not contain both classes.
    """
    if concept_labels is None:
        if required:
            raise ValueError(
                "concept_labels are required to fit the CAV (0/1 per sample, -1 for samples "
                "without a label): call fit(X, y, concept_labels=c) (with metadata routing: "
                "set_fit_request(concept_labels=True)), or pass cav= as a vector.")
        return None
    c = concept_labels.detach().cpu().numpy() if isinstance(concept_labels, torch.Tensor) \
        else np.asarray(concept_labels)
    if c.ndim != 1 or len(c) != n:
        raise ValueError(
            f"concept_labels must be 1-d with one entry per sample ({n}), got shape {c.shape}.")
    if c.dtype.kind == "b":
        c = c.astype(np.int64)
    if c.dtype.kind not in "iuf" or (c.dtype.kind == "f" and not np.all(np.isfinite(c))):
        raise ValueError(f"concept_labels must be numeric 0/1 (-1: unlabelled), got dtype {c.dtype}.")
    values = set(np.unique(c).tolist())
    if not values <= {0, 1, UNLABELLED}:
        raise ValueError(
            f"concept_labels must hold 0 (concept absent), 1 (present) or -1 (no label); got "
            f"values {sorted(values)}.")
    c = c.astype(np.int64)
    present = sorted(values - {UNLABELLED})
    if required and present != [0, 1]:
        raise ValueError(
            f"concept_labels of the labelled samples contain one class only ({present}); a CAV "
            "needs samples with (1) and without (0) the concept.")
    return c


def encode_y(y, classes):
    """``y`` as indices into ``classes``; raises for labels the network has no output for."""
    unknown = np.setdiff1d(np.unique(y), classes)
    if len(unknown):
        raise ValueError(
            f"y contains labels {unknown[:10].tolist()} that are not among the network's classes "
            f"{classes[:20].tolist()} (one per output unit, in output order).")
    sorter = np.argsort(classes, kind="stable")
    return sorter[np.searchsorted(classes, y, sorter=sorter)].astype(np.int64)


def unit_vector(vec, name="cav"):
    """``vec`` (array-like, tensor or an object with ``cav_``) as a float64 unit vector.

    Raises a ``ValueError`` naming ``name`` when it is empty, zero, not finite or
    not numeric.
    """
    vec = getattr(vec, "cav_", vec)
    if isinstance(vec, torch.Tensor):
        vec = vec.detach().cpu().numpy()
    vec = np.asarray(vec)
    if vec.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be a numeric vector or a fitted CAVEstimator, got {vec!r}.")
    vec = vec.astype(np.float64).ravel()
    norm = float(np.linalg.norm(vec)) if vec.size else 0.0
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError(f"{name} must be a non-zero finite vector or a fitted CAVEstimator.")
    return vec / norm


def _first_bad(mask):
    """Index of the first ``True`` sample of a per-sample mask (ndarray or tensor), or ``None``."""
    if isinstance(mask, torch.Tensor):
        bad = torch.nonzero(mask.reshape(mask.shape[0], -1).any(dim=1))
        return int(bad[0, 0]) if len(bad) else None
    bad = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    return int(bad[0]) if len(bad) else None


def check_group_labels(labels, n, name="bias"):
    """Group labels (e.g. the bias attribute: a colour index) as int64 of shape ``(n,)``.

    Integer-valued floats are accepted; NaN, infinity, fractions and non-numeric
    values raise a ``ValueError`` naming ``name`` and the first offending sample.

    Examples
    --------
    >>> from skdebias._utils._validation import check_group_labels
    >>> check_group_labels([0, 2.0, 1], 3).tolist()
    [0, 2, 1]
    """
    labels = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) \
        else np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(
            f"{name} must be a 1-d array with one label per sample ({n}), got shape "
            f"{labels.shape}.")
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64)
    if labels.dtype.kind == "f":
        i = _first_bad(~np.isfinite(labels))
        if i is not None:
            raise ValueError(f"{name} contains NaN or infinity (first at sample {i}: "
                             f"{labels[i].item()}).")
        i = _first_bad(labels != np.round(labels))
        if i is None:
            return labels.astype(np.int64)
        raise ValueError(f"{name} must hold integer group labels (e.g. colour index); sample "
                         f"{i} is {labels[i].item()}.")
    raise ValueError(
        f"{name} must hold integer group labels (e.g. colour index), got dtype {labels.dtype}.")


