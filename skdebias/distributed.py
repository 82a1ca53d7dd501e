"""Scaling out: activations of dask arrays, activations written to zarr in chunks, and
the set-up of Dask workers (CPU threads, one GPU per worker).

Dask and zarr are optional (``pip install skdebias[dask]``); they are imported when a
function here is called.
"""

from __future__ import annotations

import copy
import threading
import warnings

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._utils._data import (
    check_input_shape,
    is_dask_array,
    is_iterable_dataset,
    n_samples,
)
from ._utils._runtime import resolve_device
from ._utils._validation import check_int

__all__ = ["transform_dask", "write_activations", "setup_workers", "accelerated"]

_WORKER_LOCK = threading.Lock()
_FORWARD_LOCK = threading.Lock()


def _import(name):
    try:
        return __import__(name, fromlist=["_"])
    except ImportError as exc:  # pragma: no cover - the extra is installed in the tests
        raise ImportError(
            f"{name} is needed here; install it with pip install 'skdebias[dask]'.") from exc


def _check_extractor(extractor):
    # (ActivationExtractor imports this module: its type is told by what it has)
    if not (callable(getattr(extractor, "iter_activations", None))
            and hasattr(extractor, "_module_on_device")):
        raise TypeError(
            f"extractor must be a fitted ActivationExtractor, got {type(extractor).__name__}.")
    check_is_fitted(extractor, "output_shape_")


def _for_workers(extractor):
    """A shallow copy of a fitted extractor that carries the network once (as ``module_``,
    on the CPU when ``device='auto'``, so that each worker moves it to its own device)."""
    est = copy.copy(extractor)
    module = extractor.module_
    if extractor.device in ("auto", None) and extractor.device_.type != "cpu":
        module = copy.deepcopy(module).cpu()
        est.device_ = torch.device("cpu")
    est.module_ = module
    est.estimator = module
    return est


def _ready_on_worker(est):
    """``est`` with ``device='auto'`` resolved on this worker (its own GPU, or the CPU);
    done once per worker process, since the extractor arrives there once."""
    with _WORKER_LOCK:
        if not est.__dict__.get("_on_worker", False):
            if est.device in ("auto", None):
                device = resolve_device("auto")
                if device != est.device_:
                    est.module_ = est._module_on_device(device)
                    est.device_ = device
            est._on_worker = True
    return est


def _extract_block(block, est):
    est = _ready_on_worker(est)
    # one block at a time per process: the threads of a worker (or of dask's local threaded
    # scheduler) share the extractor, whose layer hooks serve one forward pass at a time
    with _FORWARD_LOCK, warnings.catch_warnings():
        # the uint8 scaling is announced once, where the lazy result is made
        warnings.simplefilter("ignore", UserWarning)
        return est.transform(np.asarray(block))


def transform_dask(extractor, X):
    """Activations of a dask array, as a lazy dask array (nothing is computed here).

    ``X`` is rechunked along the samples only (every other axis in one chunk);
    each chunk of samples becomes one task that runs
    :meth:`ActivationExtractor.transform` on it, one batch at a time. The
    fitted extractor enters the task graph once, so a Dask cluster sends the
    network to each worker once, not with every chunk. With ``device="auto"``
    each worker uses its own GPU (see :func:`setup_workers`), else the CPU.
    ``ActivationExtractor.transform`` calls this for a dask array.

    Parameters
    ----------
    extractor : ActivationExtractor
        Fitted.
    X : dask.array.Array of shape (n_samples, C, H, W)

    Returns
    -------
    A : dask.array.Array of shape (n_samples, *extractor.output_shape_), float32
        One chunk per chunk of samples of ``X``.

    Examples
    --------
    >>> import numpy as np, torch, dask.array as da
    >>> from skdebias import ActivationExtractor
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> X = np.random.rand(10, 3, 8, 8).astype("float32")
    >>> ext = ActivationExtractor(net, layer="1", device="cpu").fit(X)
    >>> A = ext.transform(da.from_array(X, chunks=4))
    >>> A.chunks[0], A.dtype
    ((4, 4, 2), dtype('float32'))
    >>> bool(np.allclose(A.compute(), ext.transform(X)))
    True
    """
    _check_extractor(extractor)
    if not is_dask_array(X):
        raise TypeError(f"X must be a dask array, got {type(X).__name__}.")
    dask = _import("dask")
    da = _import("dask.array")
    if X.ndim < 2 or X.dtype.kind not in "biuf":
        raise ValueError(
            f"X must be a dask array of real numbers with at least 2 dimensions, got shape "
            f"{X.shape} and dtype {X.dtype}.")
    check_input_shape(extractor, tuple(X.shape[1:]), getattr(extractor, "input_shape_", None))
    if X.ndim >= 3 and X.dtype == np.uint8:
        warnings.warn(
            "X holds uint8 images; they are scaled from 0..255 to [0, 1] as they are read. "
            "Pass float images to choose another scale.", UserWarning, stacklevel=3)
    elif X.ndim >= 3 and X.dtype.kind in "iu":
        raise ValueError(
            f"X holds {X.dtype} images, whose value range is unknown; convert them to float32 "
            "in [0, 1] (e.g. X / 255 for 8-bit, X / 65535 for 16-bit images).")
    X = X.rechunk({axis: -1 for axis in range(1, X.ndim)})
    est = dask.delayed(_for_workers(extractor), pure=True)
    out_shape = tuple(extractor.output_shape_)
    blocks = X.to_delayed().reshape(-1)
    parts = [da.from_delayed(dask.delayed(_extract_block, pure=True)(block, est),
                             shape=(size, *out_shape), dtype=np.float32)
             for block, size in zip(blocks, X.chunks[0])]
    return da.concatenate(parts, axis=0)


