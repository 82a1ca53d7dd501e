"""Bias metrics and sklearn scorers.

Sections are grouped by method family; every function takes plain arrays or a
network plus data, and returns floats or dicts of floats.
"""

from __future__ import annotations

import numpy as np

__all__ = []

# ---------------------------------------------------------------- correction metrics (CAV / ClArC)

# ---------------------------------------------------------------- spuriosity metrics

# ---------------------------------------------------------------- counterfactual / group metrics
