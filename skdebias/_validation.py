"""Parameter checks shared by every estimator: one message style, one place.

Each check returns the value converted to a plain Python type, or raises a
``ValueError`` naming the parameter, what is allowed and the value received.
"""

from __future__ import annotations

import numbers

import numpy as np

__all__ = ["check_int", "check_real", "check_choice"]


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