def write_activations(extractor, X, store, chunk_size=None, overwrite=False):
    """Write the activations of a large data set to a zarr array, one chunk at a time.

    The memory used is bounded by one chunk of activations plus one batch of
    input, whatever the size of ``X``. A dask array ``X`` is computed on its
    cluster (each worker writes its own chunks); anything else is read in this
    process, batch by batch (a Dataset with the extractor's ``num_workers``).

    Parameters
    ----------
    extractor : ActivationExtractor
        Fitted.
    X : array-like, memmap, tensor, Dataset, DataLoader, IterableDataset or dask array
        An IterableDataset of unknown length grows the array chunk by chunk.
    store : str, path or zarr store
        Where the zarr array is written.
    chunk_size : int, optional
        Samples per zarr chunk; default: 16 batches of the extractor.
    overwrite : bool, default=False
        Replace an array already at ``store``; otherwise that raises.

    Returns
    -------
    A : zarr.Array of shape (n_samples, *extractor.output_shape_), float32

    Examples
    --------
    >>> import tempfile, numpy as np, torch
    >>> from skdebias import ActivationExtractor
    >>> from skdebias.distributed import write_activations
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    >>> X = np.random.rand(10, 3, 8, 8).astype("float32")
    >>> ext = ActivationExtractor(net, layer="1", batch_size=4, device="cpu").fit(X)
    >>> A = write_activations(ext, X, tempfile.mkdtemp() + "/acts.zarr", chunk_size=6)
    >>> A.shape, A.chunks
    ((10, 4), (6, 4))
    """
    _check_extractor(extractor)
    zarr = _import("zarr")
    chunk_size = 16 * int(extractor.batch_size) if chunk_size is None else \
        check_int("chunk_size", chunk_size, low=1)
    out_shape = tuple(extractor.output_shape_)
    if is_dask_array(X):
        A = transform_dask(extractor, X).rechunk({0: chunk_size})
        A.to_zarr(store, overwrite=overwrite)
        return zarr.open_array(store, mode="r+")
    X = extractor._validate_X(X, reset=False, allow_iterable=True)
    try:
        n = n_samples(X)
    except TypeError:  # a stream of unknown length
        n = None
    if n is None and not is_iterable_dataset(X):  # pragma: no cover - n_samples covers the rest
        raise TypeError(f"X of type {type(X).__name__} has no length.")
    out = zarr.create_array(store, shape=(n or 0, *out_shape), chunks=(chunk_size, *out_shape),
                            dtype="float32", overwrite=overwrite)
    start, pending = 0, []

    def flush(parts):
        nonlocal start
        block = np.concatenate(parts)
        stop = start + block.shape[0]
        if stop > out.shape[0]:
            out.resize((stop, *out_shape))
        out[start:stop] = block
        start = stop

    buffered = 0
    for a in extractor.iter_activations(X, _checked=True):
        pending.append(a.numpy())
        buffered += a.shape[0]
        if buffered >= chunk_size:
            block = np.concatenate(pending)
            flush([block[:chunk_size]])
            pending, buffered = [block[chunk_size:]], block.shape[0] - chunk_size
    if buffered:
        flush(pending)
    if n is not None and start != n:
        raise ValueError(f"X yielded {start} samples, but its length is {n}.")
    return out


#: glibc's mallopt parameters and the values ``setup_workers(keep_memory=True)`` sets
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_MEMORY = {_M_TRIM_THRESHOLD: 256 * 2**20, _M_MMAP_THRESHOLD: 32 * 2**20}


