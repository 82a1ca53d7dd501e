"""What the CAV-based correctors (RR-ClArC, A-/P-ClArC) share.

- input and concept-label validation;
- fitting the CAV on max-pooled activations of the copied network;
- the freezing rules of ``train_layers``;
- a skorch classifier that keeps frozen modules in eval mode;
- a common sklearn base class that delegates ``predict``/``predict_proba``/``score``
  to the corrected network.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.utils.validation import check_is_fitted
from skorch import NeuralNetClassifier
from torch import nn

from .._torch import (
    _is_skorch_net,
    copy_module,
    dataset_targets,
    find_layer,
    get_module,
    n_samples,
    preserve_mode,
    resolve_device,
)
from .._tags import NetworkInputMixin
from .._validation import check_choice, check_int, check_real
from ..extraction import ActivationExtractor, _check_input

__all__ = []

#: Value of ``concept_labels`` that marks a sample without a concept label.
UNLABELLED = -1


# ------------------------------------------------------------------ validation
def check_y(y, n):
    """``y`` as a 1-d array of class labels of length ``n``."""
    from sklearn.utils.multiclass import type_of_target
    from sklearn.utils.validation import column_or_1d

    if y is None:
        raise ValueError("requires y to be passed, but the target y is None.")
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = column_or_1d(y, warn=True)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-d (one class label per sample), got shape {y.shape}.")
    if len(y) != n:
        raise ValueError(
            f"X and y have inconsistent numbers of samples: X has {n}, y has {len(y)}.")
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


def take(X, idx):
    """Rows ``idx`` of an array, tensor or Dataset (a ``Subset``)."""
    if isinstance(X, torch.utils.data.Dataset) and not isinstance(X, torch.Tensor):
        return torch.utils.data.Subset(X, np.asarray(idx).tolist())
    if isinstance(X, torch.Tensor):
        return X[torch.as_tensor(np.asarray(idx), device=X.device)]
    return X[np.asarray(idx)]


class _Pairs(torch.utils.data.Dataset):
    """A Dataset yielding ``(x, y_i)``: the images of ``X`` (items ``x`` or ``(x, ...)``)
    with the given labels (zeros when none are given), as skorch expects."""

    def __init__(self, X, y=None):
        self.X = X
        self.y = None if y is None else torch.as_tensor(np.asarray(y), dtype=torch.long)

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        item = self.X[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = torch.as_tensor(x, dtype=torch.float32)
        return x, (self.y[i] if self.y is not None else torch.tensor(0))


def training_data(X, y=None):
    """``X`` for skorch: arrays and tensors as they are, Datasets relabelled with ``y``."""
    if isinstance(X, torch.utils.data.Dataset) and not isinstance(X, torch.Tensor):
        return _Pairs(X, y)
    if isinstance(X, np.ndarray) and X.dtype != np.float32:
        return X.astype(np.float32)
    if isinstance(X, torch.Tensor) and X.dtype != torch.float32:
        return X.float()
    return X


# ------------------------------------------------------------------ networks
def copy_network(estimator):
    """A deep copy of the module behind ``estimator`` (module or skorch net); the caller's is untouched."""
    module = get_module(estimator)
    return copy_module(module)


def network_classes(estimator, n_outputs):
    """Class labels in output order: a fitted skorch classifier's ``classes_``, else ``0..n_outputs-1``."""
    if _is_skorch_net(estimator):
        try:
            classes = np.asarray(estimator.classes_)
        except (AttributeError, KeyError, TypeError):  # not fitted or no classes
            classes = None
        if classes is not None and classes.ndim == 1 and len(classes) == n_outputs:
            return classes
    return np.arange(n_outputs)


def encode_y(y, classes):
    """``y`` as indices into ``classes``; raises for labels the network has no output for."""
    unknown = np.setdiff1d(np.unique(y), classes)
    if len(unknown):
        raise ValueError(
            f"y contains labels {unknown[:10].tolist()} that are not among the network's classes "
            f"{classes[:20].tolist()} (one per output unit, in output order).")
    sorter = np.argsort(classes, kind="stable")
    return sorter[np.searchsorted(classes, y, sorter=sorter)].astype(np.int64)


