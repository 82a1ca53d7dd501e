"""A-ClArC and P-ClArC: class artifact compensation along a CAV.

Anders et al. 2022 (ClArC) with the CAV of Pahde et al. 2023. With
``mu_clean = mean v . maxpool(a)`` over samples without the artifact and
``mu_art`` over samples with it:

- P-ClArC (projective) inserts ``a' = a + (mu_clean - v . maxpool(a)) v`` at the
  layer: every sample is moved to the clean reference along the CAV, so the
  artifact component no longer reaches the layers after it;
- A-ClArC (augmentative) applies the same shift towards ``mu_art`` while it
  fine-tunes the layers after the CAV layer (the network learns to ignore the
  direction), then removes the shift.

With ``pooling="flatten"`` the CAV lives in the space of the whole activation
map (``C x H x W``, as in Anders et al.) and ``maxpool(a)`` above is replaced by
the flattened ``a``: the compensation then acts where the artifact is, not
uniformly over the map (suited to artifacts at a fixed position).
"""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch
from torch import nn

from .._utils._data import take, training_data
from .._utils._modules import find_layer, get_module, predict_proba, replace_module
from .._utils._validation import check_choice, check_int
from ..base import atomic_fit
from ..exceptions import CleanAccuracyWarning
from ..extraction import POOLINGS, pool_activations
from ._base import _CAVCorrector, _CorrectionNet, build_net, resolve_train_layers

__all__ = ["ClassArtifactCompensator", "ConceptCompensation", "CompensatedLayer", "CLARC_MODES",
           "CLARC_POOLINGS"]

CLARC_MODES = ("projective", "augmentative")
#: How activation maps are turned into the vectors the CAV lives in: the extractor's poolings
#: less ``None`` (a CAV needs one vector per sample).
CLARC_POOLINGS = tuple(p for p in POOLINGS if p is not None)


class ConceptCompensation(nn.Module):
    """Move activations to a reference value along a direction.

    With ``pooling="max"``: ``a + (r - v . maxpool(a)) v``, the same shift at
    every spatial position, so after it ``v . maxpool(a') = r`` for a unit
    ``v`` of one entry per channel (``"mean"``: the same with the spatial
    mean). With ``pooling="flatten"``: ``v`` has one entry per activation
    (``C x H x W``) and ``a' = a + (r - v . vec(a)) v`` (reshaped), the
    projection of Anders et al. ``v`` and ``r`` are buffers: they
    travel with ``state_dict``, ``torch.save`` and ``.to(device)``.

    Parameters
    ----------
    cav : array-like of shape (C,) or (C * H * W,)
        Direction; normalised to unit length.
    reference : float
        Target value of ``v . maxpool(a)`` (or ``v . vec(a)``).
    pooling : {"max", "mean", "flatten"}, default="max"

    Examples
    --------
    >>> import torch
    >>> from skdebias.correction import ConceptCompensation
    >>> comp = ConceptCompensation([1.0, 0.0], reference=0.5)
    >>> a = torch.tensor([[[[3.0, 1.0]], [[2.0, 2.0]]]])  # (1, 2, 1, 2)
    >>> comp(a)[0, :, 0].tolist()
    [[0.5, -1.5], [2.0, 2.0]]
    >>> flat = ConceptCompensation([1.0, 0.0, 0.0, 0.0], reference=0.5, pooling="flatten")
    >>> flat(a)[0, :, 0].tolist()
    [[0.5, 1.0], [2.0, 2.0]]
    """

    def __init__(self, cav, reference=0.0, pooling="max"):
        super().__init__()
        check_choice("pooling", pooling, CLARC_POOLINGS)
        v = torch.as_tensor(np.asarray(cav, dtype=np.float32)).reshape(-1)
        self.register_buffer("cav", v / v.norm())
        self.register_buffer("reference", torch.tensor(float(reference), dtype=torch.float32))
        self.pooling = pooling

    def forward(self, a):
        if self.pooling == "flatten":
            return self._flat(a)
        if not isinstance(a, torch.Tensor) or a.ndim < 2 or a.shape[1] != self.cav.shape[0]:
            raise ValueError(
                f"ConceptCompensation expects activations (B, {self.cav.shape[0]}, ...), got "
                f"{tuple(getattr(a, 'shape', ()))}.")
        v = self.cav.to(a.dtype)
        pooled = pool_activations(a, self.pooling)  # (B, C)
        shift = self.reference.to(a.dtype) - pooled @ v  # (B,)
        extra = (1,) * (a.ndim - 2)
        return a + shift.reshape(-1, 1, *extra) * v.reshape(1, -1, *extra)

    def _flat(self, a):
        if not isinstance(a, torch.Tensor) or a.ndim < 2 or a[0].numel() != self.cav.shape[0]:
            raise ValueError(
                f"ConceptCompensation(pooling='flatten') expects activations with "
                f"{self.cav.shape[0]} values per sample (the map it was fitted on), got shape "
                f"{tuple(getattr(a, 'shape', ()))}; a different input size changes the map.")
        v = self.cav.to(a.dtype)
        shift = self.reference.to(a.dtype) - a.reshape(a.shape[0], -1) @ v  # (B,)
        return a + shift.reshape(-1, *(1,) * (a.ndim - 1)) * v.reshape(1, *a.shape[1:])

    def extra_repr(self):
        return (f"dims={self.cav.shape[0]}, reference={float(self.reference):.4g}, "
                f"pooling={self.pooling!r}")