def _keep_freed_memory():
    """Let glibc keep freed memory for reuse (larger trim and mmap thresholds); ``True`` where
    it was set, ``False`` where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in _KEEP_MEMORY.items())


def _worker_setup(threads, gpu, keep_memory=False):
    torch.set_num_threads(threads)
    if gpu is not None:
        torch.cuda.set_device(gpu)
    return {"threads": torch.get_num_threads(),
            "device": str(resolve_device("auto")) + ("" if gpu is None else f":{gpu}"),
            "keep_memory": bool(keep_memory) and _keep_freed_memory()}


def setup_workers(client, threads=1, gpus="auto", keep_memory=True):
    """Set up every worker of a Dask cluster for networks: CPU threads and one GPU each.

    ``torch`` uses all cores of a machine in each process by default; with
    several worker processes on one machine that oversubscribes the cores, so
    each worker gets ``threads`` intra-op threads. With GPUs, worker ``i``
    (in the order of their addresses) makes GPU ``i mod n_gpus`` its current
    CUDA device, so that ``device="auto"`` (and ``"cuda"``) in the estimators
    it runs means its own GPU. On a cluster whose workers each see one GPU
    (``CUDA_VISIBLE_DEVICES`` set per worker, as dask-cuda or a SLURM/Kubernetes
    job does), every worker uses GPU 0 of its own view.

    Parameters
    ----------
    client : distributed.Client
    threads : int, default=1
        Intra-op CPU threads of torch in each worker.
    gpus : "auto", int or None, default="auto"
        GPUs per machine to spread the workers over; ``"auto"`` counts them on
        each worker; ``None`` or 0 leaves the CUDA device alone.

    keep_memory : bool, default=True
        Let each worker's C library keep the memory torch frees for reuse.
        Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
        makes glibc hand freed memory back to the system at once and map it
        again for the next tensor; training then runs about twice as slowly as
        in a plain process. ``True`` sets glibc's trim threshold to 256 MB and
        its mmap threshold to 32 MB in each worker (``mallopt``; nothing happens
        where the C library is not glibc). A worker then holds on to up to
        256 MB of freed memory, which Dask's memory monitor counts as used.

    Returns
    -------
    settings : dict
        ``{worker address: {"threads": ..., "device": ..., "keep_memory": ...}}``.
    """
    check_int("threads", threads, low=1)
    if not isinstance(keep_memory, (bool, np.bool_)):
        raise TypeError(f"keep_memory must be True or False, got {keep_memory!r}.")
    if gpus is not None and gpus != "auto":
        check_int("gpus", gpus, low=0)
    workers = sorted(client.scheduler_info(n_workers=-1)["workers"]) \
        if _accepts_n_workers(client) else sorted(client.scheduler_info()["workers"])
    counts = client.run(torch.cuda.device_count)
    settings = {}
    for i, address in enumerate(workers):
        n_gpus = counts.get(address, 0) if gpus == "auto" else (gpus or 0)
        gpu = i % n_gpus if n_gpus else None
        settings.update(client.run(_worker_setup, threads, gpu, bool(keep_memory),
                                   workers=[address]))
    return settings


def _accepts_n_workers(client):
    import inspect

    return "n_workers" in inspect.signature(client.scheduler_info).parameters


def accelerated(net_class):
    """A skorch net class that trains data-parallel through Hugging Face Accelerate.

    ``net_class`` (e.g. :class:`~skdebias.EnDClassifier`,
    :class:`~skdebias.GroupBalancedClassifier`, or any skorch net class) with
    skorch's ``AccelerateMixin``, made so that a loss term at a hooked layer
    (EnD's) is still computed in every step, layers are still found by name
    when the module is wrapped for several processes, and the net pickles.
    The correctors that fine-tune through skorch do this themselves when given
    an accelerator (``net_params={"accelerator": ...}``).

    Parameters
    ----------
    net_class : subclass of skorch.NeuralNet

    Returns
    -------
    cls : subclass of ``net_class``
        Takes ``accelerator=`` (an ``accelerate.Accelerator``) besides the
        parameters of ``net_class``; its ``device`` is left to the accelerator.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from accelerate import Accelerator
    >>> from skdebias import EnDClassifier
    >>> from skdebias.distributed import accelerated
    >>> net = accelerated(EnDClassifier)(
    ...     torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)),
    ...     accelerator=Accelerator(cpu=True), layer="1", max_epochs=1, train_split=None,
    ...     verbose=0)
    >>> X, y = np.random.rand(16, 4).astype("float32"), np.arange(16) % 2
    >>> net.fit(X, y, bias=np.arange(16) % 4 // 2).predict(X).shape
    (16,)
    """
    from skorch import NeuralNet

    from ._utils._accelerate import accelerated_class

    if not (isinstance(net_class, type) and issubclass(net_class, NeuralNet)):
        raise TypeError(f"net_class must be a skorch NeuralNet class, got {net_class!r}.")
    return accelerated_class(net_class)