def first_batch(X):
    """The first sample of ``X`` as a float32 batch of one, on the CPU."""
    from .._torch import iter_batches

    return next(iter_batches(X, batch_size=1))


def module_device(module):
    param = next(module.parameters(), None)
    if param is None:
        buf = next(module.buffers(), None)
        return buf.device if buf is not None else torch.device("cpu")
    return param.device


def trace_layer(module, layer, xb):
    """Run one forward pass and record the order of module calls around ``layer``.

    Returns ``(before, out_shape, n_outputs)``: ``before`` the names of the
    modules whose forward starts before ``layer``'s forward ends (``layer`` and
    its sub-modules included, the root included), the per-sample output shape
    of ``layer`` and the number of network outputs.
    """
    target = find_layer(module, layer)
    names = {id(m): name for name, m in module.named_modules()}
    started: list[str] = []
    state = {"end": None, "shape": None}
    handles = []

    def pre_hook(mod, _inputs):
        started.append(names.get(id(mod), ""))

    def post_hook(_mod, _inputs, output):
        if isinstance(output, (tuple, list)):
            output = output[0]
        if state["end"] is None:
            state["end"] = len(started)
            state["shape"] = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None

    try:
        for m in module.modules():
            handles.append(m.register_forward_pre_hook(pre_hook))
        handles.append(target.register_forward_hook(post_hook))
        device = module_device(module)
        with preserve_mode(module, train=False), torch.no_grad():
            out = module(xb.to(device))
    finally:
        for h in handles:
            h.remove()
    if state["end"] is None:
        raise ValueError(f"Layer {layer!r} is not called in the forward pass of the network.")
    if state["shape"] is None:
        raise ValueError(f"Layer {layer!r} does not output a tensor.")
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise ValueError(
            "The network must output logits of shape (n_samples, n_classes); got "
            f"{type(out).__name__} of shape {tuple(getattr(out, 'shape', ()))}.")
    return started[:state["end"]], state["shape"], int(out.shape[1])


def resolve_train_layers(module, layer, train_layers, before):
    """Freeze parameters according to ``train_layers``; return (trainable names, eval module names).

    ``"after"``: parameters of every module executed up to and including
    ``layer`` are frozen, and those modules stay in eval mode while training
    (BatchNorm statistics and dropout fixed). ``"all"``: nothing frozen. A list
    of parameter-name prefixes: only matching parameters train; modules all of
    whose parameters are frozen stay in eval mode.
    """
    named = dict(module.named_parameters())
    if isinstance(train_layers, str):
        check_choice("train_layers", train_layers, ("after", "all"))
        if train_layers == "all":
            trainable = set(named)
            eval_modules = []
        else:
            frozen_modules = set(before)
            frozen = set()
            for mname, mod in module.named_modules():
                if mname in frozen_modules:
                    for pname, _ in mod.named_parameters(recurse=False):
                        frozen.add(f"{mname}.{pname}" if mname else pname)
            # parameters of the layer's sub-modules are frozen too
            for pname in named:
                if pname.startswith(layer + "."):
                    frozen.add(pname)
            trainable = set(named) - frozen
            # the layer's ancestors (containers such as "features" or "layer3.1") also start
            # before it ends, but eval() on them would reach the trained modules after it
            eval_modules = sorted(m for m in set(before) - {""} if not layer.startswith(m + "."))
    else:
        if not isinstance(train_layers, (list, tuple)) or not train_layers or not all(
                isinstance(p, str) for p in train_layers):
            raise ValueError(
                "train_layers must be 'after', 'all' or a non-empty list of parameter-name "
                f"prefixes (e.g. ['classifier.']), got {train_layers!r}.")
        unmatched = [p for p in train_layers if not any(n.startswith(p) for n in named)]
        if unmatched:
            import difflib

            close = difflib.get_close_matches(unmatched[0], list(named), n=5, cutoff=0.3)
            raise ValueError(
                f"train_layers prefixes {unmatched} match no parameter of the network; "
                f"closest parameter names: {close or list(named)[:5]}.")
        trainable = {n for n in named if any(n.startswith(p) for p in train_layers)}
        eval_modules = []
        for mname, mod in module.named_modules():
            params = [f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters()]
            if params and not any(p in trainable for p in params):
                eval_modules.append(mname)
    for pname, param in named.items():
        param.requires_grad_(pname in trainable)
    return [n for n in named if n in trainable], [m for m in eval_modules if m]


