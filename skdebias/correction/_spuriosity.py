"""Low-spuriosity head fine-tuning (Moayeri et al., NeurIPS 2023).

Only the classification head (the last linear layer) of a copy of the network
is trained, on the ``k`` lowest-spuriosity training samples of each class,
until the spurious gap on validation data falls below a target. The features
entering the head do not change, so they are extracted once and training runs
on them directly (seconds on a CPU).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from sklearn.base import ClassifierMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from skorch.history import History

from .._utils._data import n_samples
from .._utils._hooks import layer_inputs
from .._utils._modules import network_classes, resolve_linear
from .._utils._runtime import limit_threads, progress_bar, set_seed
from .._utils._stats import gap_weights
from .._utils._validation import (
    check_choice,
    check_int,
    check_real,
    check_seed,
    check_y,
    encode_y,
)
from ..base import BaseNetworkEstimator, NetworkClassifierMixin, atomic_fit

__all__ = ["SpuriosityHeadFinetuner"]

_BASELINES = (None, "random")


def _cross_entropy_step(head, F, t):
    """Set the gradients of the mean cross-entropy of a linear ``head`` on ``(F, t)``.

    The closed form ``dL/dz = (softmax(z) - onehot(t)) / n`` avoids the autograd
    engine, whose per-call overhead dominates for a small head. Returns the loss.
    """
    with torch.no_grad():
        z = head(F)
        logp = torch.log_softmax(z, dim=1)
        rows = torch.arange(len(t), device=F.device)
        loss = -logp[rows, t].mean()
        dz = logp.exp()
        dz[rows, t] -= 1.0
        dz /= len(t)
        head.weight.grad = dz.T @ F
        if head.bias is not None:
            head.bias.grad = dz.sum(dim=0)
    return float(loss)


class SpuriosityHeadFinetuner(ClassifierMixin, NetworkClassifierMixin, BaseNetworkEstimator):
    """Fine-tune only the classification head on the least spurious samples of each class.

    1. The inputs of the head (penultimate features) are extracted for the
       training and validation data with a copy of the network.
    2. Each training sample gets a spuriosity, given in ``fit`` or computed by
       ``ranker`` (a :class:`~skdebias.SpuriosityRanker` on the head inputs).
    3. The ``k`` lowest-spuriosity training samples of each class are selected
       (``baseline="random"``: ``k`` random ones, for comparison).
    4. The head is trained on them with cross-entropy (Adam); after each epoch
       the spurious gap (:func:`~skdebias.metrics.spurious_gap` with ``val_k``)
       is measured on the validation data, and training stops as soon as it is
       below ``target_gap``. With ``max_accuracy_drop``, an epoch whose
       accuracy on the training data (the in-distribution accuracy) is more
       than that below the original head's is never kept; training goes on
       (a large first step often costs accuracy that later epochs win back).
    5. The head of the epoch with the lowest validation gap among those that
       respect the accuracy guard is kept (the original head if no epoch
       improves the gap); of epochs with the same gap (the gap moves in steps
       of ``1 / val_k``) the one with the highest validation accuracy, and of
       those the latest. On convergence it is the epoch that reached the
       target.

    The caller's network is never modified: ``estimator_`` is a copy.

    Parameters
    ----------
    estimator : torch.nn.Module or skorch.NeuralNet
        The trained network; its head must produce the network's output (logits).
    ranker : SpuriosityRanker or None, default=None
        Computes spuriosity from the head inputs when ``fit`` gets none; an
        unfitted ranker is cloned and fitted on the training head inputs.
    layer : str or None, default=None
        Name of the :class:`torch.nn.Linear` head to fine-tune (e.g.
        ``"classifier.2"``); ``None`` picks the last Linear layer.
    k : int, default=10
        Training samples per class to fine-tune on; must not exceed any class.
    target_gap : float, default=0.05
        Stop once the validation gap (a fraction, 0.05 = 5 points) is below it.
    baseline : {None, "random"}, default=None
        ``"random"``: fine-tune on ``k`` random samples per class instead (the
        comparison baseline of the paper).
    max_accuracy_drop : float in [0, 1] or None, default=0.02
        Accuracy guard: an epoch whose in-distribution accuracy (on all of
        ``X`` outside the internal validation split, in-distribution even when
        ``validation_data`` is unbiased) is more than this below the original
        network's (0.02 = 2 points) is never kept; training continues past it.
        ``None``: no guard.
    val_k : int, default=10
        ``k`` of the validation gap (clipped to the smallest validation class).
    validation_fraction : float in [0, 1), default=0.25
        Held-out (stratified) fraction of the training data used for the
        validation gap when ``fit`` gets no ``validation_data``. With ``0`` the
        training data itself is used.
    max_epochs : int, default=300
        Upper bound on passes over the selected samples.
    lr : float, default=1e-3
        Adam learning rate.
    weight_decay : float, default=0.0
    batch_size : int, default=64
        Batch size of feature extraction and of head training.
    device : str or torch.device, default="auto"
    num_workers : int, default=0
        DataLoader worker processes that read a Dataset input (0: read in this
        process); arrays and tensors are sliced per batch. See docs/parameters.md.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        Arithmetic of the network's forward passes that compute the last layer's inputs
        (torch autocast); ``"float16"`` needs CUDA. The head is trained in float32.
    random_state : int, RandomState instance or None, default=None
        Seeds the validation split, the random baseline and the training order.
    verbose : int, default=0
        0: silent; 1 or more: progress bars over the long steps (tqdm).

    Attributes
    ----------
    estimator_ : torch.nn.Module or skorch.NeuralNet
        The copy with the fine-tuned head.
    module_ : torch.nn.Module
        Its module.
    layer_ : str
        Name of the fine-tuned layer.
    ranker_ : SpuriosityRanker or None
        The ranker used (fitted), if any.
    classes_ : ndarray
        The network's classes in output order.
    selected_indices_ : ndarray of int
        Indices into ``X`` of the fine-tuning samples, class by class.
    validation_indices_ : ndarray of int or None
        Indices into ``X`` of the internal validation split (``None`` with
        ``validation_data`` given).
    gap_before_, gap_after_ : float
        Validation gap of the original and of the kept head.
    accuracy_before_, accuracy_after_ : float
        Validation accuracy of the original and of the kept head.
    train_accuracy_before_, train_accuracy_after_ : float
        Accuracy on the training data (the guarded accuracy) of the original
        and of the kept head.
    n_epochs_ : int
        Epochs run (0 if the gap was already below the target).
    best_epoch_ : int
        Epoch whose head is kept (0: the original head).
    converged_ : bool
        Whether the validation gap fell below ``target_gap``.
    stop_reason_ : str
        ``"target_gap"`` or ``"max_epochs"``.
    history_ : skorch.history.History
        A list with one dict per epoch: ``epoch``, ``loss``, ``val_gap``, ``val_accuracy``,
        ``train_accuracy``, ``admissible`` (whether it respects the accuracy
        guard).
    fit_time_ : float
        Wall time of :meth:`fit` in seconds.
    n_features_in_ : int
        Only for 2-d input.

    See Also
    --------
    skdebias.SpuriosityRanker, skdebias.propose_features, skdebias.metrics.spurious_gap

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias import SpuriosityRanker
    >>> from skdebias.correction import SpuriosityHeadFinetuner
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> rng = np.random.RandomState(0)
    >>> X, y = rng.randn(80, 4).astype("float32"), np.repeat([0, 1], 40)
    >>> ft = SpuriosityHeadFinetuner(net, ranker=SpuriosityRanker(spurious_features=[0]),
    ...                              k=5, max_epochs=3, random_state=0).fit(X, y)
    >>> ft.layer_, len(ft.selected_indices_), ft.predict(X[:3]).shape
    ('2', 10, (3,))
    """

    def __init__(self, estimator, ranker=None, layer=None, k=10, target_gap=0.05, baseline=None,
                 max_accuracy_drop=0.02, val_k=10, validation_fraction=0.25, max_epochs=300,
                 lr=1e-3, weight_decay=0.0, batch_size=64, device="auto", random_state=None,
                 verbose=0, precision="float32", num_workers=0):
        super().__init__(estimator, batch_size, device, verbose, precision=precision,
                         num_workers=num_workers)
        self.ranker = ranker
        self.layer = layer
        self.k = k
        self.target_gap = target_gap
        self.baseline = baseline
        self.max_accuracy_drop = max_accuracy_drop
        self.val_k = val_k
        self.validation_fraction = validation_fraction
        self.max_epochs = max_epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.random_state = random_state

    # ------------------------------------------------------------------ validation
    def _check_params(self):
        check_int("k", self.k)
        check_int("val_k", self.val_k)
        check_int("max_epochs", self.max_epochs)
        check_int("batch_size", self.batch_size)
        check_real("lr", self.lr, low=0, low_open=True)
        check_real("weight_decay", self.weight_decay, low=0)
        check_real("target_gap", self.target_gap, low=-1, high=1)
        check_real("validation_fraction", self.validation_fraction, low=0, high=1, high_open=True)
        check_choice("baseline", self.baseline, _BASELINES)
        check_seed("random_state", self.random_state)
        if self.max_accuracy_drop is not None:
            check_real("max_accuracy_drop", self.max_accuracy_drop, low=0, high=1)
        if self.ranker is not None and not hasattr(self.ranker, "score_samples"):
            raise ValueError(
                f"ranker must be a SpuriosityRanker (with score_samples(A, y)), got {self.ranker!r}.")

    # ------------------------------------------------------------------ features
    def _features(self, X, desc="head inputs", check_output=False):
        """Inputs of the head for ``X``: float32 tensor (n, d) on the CPU."""
        hint = ("SpuriosityHeadFinetuner trains the layer that produces the logits."
                if check_output else None)
        with self._autocast(self.device_):
            return layer_inputs(self.module_, self.layer_, X, self.batch_size, self.device_,
                                check_output=hint, verbose=self.verbose, desc=desc).float()

    def _spuriosity(self, F, y, given, name):
        if given is not None:
            s = np.asarray(given.detach().cpu() if isinstance(given, torch.Tensor) else given,
                           dtype=np.float64).ravel()
            if len(s) != len(y):
                raise ValueError(f"{name} has {len(s)} entries, expected one per sample ({len(y)}).")
            return s
        if self.ranker_ is None:
            raise ValueError(
                f"No {name}: pass fit(..., spuriosity=s) with one value per sample (and "
                "validation_data=(X_val, y_val, spuriosity_val)), or ranker=SpuriosityRanker(...).")
        return self.ranker_.score_samples(F.numpy(), y).astype(np.float64)

    def _select(self, y_idx, s, rng):
        chosen = []
        for c in np.unique(y_idx):
            idx = np.flatnonzero(y_idx == c)
            label = self.classes_[c].item() if hasattr(self.classes_[c], "item") else self.classes_[c]
            if self.k > len(idx):
                raise ValueError(
                    f"k={self.k} is larger than class {label!r}, which has {len(idx)} training "
                    f"samples; use k <= {len(idx)}.")
            if self.baseline == "random" or not np.all(np.isfinite(s[idx])):
                chosen.append(np.sort(rng.choice(idx, size=self.k, replace=False)))
            else:
                chosen.append(idx[np.argsort(s[idx], kind="stable")[:self.k]])
        return np.concatenate(chosen)

    @staticmethod
    def _gap_groups(y_idx, s, k):
        """Per scored class: its positions and the weights ``(highest k) - (lowest k)`` divided
        by ``k``, with ties shared as in ``spurious_gap``."""
        groups = []
        for c in np.unique(y_idx):
            idx = np.flatnonzero(y_idx == c)
            if not np.isfinite(s[idx]).all():
                continue
            groups.append((idx, gap_weights(s[idx], k) / k))
        return groups

    def _evaluate(self, head, F, y_idx, groups):
        with torch.no_grad():
            pred = head(F).argmax(dim=1).cpu().numpy()
        correct = pred == y_idx
        gap = float(np.mean([w @ correct[idx] for idx, w in groups])) if groups else float("nan")
        return gap, float(correct.mean())

    @staticmethod
    def _accuracy(head, F, t):
        with torch.no_grad():
            return float((head(F).argmax(dim=1) == t).float().mean())

    def _train(self, head, opt, F_sel, t_sel, F_val, yv_idx, groups, F_tr, t_tr, gen, epochs):
        """Train the head and record ``history_``.

        Stops once the validation gap is below target (``stop_reason_ =
        "target_gap"``); epochs that break the accuracy guard are recorded,
        never kept. Returns ``(epochs run, best epoch, its head state,
        its (val gap, val accuracy, train accuracy))``.
        """
        n_sel, bs = len(t_sel), int(self.batch_size)
        floor = (-np.inf if self.max_accuracy_drop is None
                 else self.train_accuracy_before_ - float(self.max_accuracy_drop) - 1e-12)
        best = (0, None, (self.gap_before_, self.accuracy_before_, self.train_accuracy_before_))
        epoch = 0
        for epoch in epochs:
            head.train()
            order = torch.randperm(n_sel, generator=gen).to(self.device_)
            total = 0.0
            for b in range(0, n_sel, bs):
                bi = order[b:b + bs]
                total += _cross_entropy_step(head, F_sel[bi], t_sel[bi]) * len(bi)
                opt.step()
            head.eval()
            gap, acc = self._evaluate(head, F_val, yv_idx, groups)
            tr_acc = self._accuracy(head, F_tr, t_tr)
            admissible = bool(tr_acc >= floor)
            self.history_.append({"epoch": epoch, "loss": total / n_sel, "val_gap": gap,
                                  "val_accuracy": acc, "train_accuracy": tr_acc,
                                  "admissible": admissible})
            if not admissible:  # the guard: never kept, but training goes on
                continue
            if (gap < self.target_gap or gap < best[2][0] or not np.isfinite(gap)
                    or (gap == best[2][0] and acc >= best[2][1] and best[1] is not None)):
                state = {k: v.detach().clone() for k, v in head.state_dict().items()}
                best = (epoch, state, (gap, acc, tr_acc))
            if gap < self.target_gap:
                self.converged_ = True
                self.stop_reason_ = "target_gap"
                break
        return epoch, best

    # ------------------------------------------------------------------ fit
    @atomic_fit
    def fit(self, X, y, spuriosity=None, validation_data=None):
        """Fine-tune the head of a copy of the network.

        Parameters
        ----------
        X : array-like or tensor of shape (n, C, H, W) (or (n, n_features)), or Dataset
            Training data.
        y : array-like of shape (n,)
            Class labels (the network's classes).
        spuriosity : array-like of shape (n,), optional
            Spuriosity per training sample (NaN: class without spurious
            features; such classes get ``k`` random samples). Default: from
            ``ranker``.
        validation_data : tuple, optional
            ``(X_val, y_val)`` or ``(X_val, y_val, spuriosity_val)``; default:
            a held-out ``validation_fraction`` of the training data.

        Returns
        -------
        self : SpuriosityHeadFinetuner
        """
        start = time.perf_counter()
        self._check_params()
        X = self._validate_X(X, reset=True)
        n = n_samples(X)
        y = check_y(y, n)
        self.device_ = self._resolve_device()
        self.estimator_, self.module_ = self._copy_network(self.device_)
        self.layer_, head = resolve_linear(self.module_, self.layer, type(self).__name__)
        rng = check_random_state(self.random_state)
        seed = rng.randint(np.iinfo(np.int32).max)
        # random_state=None leaves torch's global RNG alone (the shuffles then draw from it)
        gen = set_seed(seed) if self.random_state is not None else None

        F = self._features(X, check_output=True)
        self.classes_ = network_classes(self.estimator, head.out_features)
        y_idx = encode_y(y, self.classes_)

        self.ranker_ = None
        if spuriosity is None and self.ranker is not None:
            ranker = self.ranker
            try:
                check_is_fitted(ranker)
            except Exception:
                ranker = clone(ranker).fit(F.numpy(), y)
            self.ranker_ = ranker
        s = self._spuriosity(F, y, spuriosity, "spuriosity")

        # validation data
        self.validation_indices_ = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
                raise ValueError(
                    "validation_data must be (X_val, y_val) or (X_val, y_val, spuriosity_val).")
            X_val, y_val = validation_data[0], validation_data[1]
            X_val = self._validate_X(X_val, reset=False, name="X_val")
            y_val = check_y(y_val, n_samples(X_val))
            F_val = self._features(X_val, desc="validation head inputs")
            s_val_given = validation_data[2] if len(validation_data) == 3 else None
            if s_val_given is None and spuriosity is not None and self.ranker_ is None:
                raise ValueError(
                    "spuriosity was given for the training data, so validation_data needs it "
                    "too: (X_val, y_val, spuriosity_val).")
            s_val = self._spuriosity(F_val, y_val, s_val_given, "spuriosity_val")
            train_idx = np.arange(n)
        elif self.validation_fraction > 0:
            strat = y if np.min(np.unique(y, return_counts=True)[1]) >= 2 else None
            train_idx, val_idx = train_test_split(
                np.arange(n), test_size=self.validation_fraction, stratify=strat,
                random_state=rng.randint(np.iinfo(np.int32).max))
            train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
            self.validation_indices_ = val_idx
            F_val, y_val, s_val = F[val_idx], y[val_idx], s[val_idx]
        else:
            train_idx = np.arange(n)
            F_val, y_val, s_val = F, y, s
        yv_idx = encode_y(y_val, self.classes_)
        sizes = [int(np.sum(yv_idx == c)) for c in np.unique(yv_idx)
                 if np.isfinite(s_val[yv_idx == c]).all()]
        self.val_k_ = int(min([int(self.val_k)] + sizes))

        sel = train_idx[self._select(y_idx[train_idx], s[train_idx], rng)]
        self.selected_indices_ = sel

        # training of the head only; the copy's own requires_grad flags come back afterwards
        flags = [(p, p.requires_grad) for p in self.module_.parameters()]
        for p in self.module_.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam(head.parameters(), lr=float(self.lr),
                               weight_decay=float(self.weight_decay))
        initial_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        F_sel = F[sel].to(self.device_)
        t_sel = torch.as_tensor(y_idx[sel], dtype=torch.long, device=self.device_)
        F_val = F_val.to(self.device_)
        F_tr = F[train_idx].to(self.device_)
        t_tr = torch.as_tensor(y_idx[train_idx], dtype=torch.long, device=self.device_)
        groups = self._gap_groups(yv_idx, s_val, self.val_k_)
        was_training = head.training
        head.eval()
        self.gap_before_, self.accuracy_before_ = self._evaluate(head, F_val, yv_idx, groups)
        self.train_accuracy_before_ = self._accuracy(head, F_tr, t_tr)
        self.history_ = History()
        self.converged_ = bool(self.gap_before_ < self.target_gap)
        self.stop_reason_ = "target_gap" if self.converged_ else "max_epochs"
        epoch = 0
        best = (0, None, (self.gap_before_, self.accuracy_before_, self.train_accuracy_before_))
        epochs = progress_bar(range(1, int(self.max_epochs) + 1), self.verbose,
                              total=int(self.max_epochs), desc="fine-tuning")
        with limit_threads(1):
            if not self.converged_:
                epoch, best = self._train(head, opt, F_sel, t_sel, F_val, yv_idx, groups,
                                          F_tr, t_tr, gen, epochs)
        self.best_epoch_, state, (gap, acc, tr_acc) = best
        if state is None:  # no epoch improved on the original head: keep it
            state = initial_state
        with torch.no_grad():
            for name, p in head.named_parameters():
                p.copy_(state[name])
        head.train(was_training)
        for p, flag in flags:
            p.requires_grad_(flag)
        self.n_epochs_ = int(epoch)
        self.gap_after_, self.accuracy_after_, self.train_accuracy_after_ = gap, acc, tr_acc
        if not self.converged_:
            within = ("" if self.max_accuracy_drop is None else
                      f" (in the epochs within max_accuracy_drop={self.max_accuracy_drop})")
            warnings.warn(
                f"The validation gap did not fall below target_gap={self.target_gap} in "
                f"max_epochs={self.max_epochs} epochs{within}; the head of epoch "
                f"{self.best_epoch_} (lowest validation gap, {gap:.3f}) is kept.",
                ConvergenceWarning, stacklevel=2)
        self.fit_time_ = time.perf_counter() - start
        return self

    # ------------------------------------------------------------------ selection
    def select(self, X, y, spuriosity=None):
        """Indices of the samples :meth:`fit` would fine-tune on (without training).

        Uses the fitted ranker (or ``spuriosity``) and the same rule as
        :meth:`fit` (lowest spuriosity, or random for ``baseline="random"``),
        over all of ``X``.
        """
        check_is_fitted(self, "estimator_")
        X = self._validate_X(X, reset=False)
        y = check_y(y, n_samples(X))
        F = self._features(X)
        s = self._spuriosity(F, y, spuriosity, "spuriosity")
        return self._select(encode_y(y, self.classes_), s, check_random_state(self.random_state))

