"""RR-ClArC: fine-tuning with a penalty on the model's gradient along a CAV.

Pahde et al. 2023 (arXiv 2308.09437): the loss is ``CE + penalty * L_RR`` where
``L_RR`` measures, at a layer, the component of the gradient of a target
output along the concept direction ``v`` (the CAV). Driving it to zero makes
the prediction insensitive to the concept ("right for the right reasons").
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from .._utils._data import dataset_targets, n_samples, take, training_data
from .._utils._modules import find_layer, predict_proba, to_logits
from .._utils._validation import (
    UNLABELLED,
    check_choice,
    check_int,
    check_real,
    check_y,
    encode_y,
)
from ..base import HookedLossMixin, atomic_fit
from ._base import _CAVCorrector, _CorrectionNet, build_net, resolve_cav, resolve_train_layers

__all__ = ["GradientPenaltyCorrector", "gradient_penalty", "GRADIENT_TARGETS", "AGGREGATIONS",
           "CAV_SAMPLES", "linear_layer_prefixes"]

#: What is differentiated: random-sign sum of the logits (fresh signs every step),
#: the true-class logit, the largest logit, or the sum of all logits.
GRADIENT_TARGETS = ("all_random", "target", "max", "all")
#: How the gradient along the CAV is turned into a scalar loss.
AGGREGATIONS = ("l2_mean", "l2", "l1_mean", "l1", "cosine_mean")
#: Which labelled samples fit the CAV: all of them, or only those the network predicts
#: correctly (the reference recipe of Pahde et al.).
CAV_SAMPLES = ("labelled", "correct")


def linear_layer_prefixes(module):
    """Parameter-name prefixes of every :class:`torch.nn.Linear` layer of ``module``.

    The RR-ClArC reference recipe fine-tunes every Linear layer and freezes the
    rest (convolutions, BatchNorm), also the Linear layers before a Linear CAV
    layer; ``train_layers="linear"`` uses these prefixes.

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    prefixes : list of str
        ``"<name>."`` for each Linear layer that has parameters, in module order.

    Examples
    --------
    >>> from skdebias.correction._rrclarc import linear_layer_prefixes
    >>> from skdebias.models import SmallCNN
    >>> linear_layer_prefixes(SmallCNN())
    ['classifier.0.', 'classifier.2.']
    """
    return [f"{name}." for name, mod in module.named_modules()
            if isinstance(mod, torch.nn.Linear) and any(True for _ in mod.parameters())]


def _target_scalar(outputs, y, gradient_target, generator):
    if gradient_target == "all_random":
        signs = torch.randint(0, 2, tuple(outputs.shape), generator=generator,
                              device=generator.device if generator is not None else "cpu")
        signs = (2 * signs - 1).to(device=outputs.device, dtype=outputs.dtype)
        return (signs * outputs).sum(dim=1)
    if gradient_target == "target":
        if y is None:
            raise ValueError("gradient_target='target' needs the class labels y.")
        y = torch.as_tensor(y, device=outputs.device).long().reshape(-1, 1)
        return outputs.gather(1, y)[:, 0]
    if gradient_target == "max":
        return outputs.max(dim=1).values
    return outputs.sum(dim=1)


def gradient_penalty(activations, outputs, cav, y=None, gradient_target="all_random",
                     aggregation="l2_mean", create_graph=True, generator=None):
    """The RR-ClArC loss ``L_RR`` of one batch.

    With ``g_b = d target_b / d a_b`` (``a`` the activations at the layer,
    ``(B, C, H, W)`` or ``(B, C)``) and the unit CAV ``v``:

    - ``"l2_mean"``: ``mean_b (v . mean_hw g_b)^2``;
    - ``"l2"``: ``mean_{b,h,w} (v . g_{b,:,h,w})^2``;
    - ``"l1_mean"`` / ``"l1"``: the same with ``|.|`` instead of the square;
    - ``"cosine_mean"``: ``mean_b cos(v, mean_hw g_b)^2`` (scale-free).

    Target per sample: ``"all_random"`` ``sum_k s_k f_k(x)`` with random signs
    ``s_k`` in {-1, +1} (drawn from ``generator``); ``"target"`` ``f_y(x)``;
    ``"max"`` ``max_k f_k(x)``; ``"all"`` ``sum_k f_k(x)``.

    Parameters
    ----------
    activations : torch.Tensor of shape (B, C, ...)
        Layer output that ``outputs`` was computed from (part of the graph).
    outputs : torch.Tensor of shape (B, K)
        Logits.
    cav : array-like or torch.Tensor of shape (C,)
        Concept direction; normalised to unit length here.
    y : torch.Tensor or array-like of shape (B,), optional
        Class indices, needed for ``gradient_target="target"``.
    gradient_target : {"all_random", "target", "max", "all"}, default="all_random"
    aggregation : {"l2_mean", "l2", "l1_mean", "l1", "cosine_mean"}, default="l2_mean"
    create_graph : bool, default=True
        Keep the graph of the gradient so the loss can be back-propagated
        (needed for training).
    generator : torch.Generator, optional
        Source of the random signs of ``"all_random"``.

    Returns
    -------
    loss : torch.Tensor
        A scalar.

    Examples
    --------
    >>> import torch
    >>> from skdebias.correction import gradient_penalty
    >>> a = torch.tensor([[1.0, 2.0]], requires_grad=True)
    >>> W = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    >>> out = a @ W.T
    >>> float(gradient_penalty(a, out, [1.0, 0.0], y=[0], gradient_target="target"))
    9.0
    """
    check_choice("gradient_target", gradient_target, GRADIENT_TARGETS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    if outputs.ndim != 2:
        raise ValueError(f"outputs must be logits of shape (B, K), got shape {tuple(outputs.shape)}.")
    if not activations.requires_grad:
        raise ValueError(
            "activations are not part of an autograd graph; capture them with gradients enabled "
            "(e.g. skdebias._torch.capture_output(layer, detach=False, requires_grad=True)).")
    target = _target_scalar(outputs, y, gradient_target, generator)
    (g,) = torch.autograd.grad(target.sum(), activations, create_graph=create_graph,
                               retain_graph=True, allow_unused=True)
    if g is None:
        raise ValueError("The network outputs do not depend on the activations of the layer.")
    v = torch.as_tensor(np.asarray(cav) if not isinstance(cav, torch.Tensor) else cav)
    v = v.to(device=g.device, dtype=g.dtype).reshape(-1)
    if v.shape[0] != g.shape[1]:
        raise ValueError(f"cav has {v.shape[0]} dimensions, the activations {g.shape[1]} channels.")
    v = v / v.norm()
    flat = g.reshape(g.shape[0], g.shape[1], -1)  # (B, C, P); P = 1 without spatial axes
    if aggregation.endswith("_mean"):
        g_mean = flat.mean(dim=2)
        proj = g_mean @ v
        if aggregation == "l2_mean":
            return (proj ** 2).mean()
        if aggregation == "l1_mean":
            return proj.abs().mean()
        cos = proj / g_mean.norm(dim=1).clamp_min(torch.finfo(g.dtype).tiny ** 0.5)
        return (cos ** 2).mean()
    proj = torch.einsum("bcp,c->bp", flat, v)
    if aggregation == "l2":
        return (proj ** 2).mean()
    return proj.abs().mean()


class _RRNet(HookedLossMixin, _CorrectionNet):
    """skorch classifier whose loss is ``CE + rr_penalty * L_RR`` at ``rr_layer``.

    The activations are captured by a forward hook during the same forward
    pass (no second forward); validation batches compute the penalty too
    (gradients enabled), logged as ``valid_rr`` (training: ``train_rr``).
    """

    hooked_term_names = ("rr",)
    # L_RR differentiates the logits w.r.t. the activations: they need a graph even when every
    # layer before them is frozen, and validation needs gradients (reference: Lightning)
    hooked_requires_grad = True
    hooked_grad_in_validation = True
    _rr_state = ("_rr_generators", "_rr_seed_value", "_rr_cav_cache", "_rr_layer_cache")

    def __init__(self, module, *args, rr_layer=None, rr_cav=None, rr_penalty=1.0,
                 rr_gradient_target="all_random", rr_aggregation="l2_mean", rr_seed=None,
                 **kwargs):
        super().__init__(module, *args, **kwargs)
        self.rr_layer = rr_layer
        self.rr_cav = rr_cav
        self.rr_penalty = rr_penalty
        self.rr_gradient_target = rr_gradient_target
        self.rr_aggregation = rr_aggregation
        self.rr_seed = rr_seed

    def _generator(self, device):
        """The source of the random signs of ``"all_random"``, one per device, created on it
        (signs drawn where the logits are: no host-to-device copy, no synchronisation)."""
        device = torch.device(device)
        gens = self.__dict__.setdefault("_rr_generators", {})
        gen = gens.get(str(device))
        if gen is None:
            seed = getattr(self, "_rr_seed_value", None)
            if seed is None:
                seed = self.rr_seed if self.rr_seed is not None else \
                    int(np.random.randint(2**31 - 1))
                self._rr_seed_value = int(seed)
            gen = torch.Generator(device=device).manual_seed(int(seed))
            gens[str(device)] = gen
        return gen

    def _cav_tensor(self, device, dtype):
        """The unit CAV as a tensor on ``device``, built once per (device, dtype) and ``rr_cav``."""
        cache = self.__dict__.setdefault("_rr_cav_cache", {})
        key = (str(device), dtype, id(self.rr_cav))
        v = cache.get(key)
        if v is None:
            cache.clear()
            v = torch.as_tensor(np.asarray(self.rr_cav), dtype=torch.float64).reshape(-1)
            v = (v / v.norm()).to(device=device, dtype=dtype)
            cache[key] = v
        return v

    def _layer_module(self):
        cached = self.__dict__.get("_rr_layer_cache")
        if cached is not None and cached[0] is self.module_ and cached[1] == self.rr_layer:
            return cached[2]
        layer = find_layer(self.module_, self.rr_layer)
        self._rr_layer_cache = (self.module_, self.rr_layer, layer)
        return layer

    def hooked_layer(self):
        return self._layer_module(), False

    def hooked_terms(self, activations, y_pred, y_true, X, training):
        weight = float(self.rr_penalty)
        y_pred = to_logits(y_pred, self.output_space)  # the penalty differentiates logits
        y_idx = None if y_true is None else torch.as_tensor(y_true).to(y_pred.device)
        rr = gradient_penalty(activations, y_pred,
                              self._cav_tensor(activations.device, activations.dtype), y=y_idx,
                              gradient_target=self.rr_gradient_target,
                              aggregation=self.rr_aggregation,
                              create_graph=training and weight > 0,
                              generator=self._generator(y_pred.device))
        return {"rr": (weight, rr)}

    def _get_param_names(self):
        return [k for k in super()._get_param_names() if k not in self._rr_state]

    def __getstate__(self):
        state = super().__getstate__()
        for key in ("_rr_cav_cache", "_rr_layer_cache"):
            state.pop(key, None)
        # keep the CPU generator (the random signs go on where they stopped); device
        # generators are recreated from the seed where the copy is used
        gens = state.get("_rr_generators")
        if gens:
            state["_rr_generators"] = {k: g for k, g in gens.items() if k == "cpu"}
        return state


class GradientPenaltyCorrector(_CAVCorrector):
    """RR-ClArC: fine-tune a copy of a network so its outputs ignore a concept direction.

    ``fit`` deep-copies the network (the caller's is never touched), fits the
    CAV on the spatially max-pooled activations at ``layer`` of the samples
    with concept labels, then fine-tunes with ``CE + penalty * L_RR`` (see
    :func:`gradient_penalty`) through skorch, so skorch callbacks, history,
    device handling and ``warm_start`` work. The activations are captured by a
    forward hook in the same forward pass as the logits.

    Parameters
    ----------
    estimator : torch.nn.Module or skorch.NeuralNet
        The network to correct; it must output logits ``(n, n_classes)``.
    layer : str
        Name of the layer (``dict(module.named_modules())``) where the CAV lives.
    cav : CAVEstimator, array-like of shape (n_channels,) or None, default=None
        A :class:`~skdebias.CAVEstimator` (cloned and fitted on the labelled
        samples; ``None`` means ``CAVEstimator(method="pattern")``) or a fixed
        direction (then ``concept_labels`` are optional).
    penalty : float >= 0, default=1.0
        Weight ``lambda`` of ``L_RR``. The reference sweeps decades (1e-2 .. 1e7).
    gradient_target : {"all_random", "target", "max", "all"}, default="all_random"
    aggregation : {"l2_mean", "l2", "l1_mean", "l1", "cosine_mean"}, default="l2_mean"
    train_layers : "after", "linear", "all" or list of str, default="after"
        ``"after"``: everything up to and including ``layer`` is frozen (and in
        eval mode: BatchNorm statistics and dropout fixed), the layers after it
        train. ``"linear"``: every :class:`torch.nn.Linear` layer trains and
        everything else is frozen in eval mode, also Linear layers before or at
        ``layer`` (the reference recipe; differs from ``"after"`` when
        ``layer`` is, or follows, a Linear layer). ``"all"``: everything
        trains. A list: the parameters whose names start with one of these
        prefixes train.
    max_epochs : int >= 0, default=5
    lr : float, default=1e-4
        Learning rate (reference recipe: SGD, momentum 0.9, lr 1e-4; small
        networks may need a larger one for an effect within few epochs).
    batch_size : int, default=64
    optimizer : torch.optim.Optimizer class or None, default=None
        ``None``: a skorch ``estimator``'s own optimizer with its settings, else
        SGD. A given SGD, or the SGD used for a plain module, has momentum 0.9
        unless ``net_params`` sets ``optimizer__momentum`` (the reference recipe).
    callbacks : list of skorch callbacks or None, default=None
        Copied into the training net at every fit, after the callbacks of a
        skorch ``estimator`` (which are kept, as are its criterion and its
        criterion settings).
    validation_fraction : float in [0, 1), default=0.0
        Share of ``X`` held out (at random, seeded by ``random_state``) as a
        validation split; the penalty is logged there as ``valid_rr``. ``0``
        trains on all of ``X``.
    warm_start : bool, default=False
        If True, a second ``fit`` continues training the corrected network
        instead of starting again from ``estimator``. It keeps the CAV, layer,
        ``train_layers``, batch size and callbacks of the first fit; ``penalty``,
        ``gradient_target``, ``aggregation``, ``max_epochs`` and ``lr`` take
        their current values.
    net_params : dict or None, default=None
        Further arguments of the skorch ``NeuralNetClassifier`` (e.g.
        ``{"optimizer__weight_decay": 1e-4, "iterator_train__num_workers": 2}``);
        they win over the settings taken from a skorch ``estimator``.
    output : {"auto", "logits", "probabilities", "log_probabilities"}, default="auto"
        What the network outputs. ``"auto"`` detects it on the first rows
        (rows of non-negative values summing to 1 are probabilities, e.g. a
        module ending in ``Softmax`` as skorch's defaults build it). The loss,
        the penalty (on logits, ``log p`` for probabilities) and
        ``predict_proba`` work in the right space either way.
    max_grad_norm : float or None, default=100.0
        Gradient-norm clipping at every step (the reference recipe clips at
        100); ``None`` turns it off. A run whose loss or weights go non-finite,
        or whose predictions collapse to one class, stops with a
        :class:`~skdebias.exceptions.DivergenceError` naming ``lr``,
        ``penalty`` and ``max_grad_norm``.
    device : str, default="auto"
    num_workers : int, default=0
        DataLoader worker processes that read a Dataset input (0: read in this
        process); arrays and tensors are sliced per batch. See docs/parameters.md.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        Arithmetic of the network's forward and backward passes, the penalty's double
        backward included (torch autocast); ``"float16"`` needs CUDA and trains with loss
        scaling. Results are returned in float32. On a small CNN, bfloat16 kept accuracy
        within 0.05 and the concept sensitivity within 25 % of float32 (docs/performance.md).
    random_state : int, RandomState or None, default=None
        Seeds torch before training (shuffling) and the random signs.
    verbose : int, default=0
        skorch's per-epoch log.
    cav_samples : {"labelled", "correct"}, default="labelled"
        Samples that fit the CAV: every sample with a concept label, or only
        those the network (before correction) predicts correctly, as the
        reference recipe does. Ignored when ``cav`` is a vector.

    Attributes
    ----------
    estimator_ : skorch.NeuralNetClassifier
        The corrected network (``estimator_.module_`` is a plain ``nn.Module``).
    module_ : torch.nn.Module
        ``estimator_.module_``.
    cav_ : ndarray of shape (n_channels,), float32
        Unit CAV used for the penalty.
    cav_estimator_ : CAVEstimator or None
        The fitted CAV estimator (``None`` when ``cav`` was a vector).
    classes_ : ndarray
        Class labels in output order (a fitted skorch classifier's ``classes_``,
        else ``0 .. n_outputs-1``).
    trainable_params_ : list of str
        Names of the fine-tuned parameters.
    measure_layer_ : str
        Layer of ``module_`` whose output is the activation the CAV lives in.
    history_ : skorch History
        Includes ``train_rr`` (and ``valid_rr``) per epoch.
    n_features_in_ : int
        Only for 2-d input ``(n_samples, n_features)``.

    See Also
    --------
    ClassArtifactCompensator : A-/P-ClArC.
    skdebias.metrics.concept_sensitivity : The quantity RR-ClArC drives to zero.

    Examples
    --------
    >>> import numpy as np
    >>> from skdebias.correction import GradientPenaltyCorrector
    >>> from skdebias.models import SmallCNN
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(40, 3, 28, 28).astype("float32")
    >>> y, c = rng.randint(0, 10, 40), np.arange(40) % 2
    >>> rr = GradientPenaltyCorrector(SmallCNN(), layer="features.6", penalty=10.0,
    ...                               max_epochs=1, device="cpu", random_state=0)
    >>> rr.fit(X, y, concept_labels=c).predict(X).shape
    (40,)
    """

    def __init__(self, estimator, layer, cav=None, penalty=1.0, gradient_target="all_random",
                 aggregation="l2_mean", train_layers="after", max_epochs=5, lr=1e-4,
                 batch_size=64, optimizer=None, callbacks=None, validation_fraction=0.0,
                 warm_start=False, net_params=None, output="auto", max_grad_norm=100.0,
                 device="auto", precision="float32", random_state=None, verbose=0,
                 num_workers=0, cav_samples="labelled"):
        super().__init__(estimator, layer, cav, train_layers, max_epochs, lr, batch_size,
                         optimizer, callbacks, validation_fraction, net_params, output,
                         max_grad_norm, device, random_state, verbose, precision, num_workers)
        self.penalty = penalty
        self.gradient_target = gradient_target
        self.aggregation = aggregation
        self.warm_start = warm_start
        self.cav_samples = cav_samples

    def _check_params(self):
        check_real("penalty", self.penalty, low=0)
        check_choice("gradient_target", self.gradient_target, GRADIENT_TARGETS)
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        check_int("max_epochs", self.max_epochs, low=0)
        check_choice("cav_samples", self.cav_samples, CAV_SAMPLES)

    @atomic_fit
    def fit(self, X, y, concept_labels=None):
        """Fit the CAV and fine-tune a copy of the network with ``CE + penalty * L_RR``.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor or Dataset
        y : array-like of shape (n_samples,)
            Class labels (among the network's classes).
        concept_labels : array-like of shape (n_samples,), optional
            1 where the concept (artifact) is present, 0 where it is absent,
            -1 for samples that do not take part in fitting the CAV (e.g. other
            classes). Required unless ``cav`` is a vector.

        Returns
        -------
        self : GradientPenaltyCorrector
        """
        self._check_params()
        if self.warm_start and hasattr(self, "estimator_"):
            return self._continue(X, y)
        vector_cav = self.cav is not None and not hasattr(self.cav, "fit")
        ctx = self._prepare(X, y, concept_labels, require_concepts=not vector_cav)
        module = ctx["module"]
        if self.cav_samples == "correct" and not vector_cav:
            self._refit_cav_on_correct(ctx)
        train_layers = self.train_layers
        if isinstance(train_layers, str) and train_layers == "linear":
            train_layers = linear_layer_prefixes(module)
            if not train_layers:
                raise ValueError("train_layers='linear' but the network has no torch.nn.Linear "
                                 "layer; use 'after' or a list of parameter-name prefixes.")
        trainable, eval_modules = resolve_train_layers(module, self.layer, train_layers,
                                                       ctx["before"])
        if not trainable and self.max_epochs > 0:
            raise ValueError(
                f"train_layers={self.train_layers!r} leaves no parameter to train for layer "
                f"{self.layer!r}; choose an earlier layer or train_layers='all'.")
        seed = None
        if self.random_state is not None:
            seed = int(check_random_state(self.random_state).randint(2**31 - 1)) ^ 0x5EED
        net = build_net(_RRNet, module, self, self.max_epochs, extra=dict(
            eval_modules=eval_modules, rr_layer=self.layer, rr_cav=self.cav_,
            rr_penalty=float(self.penalty), rr_gradient_target=self.gradient_target,
            rr_aggregation=self.aggregation, rr_seed=seed))
        if self.max_epochs > 0:
            net.fit(training_data(ctx["X"], ctx["y_idx"]), ctx["y_idx"])
        else:
            net.initialize()
        self.estimator_ = net
        self.trainable_params_ = trainable
        self.measure_layer_ = self.layer
        return self

    def _refit_cav_on_correct(self, ctx):
        """Fit the CAV again on the labelled samples that the network predicts correctly."""
        c = ctx["concept_labels"].copy()
        idx = np.flatnonzero(c != UNLABELLED)
        proba = predict_proba(ctx["module"], take(ctx["X"], idx),
                              batch_size=max(int(self.batch_size), 256), output=self.output_)
        c[idx[proba.argmax(axis=1) != ctx["y_idx"][idx]]] = UNLABELLED
        kept = c[c != UNLABELLED]
        if (kept == 1).sum() == 0 or (kept == 0).sum() == 0:
            raise ValueError(
                f"cav_samples='correct' keeps {int((kept == 1).sum())} concept and "
                f"{int((kept == 0).sum())} non-concept samples that the network predicts "
                "correctly; the CAV needs both. Use cav_samples='labelled'.")
        self.cav_, self.cav_estimator_, ctx["A"], ctx["t"] = resolve_cav(
            self.cav, ctx["module"], self.layer, ctx["X"], c, (self.cav_.shape[0],),
            self.batch_size, ctx["device"], precision=self.precision)

    def _continue(self, X, y):
        check_is_fitted(self, "estimator_")
        X = self._validate_X(X, reset=False)
        if y is None:  # a Dataset of (x, y) items, as in the first fit
            y = dataset_targets(X)
        y_idx = encode_y(check_y(y, n_samples(X)), self.classes_)
        net = self.estimator_
        net.set_params(rr_penalty=float(self.penalty), rr_gradient_target=self.gradient_target,
                       rr_aggregation=self.aggregation, max_epochs=self.max_epochs, lr=self.lr)
        net.partial_fit(training_data(X, y_idx), y_idx)
        return self