def resolve_cav(cav, module, layer, X, concept_labels, out_shape, batch_size, device,
                pooling="max"):
    """Fit (or check) the CAV; return ``(unit vector float32, fitted estimator or None, A, t)``.

    ``A`` / ``t`` are the activations (max-pooled, or flattened with
    ``pooling="flatten"``) and the 0/1 labels of the labelled samples (``None``
    when no concept labels are given). ``out_shape`` is the per-sample shape of
    the layer's output.
    """
    from ..concepts import CAVEstimator

    A = t = None
    if concept_labels is not None:
        idx = np.flatnonzero(concept_labels != UNLABELLED)
        extractor = ActivationExtractor(module, layer, pooling=pooling, batch_size=batch_size,
                                        device=device)
        X_lab = take(X, idx)
        A = extractor.fit(X_lab).transform(X_lab)
        t = concept_labels[idx]
    if cav is None or hasattr(cav, "fit"):
        if A is None:
            raise ValueError(
                "concept_labels are required to fit the CAV (0/1 per sample, -1 for samples "
                "without a label); or pass cav= as a vector.")
        est = clone(cav) if cav is not None else CAVEstimator()
        est.fit(A, t)
        vec = getattr(est, "cav_", None)
        if vec is None:
            vec = getattr(est, "coef_", None)
        if vec is None:
            raise ValueError(
                f"cav={type(cav).__name__} has neither cav_ nor coef_ after fitting; pass a "
                "CAVEstimator or a vector.")
        fitted = est
    else:
        if isinstance(cav, torch.Tensor):
            cav = cav.detach().cpu().numpy()
        vec = np.asarray(cav)
        if vec.dtype.kind not in "iuf":
            raise ValueError(f"cav must be a CAVEstimator or a numeric vector, got {cav!r}.")
        fitted = None
    vec = np.asarray(vec, dtype=np.float64).ravel()
    if pooling == "flatten":
        n_dims = int(np.prod(out_shape)) if len(out_shape) else 1
        what = f"{n_dims} values per sample (flattened activations of shape {tuple(out_shape)})"
    else:
        n_dims = out_shape[0] if len(out_shape) >= 1 else 1
        what = f"{n_dims} channels (max-pooled activations)"
    if vec.shape[0] != n_dims:
        raise ValueError(
            f"The CAV has {vec.shape[0]} dimensions but layer {layer!r} has {what}; fit it on "
            "this layer's activations.")
    norm = float(np.linalg.norm(vec))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("The CAV is zero or not finite; it must be a non-zero finite vector.")
    return (vec / norm).astype(np.float32), fitted, A, t


# ------------------------------------------------------------------ skorch
class _CorrectionNet(NeuralNetClassifier):
    """NeuralNetClassifier that keeps ``eval_modules`` of the module in eval mode while training."""

    def __init__(self, module, *args, eval_modules=(), **kwargs):
        super().__init__(module, *args, **kwargs)
        self.eval_modules = eval_modules

    def _set_training(self, training=True):
        super()._set_training(training)
        if training and self.eval_modules:
            # looked up by name at every step (cheap: no walk over all modules), so a module
            # replaced after fitting (A-ClArC) is still found
            for name in self.eval_modules:
                try:
                    self.module_.get_submodule(name).eval()
                except AttributeError:
                    pass


def build_net(net_class, module, corrector, max_epochs, extra=None):
    """A skorch net around ``module`` with the corrector's training settings."""
    kwargs = dict(corrector.net_params or {})
    if corrector.optimizer is torch.optim.SGD:
        kwargs.setdefault("optimizer__momentum", 0.9)
    kwargs.setdefault("iterator_train__shuffle", True)
    if corrector.callbacks is not None:
        kwargs["callbacks"] = copy.deepcopy(list(corrector.callbacks))
    kwargs.update(extra or {})
    return net_class(
        module,
        criterion=nn.CrossEntropyLoss,
        optimizer=corrector.optimizer,
        lr=corrector.lr,
        max_epochs=max_epochs,
        batch_size=corrector.batch_size,
        train_split=corrector.train_split,
        device=str(resolve_device(corrector.device)),
        verbose=corrector.verbose,
        **kwargs,
    )


