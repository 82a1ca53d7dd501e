"""Runtime settings of a fit: device, precision, seeds, progress bars, CPU threads."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["resolve_device", "set_seed", "progress_bar", "limit_threads", "PRECISIONS",
           "check_precision", "autocast", "reuse_casts", "grad_scaler"]

#: Values of the ``precision`` parameter of the estimators that run a network.
PRECISIONS = ("float32", "bfloat16", "float16")


def resolve_device(device="auto") -> torch.device:
    """Turn ``device`` into a :class:`torch.device`.

    ``"auto"`` (or ``None``) picks CUDA when it is available, else the CPU.
    Any string or :class:`torch.device` torch understands is accepted.
    """
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(
                f"device={device!r} is not valid; use 'auto', 'cpu', 'cuda' or 'cuda:N'."
            ) from exc
    else:
        raise ValueError(
            f"device={device!r} is not valid; use 'auto', 'cpu', 'cuda', 'cuda:N' "
            "or a torch.device."
        )
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but CUDA is not available; use 'auto' or 'cpu'.")
    return dev


def set_seed(random_state) -> torch.Generator | None:
    """Seed torch's global RNGs from an int ``random_state``; return a seeded Generator.

    ``None`` leaves the global state alone and returns ``None``.
    """
    if random_state is None:
        return None
    from sklearn.utils import check_random_state

    seed = int(check_random_state(random_state).randint(0, 2**31 - 1))
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def progress_bar(iterable, enabled, total=None, desc=None):
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (an estimator's ``verbose`` > 0)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc)


@contextlib.contextmanager
def limit_threads(n: int = 1):
    """Run the block with at most ``n`` intra-op CPU threads, restoring the setting after.

    For loops over many tiny tensor operations (e.g. training a linear head on
    extracted features): on a busy machine each multi-threaded call of a tiny
    op can cost milliseconds of thread synchronisation, 100x its compute.
    """
    before = torch.get_num_threads()
    if before > n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def check_precision(precision, device) -> str:
    """Check ``precision`` (one of :data:`PRECISIONS`) for a run on ``device``; return it.

    ``"float16"`` needs a CUDA device: the CPU has no fast half-precision kernels, and
    training in float16 without a GPU would be slower than float32, so it raises (use
    ``"bfloat16"`` on the CPU).
    """
    from ._validation import check_choice

    check_choice("precision", precision, PRECISIONS)
    if precision == "float16" and torch.device(device).type != "cuda":
        raise ValueError(
            f"precision='float16' needs a CUDA device, got device={str(device)!r}; on the CPU "
            "use precision='bfloat16' (or 'float32').")
    return precision


@contextlib.contextmanager
def autocast(precision, device):
    """Run the block under :func:`torch.autocast` at ``precision`` on ``device``'s type.

    ``"float32"`` changes nothing. Otherwise matrix products and convolutions (forward
    passes, and the backward passes of the graph they build) run in bfloat16 or float16;
    which ops stay in float32 follows torch's autocast op lists for the device. Callers
    convert what they return to float32. ``precision`` must have passed
    :func:`check_precision`.
    """
    if precision == "float32":
        yield
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, precision)):
        yield


@contextlib.contextmanager
def reuse_casts(precision):
    """Inside this block, autocast casts each weight to ``precision`` once, not once per batch.

    torch keeps the low-precision copies of the weights that autocast makes (floating-point
    leaf tensors that require grad) until the outermost autocast block ends; an inference
    loop that enters one block per batch therefore casts every weight of the network again
    for every batch. This block counts as an enclosing one without enabling or disabling
    anything, so the copies are kept from one batch to the next and dropped at its end. The
    weights must not change inside it: for inference passes only. ``"float32"`` changes
    nothing.
    """
    if precision == "float32":
        yield
        return
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()


def grad_scaler(precision, device):
    """A :class:`torch.amp.GradScaler` for training at ``precision``, or ``None``.

    Only float16 needs loss scaling (its small exponent range lets gradients underflow to
    zero); float32 and bfloat16 train without it.
    """
    if precision != "float16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)
