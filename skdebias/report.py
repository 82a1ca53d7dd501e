"""Plain-text tables and JSON output shared by the CLI and the benchmarks."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from contextlib import contextmanager

import numpy as np

__all__ = ["format_table", "write_json", "Timer", "mean_std", "environment"]


def _fmt(value, floatfmt):
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "nan"
        return format(float(value), floatfmt)
    return str(value)


def format_table(rows, columns=None, floatfmt=".3f", title=None):
    """Render a list of dicts as an aligned plain-text table.

    Parameters
    ----------
    rows : list of dict
    columns : list of str, optional
        Column order (default: keys of the first row).
    floatfmt : str, default=".3f"
    title : str, optional

    Examples
    --------
    >>> print(format_table([{"method": "pattern", "cos": 0.98765}]))
    method   cos
    -------  -----
    pattern  0.988
    """
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, ""), floatfmt) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [] if title is None else [title]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def environment():
    """Versions and hardware facts to store beside measured numbers."""
    import sklearn
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def write_json(path, payload):
    """Write ``payload`` (numpy values allowed) as indented JSON, creating folders."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(_jsonable(payload), fh, indent=2)
    return path


class Timer:
    """Wall-clock seconds of named blocks: ``with timer("fit"): ...``; ``timer["fit"]``."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def __getitem__(self, name):
        return self.seconds[name]


def mean_std(values, fmt=".3f"):
    """``"m ± s"`` of a sequence of numbers."""
    values = np.asarray(values, dtype=float)
    return f"{format(values.mean(), fmt)} ± {format(values.std(ddof=0), fmt)}"
