"""Plain-text tables and JSON output shared by the CLI and the benchmarks."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
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
    """``obj`` with numpy values as Python ones, NaN/inf floats as ``None`` (JSON null) and
    classes as their dotted names."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, type):  # a setting such as optimizer=torch.optim.SGD: its dotted name
        return f"{obj.__module__}.{obj.__qualname__}"
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


def _new_file_mode(path):
    """The permissions ``open(path, "w")`` gives: the old file's, else 0o666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json(path, payload):
    """Write ``payload`` as indented JSON, atomically, creating folders.

    The whole text is built before anything is written, then written to a
    temporary file in the target's folder and moved onto ``path``: an error or
    a kill midway leaves the previous file as it was.

    Parameters
    ----------
    path : str or path-like
        Target file; its folders are created.
    payload : object
        Dicts, lists, tuples, numbers, strings, ``None``, numpy scalars and
        arrays. NaN and infinite floats are written as ``null`` (JSON has no
        NaN).

    Returns
    -------
    path
        ``path`` as given.

    Raises
    ------
    TypeError
        If ``payload`` holds an object JSON cannot encode (nothing is written).
    """
    text = json.dumps(_jsonable(payload), indent=2, allow_nan=False)
    # write through a symlink as open(path, "w") did, instead of replacing the link itself
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    mode = _new_file_mode(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes the file private (0o600)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # the rename itself survives a power cut only once the folder is synced (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
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