class CompensatedLayer(nn.Module):
    """``compensation(layer(x))``: a layer followed by a :class:`ConceptCompensation`.

    The original layer keeps its parameters under ``<name>.layer``; its
    uncompensated output is the output of that sub-module.

    Parameters
    ----------
    layer : torch.nn.Module
        The layer of the network whose output is compensated.
    compensation : ConceptCompensation
        Applied to the layer's output.
    """

    def __init__(self, layer, compensation):
        super().__init__()
        self.layer = layer
        self.compensation = compensation

    def forward(self, *args, **kwargs):
        return self.compensation(self.layer(*args, **kwargs))


class ClassArtifactCompensator(_CAVCorrector):
    """A-/P-ClArC: compensate a concept (artifact) direction at a layer of a copy of a network.

    ``mode="projective"`` (P-ClArC) replaces ``layer`` in a deep copy of the
    network by ``CompensatedLayer(layer, ConceptCompensation(cav, mu_clean))``:
    every sample is moved to the clean reference along the CAV. With
    ``max_epochs > 0`` the layers after it are also fine-tuned with the
    compensation in place.

    ``mode="augmentative"`` (A-ClArC) inserts the shift towards the artifact
    reference ``mu_art``, fine-tunes the layers after the CAV layer for
    ``max_epochs`` (>= 1) with cross-entropy, then removes the shift: the result
    is the original architecture with new weights.

    The corrected network is an ordinary ``nn.Module`` (no hooks): it survives
    ``pickle``, ``copy.deepcopy``, ``torch.save``/``torch.load`` and skorch
    ``save_params``/``load_params``.

    Parameters
    ----------
    estimator : torch.nn.Module or skorch.NeuralNet
        The network; it must output logits.
    layer : str
        Layer where the compensation is inserted.
    cav : CAVEstimator, array-like of shape (n_channels,) (``(n_channels * H * W,)`` with
        ``pooling="flatten"``) or None, default=None
        As in :class:`GradientPenaltyCorrector`.
    mode : {"projective", "augmentative"}, default="projective"
    max_epochs : int >= 0, default=0
        Fine-tuning epochs (``"augmentative"`` needs at least 1).
    reference : float or None, default=None
        Reference value of ``v . maxpool(a)``; ``None`` takes ``mu_clean``
        (projective) or ``mu_art`` (augmentative) from the labelled samples,
        which then need concept labels of both kinds.
    pooling : {"max", "mean", "flatten"}, default="max"
        The space the CAV is fitted and applied in: spatially max- or
        mean-pooled activations (one value per channel, any input size) or the flattened
        activation map (``C x H x W`` values, the input size fitted on). For an
        artifact at a fixed position (a timestamp, a ruler in one corner),
        ``"flatten"`` moves only the activations where the artifact is: on the
        timestamp benchmark P-ClArC left 0.6 / 2.0 / 1.3 points between clean
        and attacked accuracy over seeds 0-2, against 1.9 / 7.0 / 13.3 with
        ``"max"`` (docs/correction.md).
    lr, batch_size, optimizer, train_layers, callbacks, validation_fraction, net_params, output,
    max_grad_norm, device, precision, random_state, verbose, num_workers
        Fine-tuning settings, as in :class:`GradientPenaltyCorrector`.

    Attributes
    ----------
    estimator_ : skorch.NeuralNetClassifier
        The corrected network.
    module_ : torch.nn.Module
        ``estimator_.module_``.
    cav_ : ndarray of shape (n_channels,) or (n_channels * H * W,)
        Unit CAV, in the space ``pooling`` names.
    cav_estimator_ : CAVEstimator or None
    mu_clean_, mu_artifact_ : float or None
        Mean ``v . maxpool(a)`` (or ``v . vec(a)``) of the labelled samples
        without / with the concept (``None`` without concept labels).
    reference_ : float
        The value the compensation moves to.
    measure_layer_ : str
        Layer of ``module_`` whose output is the uncompensated activation at
        ``layer`` (``"<layer>.layer"`` in projective mode): concept sensitivity
        measured there shows the effect of the compensation.
    classes_ : ndarray
    trainable_params_ : list of str
    clean_accuracy_change_ : float or None
        Projective mode: accuracy with minus without the compensation on up to 512 training
        samples not labelled with the concept (a drop of more than 0.05 warns with a
        :class:`~skdebias.exceptions.CleanAccuracyWarning`); ``None`` in augmentative mode.

    See Also
    --------
    GradientPenaltyCorrector : RR-ClArC.

    Examples
    --------
    P-ClArC with the concept direction of 20 images with the artifact against
    20 without it:

    >>> import numpy as np
    >>> from skdebias.correction import ClassArtifactCompensator
    >>> from skdebias.models import SmallCNN
    >>> images = np.random.RandomState(0).rand(40, 3, 28, 28).astype("float32")
    >>> artifact = np.repeat([0, 1], 20)
    >>> pclarc = ClassArtifactCompensator(SmallCNN(), layer="features.6", device="cpu")
    >>> pclarc.fit(images, np.arange(40) % 10, concept_labels=artifact).measure_layer_
    'features.6.layer'
    """

    def __init__(self, estimator, layer, cav=None, mode="projective", max_epochs=0,
                 reference=None, pooling="max", lr=1e-4, batch_size=64,
                 optimizer=None, train_layers="after", callbacks=None,
                 validation_fraction=0.0, net_params=None, output="auto", max_grad_norm=100.0,
                 device="auto", precision="float32", random_state=None, verbose=0,
                 num_workers=0):
        self.mode = mode
        self.reference = reference
        self.pooling = pooling
        super().__init__(estimator, layer, cav, train_layers, max_epochs, lr, batch_size,
                         optimizer, callbacks, validation_fraction, net_params, output,
                         max_grad_norm, device, random_state, verbose, precision, num_workers)

    def _check_params(self):
        check_choice("mode", self.mode, CLARC_MODES)
        check_choice("pooling", self.pooling, CLARC_POOLINGS)
        check_int("max_epochs", self.max_epochs, low=0)
        if self.mode == "augmentative" and self.max_epochs < 1:
            raise ValueError(
                "mode='augmentative' fine-tunes the layers after the CAV layer with the artifact "
                f"shift: set max_epochs >= 1 (got {self.max_epochs}).")
        if self.reference is not None and (
                not isinstance(self.reference, numbers.Real) or isinstance(self.reference, bool)
                or not np.isfinite(self.reference)):
            raise ValueError(f"reference must be a finite number or None, got {self.reference!r}.")

    @atomic_fit
    def fit(self, X, y, concept_labels=None):
        """Fit the CAV and the references, insert the compensation, fine-tune if asked.

        Parameters
        ----------
        X : array-like of shape (n_samples, C, H, W), tensor or Dataset
            Images for the CAV, the references and (``max_epochs > 0``) fine-tuning.
        y : array-like of shape (n_samples,)
        concept_labels : array-like of shape (n_samples,), optional
            1 / 0 for samples with / without the concept, -1 for samples not
            used for the CAV and the references. Required unless ``cav`` is a
            vector and ``reference`` is given.

        Returns
        -------
        self : ClassArtifactCompensator
        """
        self._check_params()
        vector_cav = self.cav is not None and not hasattr(self.cav, "fit")
        need = not (vector_cav and self.reference is not None)
        ctx = self._prepare(X, y, concept_labels, require_concepts=need, pooling=self.pooling)
        module, A, t = ctx["module"], ctx["A"], ctx["t"]
        self.mu_clean_ = self.mu_artifact_ = None
        if A is not None:
            proj = A.astype(np.float64) @ self.cav_.astype(np.float64)
            if np.any(t == 0):
                self.mu_clean_ = float(proj[t == 0].mean())
            if np.any(t == 1):
                self.mu_artifact_ = float(proj[t == 1].mean())
        if self.reference is not None:
            self.reference_ = float(self.reference)
        else:
            self.reference_ = self.mu_clean_ if self.mode == "projective" else self.mu_artifact_
        trainable, eval_modules = resolve_train_layers(module, self.layer, self.train_layers,
                                                       ctx["before"])
        if self.max_epochs > 0 and not trainable:
            raise ValueError(
                f"train_layers={self.train_layers!r} leaves no parameter to train for layer "
                f"{self.layer!r}; choose an earlier layer or train_layers='all'.")
        original = find_layer(module, self.layer)
        compensated = CompensatedLayer(
            original, ConceptCompensation(self.cav_, self.reference_, pooling=self.pooling))
        compensated.to(ctx["device"])
        replace_module(module, self.layer, compensated)
        eval_modules = [self._renamed(m) for m in eval_modules]
        net = build_net(_CorrectionNet, module, self, self.max_epochs,
                        extra=dict(eval_modules=eval_modules))
        if self.max_epochs > 0:
            net.fit(training_data(ctx["X"], ctx["y_idx"]), ctx["y_idx"])
        else:
            net.initialize()
        self.clean_accuracy_change_ = None
        if self.mode == "augmentative":
            replace_module(net.module_, self.layer, original)
            net.eval_modules = eval_modules_without_wrapper(eval_modules, self.layer)
            self.measure_layer_ = self.layer
        else:
            self.measure_layer_ = f"{self.layer}.layer"
            self._check_clean_accuracy(net.module_, ctx)
        self.trainable_params_ = [self._renamed(p) if self.mode == "projective" else p
                                  for p in trainable]
        self.estimator_ = net
        return self

    #: Training samples (without the concept) on which P-ClArC's accuracy cost is checked.
    clean_check_samples = 512

    def _check_clean_accuracy(self, module, ctx):
        """Warn when the compensation costs more than 5 points of accuracy on up to
        ``clean_check_samples`` training samples not labelled with the concept."""
        c = ctx["concept_labels"]
        idx = np.flatnonzero(c != 1) if c is not None else np.arange(len(ctx["y_idx"]))
        idx = idx[:self.clean_check_samples]
        if len(idx) == 0:
            return
        X, y = take(ctx["X"], idx), np.asarray(ctx["y_idx"])[idx]
        compensated = predict_proba(module, X, output=self.output_).argmax(1)
        # the caller's module (eval mode, its flags restored), not its skorch net: skorch's
        # predict_proba would leave it in eval mode
        plain = predict_proba(get_module(self.estimator), X, output=self.output_).argmax(1)
        before, after = float(np.mean(plain == y)), float(np.mean(compensated == y))
        self.clean_accuracy_change_ = after - before
        if before - after > 0.05:
            warnings.warn(
                f"P-ClArC at layer {self.layer!r} (pooling={self.pooling!r}) lowers the accuracy "
                f"on {len(idx)} training samples not labelled with the concept from {before:.3f} "
                f"to {after:.3f}: the shift moves images that do not show the artifact. Try "
                f"pooling='flatten' (a CAV over every activation, not one value per channel) or "
                f"another layer.", CleanAccuracyWarning, stacklevel=3)

    def _renamed(self, name):
        """Name of a module/parameter of the original network once the layer is wrapped."""
        if name == self.layer or name.startswith(self.layer + "."):
            return f"{self.layer}.layer{name[len(self.layer):]}"
        return name


def eval_modules_without_wrapper(eval_modules, layer):
    """Module names after the compensation is removed again (``<layer>.layer`` -> ``<layer>``)."""
    prefix = f"{layer}.layer"
    out = []
    for name in eval_modules:
        if name == prefix or name.startswith(prefix + "."):
            name = layer + name[len(prefix):]
        out.append(name)
    return out
