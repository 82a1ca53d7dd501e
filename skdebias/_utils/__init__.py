"""Private utilities of skdebias, one module per job.

- ``_modules``: the module behind an estimator, layer lookup, copies, devices;
- ``_hooks``: forward hooks that record or stop at a layer;
- ``_data``: the input check and batching over arrays, memmaps, tensors and Datasets;
- ``_validation``: parameter, label and concept-vector checks;
- ``_runtime``: devices, seeds, progress bars, threads;
- ``_stats``: tie-aware selection weights.

No module here imports an estimator module, so every estimator can import any of them.
"""