# ------------------------------------------------------------------ sklearn base
class _CAVCorrector(NetworkInputMixin, ClassifierMixin, BaseEstimator):
    """Base class: validation, CAV fitting and prediction through the corrected network.

    Subclasses implement ``_fit_network(X, y_idx, concept_labels, ctx)``.
    """

    def __sklearn_clone__(self):
        # ``clone`` would turn a fitted skorch net into an unfitted one (new random weights):
        # the network to correct is data here, so a clone gets a deep copy with its weights.
        new = super().__sklearn_clone__()
        if _is_skorch_net(self.estimator) and getattr(self.estimator, "initialized_", False):
            new.estimator = copy.deepcopy(self.estimator)
        return new

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.non_deterministic = self.random_state is None
        return tags

    def _check_common(self):
        if not isinstance(self.layer, str):
            raise ValueError(f"layer must be a string naming a sub-module, got {self.layer!r}.")
        check_int("batch_size", self.batch_size)
        check_real("lr", self.lr, low=0, low_open=True)
        if not (isinstance(self.optimizer, type) and issubclass(self.optimizer, torch.optim.Optimizer)):
            raise ValueError(
                f"optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.SGD), "
                f"got {self.optimizer!r}.")
        if self.net_params is not None and not isinstance(self.net_params, dict):
            raise ValueError(f"net_params must be a dict of skorch arguments or None, got "
                             f"{self.net_params!r}.")
        resolve_device(self.device)

    def _prepare(self, X, y, concept_labels, require_concepts, pooling="max"):
        """Validate inputs, copy the network and fit the CAV. Returns a dict of context."""
        from .._torch import set_seed

        self._check_common()
        X, shape = _check_input(X)
        n = n_samples(X)
        if y is None:
            y = dataset_targets(X)
        y = check_y(y, n)
        concept_labels = check_concept_labels(concept_labels, n, required=require_concepts)
        self.input_shape_ = shape
        self._set_n_features_in(shape)
        set_seed(self.random_state)
        module = copy_network(self.estimator)
        device = resolve_device(self.device)
        module.to(device)
        find_layer(module, self.layer)
        before, out_shape, n_outputs = trace_layer(module, self.layer, first_batch(X))
        self.classes_ = network_classes(self.estimator, n_outputs)
        y_idx = encode_y(y, self.classes_)
        self.cav_, self.cav_estimator_, A, t = resolve_cav(
            self.cav, module, self.layer, X, concept_labels, out_shape, self.batch_size, device,
            pooling=pooling)
        return {"X": X, "y_idx": y_idx, "concept_labels": concept_labels, "module": module,
                "device": device, "before": before, "A": A, "t": t, "n_outputs": n_outputs}

    # ---------------------------------------------------------------- prediction
    def _check_X_predict(self, X):
        check_is_fitted(self, "estimator_")
        X, shape = _check_input(X)
        if self.input_shape_ is not None and shape is not None and shape != self.input_shape_:
            if len(shape) == 1 and len(self.input_shape_) == 1:
                raise ValueError(
                    f"X has {shape[0]} features, but {type(self).__name__} is expecting "
                    f"{self.input_shape_[0]} features as input.")
            raise ValueError(
                f"X has per-sample shape {shape}, but {type(self).__name__} was fitted on "
                f"{self.input_shape_}.")
        return X

    def predict_proba(self, X):
        """Class probabilities of the corrected network (softmax of its logits).

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor or Dataset

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes), float32
        """
        X = self._check_X_predict(X)
        return np.asarray(self.estimator_.predict_proba(training_data(X)), dtype=np.float32)

    def predict(self, X):
        """Class labels predicted by the corrected network.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor or Dataset

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
        """
        check_is_fitted(self, "estimator_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    @property
    def module_(self):
        """The corrected :class:`torch.nn.Module` (``estimator_.module_``)."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.module_

    @property
    def history_(self):
        """The skorch training history of the corrected network."""
        check_is_fitted(self, "estimator_")
        return self.estimator_.history
