"""Methods on networks they were not tuned on: every method on every zoo architecture.

Configuration (why): the four zoo networks of ``skdebias.models`` (``make_zoo_model``: SmallCNN,
a VGG-style CNN with BatchNorm, a small ResNet, a CNN with global average pooling), each trained
the same way (Adam, lr 2e-3, batch 64, 28 px digits) on three biases:

- ``patch`` / ``timestamp``: ``make_artifact_digits`` with the artifact in ``P_ARTIFACT`` of
  class 0 (the Clever-Hans setting). Rows: vanilla; RR-ClArC with skdebias's defaults
  (``cav_samples="labelled"``, ``train_layers="after"``); RR-ClArC with the reference options
  (``cav_samples="correct"``, ``train_layers="linear"``); the reference recipe re-implemented
  below from its formulas (every Linear layer trains, conv/BatchNorm frozen, SGD momentum 0.9,
  gradient-norm clipping at 100, pattern CAV on the class's correctly predicted samples); P-ClArC;
  SpRAy (silhouette default and eigengap) on class 0, next to SpRAy as its authors' analysis
  software runs it (``reference_spray``: k chosen by the eigengap, and 2 clusters); TCAV (Kim et
  al.) against captum's TCAV (the mean of ``CAPTUM_REPEATS`` runs, each with its own random split
  for the CAVs; a hand computation without captum) on the artifact concept.
- ``colour``: ``make_colored_digits(rho=0.99)``. Rows: vanilla, EnD with its defaults
  (``EnDClassifier``, skorch's default validation split, last epoch), EnD with its defaults and
  the EnD authors' epoch selection (the epoch with the best accuracy on 30 % of the training
  digits recoloured at random, ``make_colored_digits(validation_size=0.3)``), the same with
  ``perp_loss="log"`` (not a default; no EnD target), vanilla, EnD with its defaults and EnD with
  ``perp_loss="log"`` trained as in the Biased-MNIST benchmark where EnD's defaults were chosen
  (``LONG_EPOCHS`` epochs, the best validation epoch; EnD judged against that vanilla), vanilla
  and EnD with its defaults trained with the EnD authors' schedule (``END_SCHEDULE``; EnD's
  target is then judged against that vanilla), ``GroupBalancedClassifier`` trained like that
  15-epoch vanilla (the bias labels used by reweighting alone: what they buy on this data; no
  target), FMD with its defaults (``FastModelDebiaser``), FMD as its authors' Colored-MNIST
  script runs it (``reference_fmd``: steps kept when they raise the accuracy on the unbiased
  validation split; a baseline, not counted for the FMD target),
  and vanilla with its logits divided by ``SOFTENING``: the same decisions, only less confident,
  which lowers the counterfactual bias without any debiasing. Each colour row also gives the
  prediction flip rate (``counterfactual_flip_rate``), which such softening leaves as it is.

RR-ClArC's penalty (each variant, and the reference recipe's) is picked by ``GridSearchCV`` on the
training split only (2-fold, ``make_debias_scorer``: accuracy and removed concept sensitivity on
the training images); the attacked test set is never used for a choice. Settings (lr, epochs,
grid) come from SmallCNN; the other architectures get them untouched.

Acceptance targets (per (architecture, bias) row, mean over the seeds) are in ``TARGETS``; each
row of the summary has a "meets" column per target that applies (``None`` where it does not).

Run: .venv/bin/python benchmarks/robustness.py [--quick] [--jobs N] [--device cpu|cuda]
     [--seeds 0 1 2] [--archs small_cnn vgg_bn resnet gap_cnn] [--cache-dir DIR]

With ``--cache-dir`` each configuration's rows are written to a file of their own as soon as they
are done, and the files found there are read instead of training again: a run that was stopped
resumes where it stopped, and configurations run on different machines can be put together.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings

import numpy as np
import scipy.spatial
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from skorch.callbacks import LRScheduler

from _common import (emit, epoch_selection, format_table, kept_epoch, recording,
                     target_class_concept_labels)

import sklearn
from skdebias import SpectralRelevanceAnalysis, tcav_score
from skdebias.attribution import attribute
from skdebias.correction import (
    ClassArtifactCompensator,
    EnDClassifier,
    FastModelDebiaser,
    GradientPenaltyCorrector,
    GroupBalancedClassifier,
)
from skdebias.datasets import make_artifact_digits, make_colored_digits
from skdebias.exceptions import (
    ChanceLevelWarning,
    CleanAccuracyWarning,
    ConfidenceOnlyWarning,
    DivergenceError,
    SaturatedPenaltyWarning,
    UntrainedNetworkWarning,
    WeakClustersWarning,
)
from skdebias.metrics import (artifact_relevance, counterfactual_bias, counterfactual_flip_rate,
                              make_debias_scorer)
from skdebias.models import ZOO, make_classifier, make_zoo_model
from skdebias.report import write_json

ARCHS = tuple(ZOO)
BIASES = ("patch", "timestamp", "colour")
P_ARTIFACT = 0.7
RHO = 0.99
VALIDATION_SIZE = 0.3  # training digits recoloured into the EnD authors' validation split
#: vanilla training (all architectures, all biases; EnD trains the same way)
TRAIN = dict(max_epochs=6, lr=2e-3, batch_size=64)
#: RR-ClArC fine-tuning (chosen on SmallCNN, see benchmarks/correction.py)
RR = dict(max_epochs=3, lr=2e-3, optimizer=torch.optim.SGD)
PENALTIES = [1e2, 1e4, 1e6]
CV_FOLDS = 2
TCAV_RANDOM = 6
#: captum's TCAV is run this many times (its CAVs are fitted on random splits) and averaged
CAPTUM_REPEATS = 5
SOFTENING = 4  # temperature of the softened vanilla row (colour bias)
#: The EnD authors' optimisation (Biased-MNIST script): Adam, lr 1e-3, weight decay 1e-4, batch
#: 256, 80 epochs, the learning rate divided by 10 every 20 epochs, best validation epoch.
END_SCHEDULE = dict(lr=1e-3, optimizer__weight_decay=1e-4, batch_size=256, max_epochs=80)
SCHEDULE_VANILLA = "vanilla (EnD authors' schedule)"  # EnD's training with alpha = beta = 0
LOG_END = "EnD (perp_loss='log', best validation epoch)"  # not a default: no EnD target
#: The training of the Biased-MNIST benchmark, where EnD's defaults were chosen: ``TRAIN`` for
#: 15 epochs, the best epoch on the validation split.
LONG_EPOCHS = 15
LONG_VANILLA = f"vanilla ({LONG_EPOCHS} epochs, best validation epoch)"
BALANCED = f"group-balanced weights ({LONG_EPOCHS} epochs, best validation epoch)"
#: the vanilla each EnD row is judged against (default: ``"vanilla"``), by a part of its name
END_BASELINES = {"authors' schedule": SCHEDULE_VANILLA, f"{LONG_EPOCHS} epochs": LONG_VANILLA}
TARGETS = {
    "RR no collapse": "no RR-ClArC run ends at chance accuracy or diverges",
    "RR >= reference": "where vanilla loses >= 10 points: recovers at least the reference "
                       "recipe's share of the loss, clean accuracy within 3 points",
    "P-ClArC gap <= 5": "clean and attacked accuracy within 5 points (in >= 2/3 of the runs)",
    "SpRAy >= 2, ARI >= 0.8": "in every run where the artifact holds >= 10 % of the relevance",
    "TCAV sign agrees": "same side of 0.5 as captum's TCAV (or the hand computation)",
    "EnD >= vanilla + 5": "unbiased accuracy, EnD with its defaults, rho 0.99",
    "FMD bias -30 %": "counterfactual bias cut by >= 30 % for <= 3 points of biased accuracy",
}


# ------------------------------------------------------------------ the reference recipe
class ReferenceRRClArC(ClassifierMixin, BaseEstimator):
    """RR-ClArC as the reference recipe does it, written from its formulas (a baseline row).

    CAV: pattern (mean difference of the max-pooled activations at ``layer``, unit length) over
    the labelled samples that the network predicts correctly. Training: every ``nn.Linear``
    trains, everything else is frozen in eval mode; SGD momentum 0.9; loss
    ``CE + penalty * mean_b (v . mean_hw g_b)^2`` with ``g = d(sum_k s_k f_k)/da`` and random
    signs ``s_k`` per step; gradient norm clipped at 100.
    """

    def __init__(self, module, layer, penalty=1.0, max_epochs=3, lr=2e-3, batch_size=64,
                 max_grad_norm=100.0, device="cpu", random_state=0):
        self.module = module
        self.layer = layer
        self.penalty = penalty
        self.max_epochs = max_epochs
        self.lr = lr
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.random_state = random_state

    @property
    def estimator(self):  # the uncorrected network, for make_debias_scorer's reference
        return self.module

    def _activations(self, module, X, requires_grad=False):
        store = {}
        layer = module.get_submodule(self.layer)

        def hook(_, __, out):
            if requires_grad and not out.requires_grad:
                out = out.detach().requires_grad_()
            store["a"] = out
            return out

        handle = layer.register_forward_hook(hook)
        try:
            logits = module(X)
        finally:
            handle.remove()
        return store["a"], logits

    def fit(self, X, y, concept_labels=None):
        dev = torch.device(self.device)
        gen = torch.Generator().manual_seed(int(self.random_state))
        module = copy.deepcopy(self.module).to(dev).eval()
        self.classes_ = np.arange(10)
        X_t = torch.as_tensor(X)
        y_t = torch.as_tensor(np.asarray(y)).long()
        c = np.asarray(concept_labels)
        # the CAV: class samples with a label that the network predicts correctly
        with torch.no_grad():
            A, P = [], []
            for i in range(0, len(X_t), 256):
                a, out = self._activations(module, X_t[i:i + 256].to(dev))
                A.append(a.amax(dim=(2, 3)) if a.ndim == 4 else a)
                P.append(out.argmax(1))
            A, P = torch.cat(A).cpu().double().numpy(), torch.cat(P).cpu().numpy()
        keep = (c != -1) & (P == np.asarray(y))
        if len(np.unique(c[keep])) < 2:  # one group only: fall back to every labelled sample
            keep = c != -1
        v = A[keep & (c == 1)].mean(0) - A[keep & (c == 0)].mean(0)
        self.cav_ = (v / np.linalg.norm(v)).astype(np.float32)
        v_t = torch.as_tensor(self.cav_, device=dev)
        linear = {id(p) for m in module.modules() if isinstance(m, torch.nn.Linear)
                  for p in m.parameters()}
        params = [p for p in module.parameters() if id(p) in linear]
        for p in module.parameters():
            p.requires_grad_(id(p) in linear)
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
        for _ in range(int(self.max_epochs)):
            order = torch.randperm(len(X_t), generator=gen)
            for i in range(0, len(X_t), self.batch_size):
                idx = order[i:i + self.batch_size]
                xb, yb = X_t[idx].to(dev), y_t[idx].to(dev)
                module.eval()  # conv and BatchNorm frozen (running statistics fixed)
                a, out = self._activations(module, xb, requires_grad=True)
                signs = (torch.randint(0, 2, out.shape, generator=gen) * 2 - 1).to(out)
                (g,) = torch.autograd.grad((signs * out).sum(), a, create_graph=True)
                g = g.mean(dim=(2, 3)) if g.ndim == 4 else g
                loss = torch.nn.functional.cross_entropy(out, yb) + \
                    float(self.penalty) * ((g @ v_t) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                opt.step()
        for p in module.parameters():
            p.requires_grad_(True)
        self.module_ = module.eval()
        self.measure_layer_ = self.layer
        return self

    def predict_proba(self, X):
        dev = torch.device(self.device)
        with torch.no_grad():
            out = [torch.softmax(self.module_(torch.as_tensor(X[i:i + 512]).to(dev)), 1).cpu()
                   for i in range(0, len(X), 512)]
        return torch.cat(out).numpy()

    def predict(self, X):
        return self.predict_proba(X).argmax(1)


#: FMD as its authors' Colored-MNIST script runs it: pairs tried, step length, L2 weight
REFERENCE_FMD = dict(n_steps=500, step=3000.0, lam=1e-6)
REFERENCE_FMD_ROW = "FMD, authors' recipe"


def _head_inputs(module, head, X, batch_size=256):
    """The features entering ``head`` (an ``nn.Linear`` of ``module``) for ``X``."""
    seen = []
    device = next(module.parameters()).device
    handle = head.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach().cpu()))
    try:
        with torch.no_grad():
            for i in range(0, len(X), batch_size):
                module(torch.as_tensor(X[i:i + batch_size]).to(device))
    finally:
        handle.remove()
    return torch.cat(seen).double()


def reference_fmd_step(F, w, f, f_cf):
    """One step of the FMD authors' recipe on the weights ``w`` of class ``k``:
    ``w + step * H^-1 |g(f_cf) - g(f)|``. ``g(x) = x (sigmoid(x.w) - 1) + lam w`` is the gradient
    of the logistic loss of ``k`` against the rest for one sample of class ``k`` with the L2 term
    ``lam |w|^2 / 2``; ``H = F^T diag(s (1 - s)) F + lam n I``, ``s = sigmoid(F w)``, is the
    Hessian of that loss summed over the training features ``F`` (it does not depend on which
    of them are of class ``k``)."""
    lam, n = REFERENCE_FMD["lam"], len(F)
    s = torch.sigmoid(F @ w)
    H = F.T @ ((s * (1 - s))[:, None] * F) + lam * n * torch.eye(len(w), dtype=F.dtype)

    def grad(x):
        return x * (torch.sigmoid(x @ w) - 1) + lam * w

    return w + REFERENCE_FMD["step"] * torch.linalg.solve(H, (grad(f_cf) - grad(f)).abs())


def reference_fmd(net, data, seed):
    """FMD as its authors' Colored-MNIST script does it, written from its formulas (a baseline).

    Per step one counterfactual pair ``(x, x_cf)`` of a training digit of class ``k`` (in its
    class's colour and in another one) edits the weights ``w_k`` of the last ``nn.Linear``:
    ``w_k += step * H^-1 |g(x_cf) - g(x)|``, with ``g`` the gradient of the logistic loss of
    class ``k`` against the rest (label +1, L2 weight ``lam``) and ``H`` its Hessian over the
    training digits' features plus ``lam n I``. A step is kept when it raises the accuracy on an
    unbiased labelled set (here the validation split of recoloured training digits; the script
    uses its test set) and undone otherwise. Nothing bounds the accuracy on biased data.
    Returns a copy of the skorch ``net`` with the edited head and the number of kept steps.
    """
    net = copy.deepcopy(net)
    module = net.module_.eval()
    head = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    F_train = _head_inputs(module, head, data.X)
    F_val = _head_inputs(module, head, data.X_val)
    W = head.weight.detach().double().clone()
    b = head.bias.detach().double().clone() if head.bias is not None else 0.0
    y_val = torch.as_tensor(data.y_val)
    classes = torch.as_tensor(np.asarray(net.classes_))

    def val_acc(W):
        return float((classes[(F_val @ W.T + b).argmax(1)] == y_val).double().mean())

    rng = np.random.RandomState(seed)
    pairs = rng.choice(len(data.X), min(REFERENCE_FMD["n_steps"], len(data.X)), replace=False)
    F_pair = _head_inputs(module, head, data.X[pairs])
    F_cf = _head_inputs(module, head, data.X_cf[pairs])
    best, kept = val_acc(W), 0
    for j, i in enumerate(pairs):
        k = int(np.flatnonzero(np.asarray(net.classes_) == data.y[i])[0])
        trial = W.clone()
        trial[k] = reference_fmd_step(F_train, W[k], F_pair[j], F_cf[j])
        score = val_acc(trial)
        if score > best:
            best, W, kept = score, trial, kept + 1
    with torch.no_grad():
        head.weight.copy_(W.to(head.weight))
    return net, kept


# ------------------------------------------------------------------ helpers
class _Scale(torch.nn.Module):
    """Multiplies its input by ``factor`` (logits divided by a temperature)."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def _acc(model, X, y):
    return float(np.mean(np.asarray(model.predict(X)) == np.asarray(y)))


def _search(est, grid, data, seed):
    """GridSearchCV over ``penalty`` on the training split; returns (best penalty, seconds)."""
    start = time.perf_counter()
    c = target_class_concept_labels(data)
    with sklearn.config_context(enable_metadata_routing=True):
        est = est.set_fit_request(concept_labels=True)
        search = GridSearchCV(est, {"penalty": grid}, scoring=make_debias_scorer(),
                              cv=StratifiedKFold(CV_FOLDS, shuffle=True, random_state=seed),
                              refit=False, error_score=float("nan"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            search.fit(data.X, data.y, concept_labels=c)
    scores = search.cv_results_["mean_test_score"]
    if np.all(np.isnan(scores)):
        return grid[0], time.perf_counter() - start
    return search.best_params_["penalty"], time.perf_counter() - start


def _fit_or_collapse(make, data, c):
    """Fit; a DivergenceError is a collapse (None). Also returns whether the estimator warned
    that the network it was given is untrained (UntrainedNetworkWarning)."""
    def fit():
        try:
            return make().fit(data.X, data.y, concept_labels=c)
        except DivergenceError:
            return None

    return recording(UntrainedNetworkWarning, fit)


def _captum_tcav(module, layer, X, concept_X, random_sets, target, device, seed=0):
    """captum's TCAV sign count of the concept (mean over the random sets) in each of
    ``CAPTUM_REPEATS`` runs, or None without captum.

    captum fits every CAV with SGD on a random two thirds of the images, so one run's score
    varies: each run gets its own split and SGD order (seeded from ``seed``; the global random
    states are restored afterwards)."""
    try:
        from captum.concept import TCAV, Concept
    except ImportError:
        return None

    def loader(arr):
        return torch.utils.data.DataLoader(torch.as_tensor(arr), batch_size=64)

    # on a CPU copy: captum reads the concept sets from CPU data loaders
    module = copy.deepcopy(module).cpu().eval()
    concept = Concept(0, "artifact", loader(concept_X))
    randoms = [Concept(i + 1, f"random{i}", loader(R)) for i, R in enumerate(random_sets)]
    scores = []
    np_state = np.random.get_state()
    try:
        for rep in range(CAPTUM_REPEATS):
            with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
                    torch.random.fork_rng():
                warnings.simplefilter("ignore")
                torch.manual_seed(1000 * seed + rep)
                np.random.seed(1000 * seed + rep)  # the SGD order of captum's classifier
                tcav = TCAV(module, layers=[layer], save_path=tmp + os.sep)
                out = tcav.interpret(torch.as_tensor(X), target=target,
                                     experimental_sets=[[concept, r] for r in randoms])
            scores.append(float(np.mean([float(v[layer]["sign_count"][0])
                                         for v in out.values()])))
    finally:
        np.random.set_state(np_state)
    return scores


def _hand_tcav(module, layer, X, concept_X, random_sets, target, device):
    """TCAV by hand: flattened mean-difference CAV, share of positive directional derivatives."""
    def acts(arr, grad=False):
        store = {}
        h = module.get_submodule(layer).register_forward_hook(
            lambda m, i, o: store.__setitem__("a", o))
        x = torch.as_tensor(arr).to(device)
        try:
            if grad:
                out = module(x)
                (g,) = torch.autograd.grad(out[:, target].sum(), store["a"])
                return g.flatten(1).cpu().double()
            with torch.no_grad():
                module(x)
            return store["a"].flatten(1).cpu().double()
        finally:
            h.remove()

    g = acts(X, grad=True)
    a_c = acts(concept_X).mean(0)
    return float(np.mean([((g @ (a_c - acts(R).mean(0))) > 0).double().mean().item()
                          for R in random_sets]))


# ------------------------------------------------------------------ one configuration
def train_on_artifact(module, bias, seed, device="cpu", train=TRAIN):
    """``make_artifact_digits`` with the artifact ``bias`` in ``P_ARTIFACT`` of class 0, and a
    copy of ``module`` trained on it: ``(data, net)``."""
    data = make_artifact_digits(target_class=0, p=P_ARTIFACT, artifact=bias, random_state=seed)
    net = make_classifier(copy.deepcopy(module), device=device, random_state=seed,
                          **train).fit(data.X, data.y)
    return data, net


def relevance_share(net, data, device="cpu"):
    """The share of |LRP| inside the artifact on (up to 100 of) class 0's training images that
    show it: whether SpRAy's target applies."""
    art = (data.y == 0) & (data.concept == 1)
    return float(artifact_relevance(net, data.X[art][:100], data.artifact_mask, target=0,
                                    device=device))


def spray_row(net, data, seed, device="cpu", **params):
    """SpRAy (``params`` over its defaults) on class 0 of the training split, where the artifact
    lives: its clusters, their ARI against the artifact labels, its confidence and whether it
    issued a ``WeakClustersWarning``."""
    idx0 = np.flatnonzero(data.y == 0)
    sp, warned = recording(WeakClustersWarning, lambda: SpectralRelevanceAnalysis(
        net, classes=[0], device=device, random_state=seed, **params).fit(data.X, data.y))
    return {"clusters": sp.n_clusters_[0],
            "ARI": adjusted_rand_score(data.concept[idx0] == 1, sp.labels_[idx0]),
            "confidence": sp.confidence_[0], "warned weak clusters": warned}


#: SpRAy as its authors' analysis software runs it (CoRelAy's "spectral" analysis): neighbours of
#: the binary k-nearest-neighbour graph and eigenvectors kept for the embedding
REFERENCE_SPRAY = dict(n_neighbors=32, n_eigval=32, max_clusters=8)
REFERENCE_SPRAY_ROW = "SpRAy, authors' recipe"


def reference_spray_partition(maps, n_clusters=None, random_state=0):
    """SpRAy's clusters of one class's maps as its authors' recipe computes them.

    The maps ``(n, H, W)`` (relevance summed over channels) are divided by their sum, at full
    resolution; Euclidean distances between them give a k-nearest-neighbour graph with unit
    weights, averaged with its transpose; the eigenvectors of the ``n_eigval`` eigenvalues of
    largest magnitude of ``D^-1/2 A D^-1/2``, each sample's row scaled to unit length, are
    clustered by k-means. The authors' software computes k-means for every k and leaves the
    choice to the analyst; the SpRAy paper reads it from the eigengap, used here when
    ``n_clusters`` is None (the largest gap among the ``max_clusters + 1`` smallest Laplacian
    eigenvalues ``1 - lambda``). Returns ``(labels, n_clusters)``.
    """
    F = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    total = F.sum(axis=1, keepdims=True)
    F = F / np.where(np.abs(total) > 0, total, 1.0)
    n = len(F)
    dist = scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(F))
    k_nn = min(REFERENCE_SPRAY["n_neighbors"], n - 1)
    A = np.zeros((n, n))
    A[np.repeat(np.arange(n), k_nn), np.argsort(dist, axis=1)[:, 1:k_nn + 1].ravel()] = 1.0
    A = (A + A.T) / 2
    d = A.sum(axis=1) ** -0.5
    lam, vecs = np.linalg.eigh(d[:, None] * A * d[None, :])
    keep = np.sort(np.argsort(np.abs(lam))[-min(REFERENCE_SPRAY["n_eigval"], n):])
    lam, vecs = lam[keep], vecs[:, keep]
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    k = n_clusters
    if k is None:
        k = int(np.argmax(np.diff(np.sort(1.0 - lam)[:REFERENCE_SPRAY["max_clusters"] + 1]))) + 1
    if k == 1:
        return np.zeros(n, dtype=np.int64), 1
    return KMeans(n_clusters=k, random_state=random_state).fit_predict(vecs), k


def reference_spray(net, data, seed, device="cpu", composite="EpsilonPlus"):
    """SpRAy on class 0 by the authors' recipe (``reference_spray_partition``; baseline rows) on
    the LRP maps of ``composite``: ``{"eigengap": {...}, "2 clusters": {...}}`` with the
    clusters and their ARI against the artifact labels."""
    idx0 = np.flatnonzero(data.y == 0)
    maps = attribute(net, data.X[idx0], target=0, composite=composite, device=device)
    out = {}
    for name, k in (("eigengap", None), ("2 clusters", 2)):
        labels, k = reference_spray_partition(maps, k, seed)
        out[name] = {"clusters": k, "ARI": adjusted_rand_score(data.concept[idx0] == 1, labels)}
    return out


def run_config(arch, bias, seed, quick=False, device="cpu"):
    """All rows of one (architecture, bias, seed)."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    train = dict(TRAIN, max_epochs=3) if quick else TRAIN
    grid = [PENALTIES[0], PENALTIES[-1]] if quick else PENALTIES
    module, conv, _ = make_zoo_model(arch, random_state=seed)
    base = dict(arch=arch, bias=bias, seed=seed)
    if bias == "colour":
        # the validation split is drawn last: every other array is the same without it
        data = make_colored_digits(rho=RHO, counterfactual=True, random_state=seed,
                                   validation_size=VALIDATION_SIZE)
        net = make_classifier(copy.deepcopy(module), device=device, random_state=seed,
                              **train).fit(data.X, data.y)

        def scored(method, est, network=None, extra=None):
            """A colour row: accuracies of ``est``, counterfactual bias and flip rate of
            ``network`` (``est``), and the entries of ``extra``."""
            network = est if network is None else network
            return {"method": method, "biased acc": _acc(est, data.X_test_biased, data.y_test),
                    "unbiased acc": _acc(est, data.X_test, data.y_test),
                    "cf bias": counterfactual_bias(network, data.X_test, data.X_test_cf,
                                                   data.y_test),
                    "flip rate": counterfactual_flip_rate(network, data.X_test, data.X_test_cf),
                    **(extra or {})}

        def fit_end(cls=EnDClassifier, **kwargs):
            """``cls`` (EnD with its defaults, or another classifier that takes the bias labels)
            trained like vanilla (``kwargs`` override the training or the defaults); the row
            entries of the warnings it issued."""
            torch.manual_seed(seed)
            end = cls(copy.deepcopy(module), optimizer=torch.optim.Adam, device=device,
                      verbose=0, iterator_train__shuffle=True, **{**train, **kwargs})
            end, names = recording((ChanceLevelWarning, SaturatedPenaltyWarning),
                                   lambda: end.fit(data.X, data.y, bias=data.bias))
            return end, {"warned chance": "ChanceLevelWarning" in names,
                         "warned saturated": "SaturatedPenaltyWarning" in names}

        def authors_schedule(checkpoints):
            """The EnD authors' optimisation and epoch selection (``END_SCHEDULE``, the learning
            rate divided by 10 after each quarter, the best epoch on the validation split)."""
            kw = epoch_selection(data, "valid", checkpoints, with_bias=True)
            epochs = END_SCHEDULE["max_epochs"] if not quick else 8
            kw["callbacks"] = kw["callbacks"] + [LRScheduler(
                policy=torch.optim.lr_scheduler.StepLR, step_size=epochs // 4, gamma=0.1)]
            return {**kw, **END_SCHEDULE, "max_epochs": epochs}

        name = "EnD (defaults)"
        try:
            end, warned = fit_end()
        except Exception as exc:  # noqa: BLE001 - a failing default is a result to report
            # the default validation split failed: train on all data, and say so in the row
            print(f"EnD with its default train_split failed ({type(exc).__name__}: {exc}); "
                  "rerun with train_split=None", flush=True)
            name = "EnD (defaults, train_split=None)"
            end, warned = fit_end(train_split=None)
        end_row = scored(name, end, extra=warned)

        def kept_row(name, selection=None, **kwargs):
            """The row of EnD (``kwargs`` as in :func:`fit_end`) trained with the epoch
            selection ``selection(checkpoints)`` (default: the best validation epoch)."""
            with tempfile.TemporaryDirectory() as checkpoints:
                kw = (selection(checkpoints) if selection is not None else
                      epoch_selection(data, "valid", checkpoints, with_bias=True))
                est, warned = fit_end(**kw, **kwargs)
            return scored(name, est, extra={"epoch": kept_epoch(est), **warned})

        long_epochs = LONG_EPOCHS if not quick else 4
        vanilla_weights = dict(alpha=0.0, beta=0.0)
        selected_rows = [
            kept_row("EnD (defaults, best validation epoch)"),
            kept_row(LOG_END, perp_loss="log"),
            kept_row(LONG_VANILLA, max_epochs=long_epochs, **vanilla_weights),
            kept_row(f"EnD (defaults, {LONG_EPOCHS} epochs, best validation epoch)",
                     max_epochs=long_epochs),
            kept_row(f"EnD (perp_loss='log', {LONG_EPOCHS} epochs, best validation epoch)",
                     max_epochs=long_epochs, perp_loss="log"),
            kept_row(SCHEDULE_VANILLA, authors_schedule, **vanilla_weights),
            kept_row("EnD (defaults, EnD authors' schedule)", authors_schedule),
            # the bias labels used by reweighting alone, trained like the 15-epoch vanilla
            kept_row(BALANCED, cls=GroupBalancedClassifier, max_epochs=long_epochs),
        ]
        fmd, warned = recording(ConfidenceOnlyWarning, lambda: FastModelDebiaser(
            net, device=device, random_state=seed).fit(data.X, data.y, X_cf=data.X_cf))
        van = scored("vanilla", net)
        fmd_row = scored("FMD (defaults)", fmd, fmd.estimator_,
                         extra={"warned confidence": warned})
        ref_fmd, kept = reference_fmd(net, data, seed)
        ref_fmd_row = scored(f"{REFERENCE_FMD_ROW} (steps kept by unbiased accuracy)", ref_fmd,
                             extra={"kept steps": kept})
        # the same decisions, only less confident: what the bias metric makes of that
        soft = scored(f"vanilla, logits / {SOFTENING}", net,
                      torch.nn.Sequential(copy.deepcopy(net.module_), _Scale(1 / SOFTENING)))
        rows = [van, end_row, *selected_rows, fmd_row, ref_fmd_row, soft]
    else:
        data, net = train_on_artifact(module, bias, seed, device, train)
        c = target_class_concept_labels(data)
        X_att = data.add_artifact(data.X_test)
        rows = [{"method": "vanilla", "clean acc": _acc(net, data.X_test, data.y_test),
                 "attacked acc": _acc(net, X_att, data.y_test)}]
        rr_kw = dict(RR, device=device, random_state=seed)
        variants = {
            "RR-ClArC (defaults)": lambda p: GradientPenaltyCorrector(net, conv, penalty=p,
                                                                      **rr_kw),
            "RR-ClArC (reference options)": lambda p: GradientPenaltyCorrector(
                net, conv, penalty=p, cav_samples="correct", train_layers="linear", **rr_kw),
            "reference recipe": lambda p: ReferenceRRClArC(
                net.module_, conv, penalty=p, max_epochs=RR["max_epochs"], lr=RR["lr"],
                device=device, random_state=seed),
        }
        for name, make in variants.items():
            try:
                penalty, search_s = _search(make(1.0), grid, data, seed)
                t0 = time.perf_counter()
                est, warned = _fit_or_collapse(lambda: make(penalty), data, c)
            except ValueError as exc:  # refused by the estimator: a row that says why
                reason = str(exc).strip().splitlines()[-1][:200]
                rows.append({"method": name, "clean acc": float("nan"),
                             "attacked acc": float("nan"), "collapsed": False,
                             "error": reason})
                continue
            row = {"method": name, "penalty": penalty, "search s": search_s,
                   "fit s": time.perf_counter() - t0, "warned untrained": warned}
            if est is None:
                row.update({"clean acc": float("nan"), "attacked acc": float("nan"),
                            "collapsed": True})
            else:
                clean = _acc(est, data.X_test, data.y_test)
                row.update({"clean acc": clean, "attacked acc": _acc(est, X_att, data.y_test),
                            "collapsed": bool(clean < 0.2)})
            rows.append(row)
        for name, pooling in (("P-ClArC", "max"), ("P-ClArC (flatten)", "flatten")):
            pc, warned = recording(CleanAccuracyWarning, lambda: ClassArtifactCompensator(
                net, conv, pooling=pooling, device=device).fit(data.X, data.y, c))
            rows.append({"method": name, "clean acc": _acc(pc, data.X_test, data.y_test),
                         "attacked acc": _acc(pc, X_att, data.y_test),
                         "warned clean accuracy": warned})
        share = relevance_share(net, data, device)
        for selection in ("silhouette", "eigengap"):
            rows.append({"method": f"SpRAy ({selection})", "relevance share": share,
                         **spray_row(net, data, seed, device, cluster_selection=selection)})
        for name, values in reference_spray(net, data, seed, device).items():
            rows.append({"method": f"{REFERENCE_SPRAY_ROW} ({name})", "relevance share": share,
                         **values})
        # TCAV of the artifact for class 0: concept = other-class test images with the artifact
        rng = np.random.RandomState(seed)
        others = np.flatnonzero(data.y_test != 0)
        n_set = 30 if quick else 50
        concept_X = data.add_artifact(data.X_test[rng.choice(others, n_set, replace=False)])
        pool = data.X_test[others]
        n_random = 3 if quick else TCAV_RANDOM
        random_sets = [pool[rng.choice(len(pool), n_set, replace=False)]
                       for _ in range(n_random)]
        X0 = data.X_test[data.y_test == 0]
        for name, X in (("TCAV clean", X0), ("TCAV attacked", data.add_artifact(X0))):
            ours = tcav_score(net, X, conv, concept_X, random_sets, target=0, random_state=seed)
            module_ = net.module_.eval()
            runs = _captum_tcav(module_, conv, X, concept_X, random_sets, 0, device, seed)
            ref_name = "captum"
            if runs is None:
                runs, ref_name = [_hand_tcav(module_, conv, X, concept_X, random_sets, 0,
                                             device)], "hand"
            ref = float(np.mean(runs))
            side = ours.mean > 0.5
            rows.append({"method": name, "tcav": float(ours.mean), "p value": ours.p_value,
                         "reference tcav": ref, "reference": ref_name,
                         "reference runs": runs,
                         # the share of the reference's runs on the same side of 0.5 as ours
                         "reference runs agreeing": float(np.mean([(r > 0.5) == side
                                                                   for r in runs])),
                         "sign agrees": side == (ref > 0.5)})
    seconds = time.perf_counter() - start
    return [dict(base, **r, **({"config s": seconds} if i == 0 else {}))
            for i, r in enumerate(rows)]


def settings(quick=False):
    """Everything a configuration's rows depend on besides the code, as JSON values."""
    return {"train": TRAIN, "rr": {k: str(v) for k, v in RR.items()}, "penalties": PENALTIES,
            "p_artifact": P_ARTIFACT, "rho": RHO, "quick": bool(quick)}


def run_cached(cache_dir, arch, bias, seed, quick=False, device="cpu"):
    """:func:`run_config`, its rows kept in ``cache_dir`` (one JSON file per configuration and
    device) and read from there when a file with the same settings exists."""
    if cache_dir is None:
        return run_config(arch, bias, seed, quick, device)
    tag = "".join(ch if ch.isalnum() else "-" for ch in str(device))
    path = os.path.join(cache_dir, f"{arch}-{bias}-seed{seed}-{tag}{'-quick' if quick else ''}"
                                   ".json")
    wanted = json.loads(json.dumps(settings(quick)))
    if os.path.exists(path):
        with open(path) as fh:
            payload = json.load(fh)
        if payload.get("settings") == wanted:
            # JSON has no NaN: the files hold null where a row had NaN
            return [{k: float("nan") if v is None else v for k, v in row.items()}
                    for row in payload["rows"]]
        print(f"{path}: other settings, run again", flush=True)
    rows = run_config(arch, bias, seed, quick, device)
    write_json(path, {"settings": wanted, "device": str(device), "rows": rows})
    return rows


# ------------------------------------------------------------------ summary and targets
def _mean(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None and not (
        isinstance(r[key], float) and np.isnan(r[key]))]
    return float(np.mean(vals)) if vals else float("nan")


def _target_key(target, method):
    """The "meets" key of ``target`` for the row ``method``: the authors' recipes are baselines,
    judged under ``target + " (baseline)"``, which ``overall`` does not count."""
    baseline = method.startswith((REFERENCE_SPRAY_ROW, REFERENCE_FMD_ROW))
    return f"{target} (baseline)" if baseline else target


def summarise(rows):
    """One row per (architecture, bias, method): means over seeds and the targets it meets."""
    out = []
    keys = sorted({(r["arch"], r["bias"]) for r in rows},
                  key=lambda k: (ARCHS.index(k[0]), BIASES.index(k[1])))
    for arch, bias in keys:
        group = [r for r in rows if r["arch"] == arch and r["bias"] == bias]
        methods = list(dict.fromkeys(r["method"] for r in group))
        by = {m: [r for r in group if r["method"] == m] for m in methods}
        van = by["vanilla"]
        for m in methods:
            rs = by[m]
            row = {"arch": arch, "bias": bias, "method": m, "seeds": len(rs)}
            for key in ("clean acc", "attacked acc", "biased acc", "unbiased acc", "cf bias",
                        "flip rate", "kept steps", "relevance share", "clusters", "ARI",
                        "confidence", "tcav", "reference tcav", "reference runs agreeing"):
                if any(key in r for r in rs):
                    row[key] = _mean(rs, key)
            if m.startswith("RR-ClArC") or m == "reference recipe":
                row["penalty"] = [r.get("penalty") for r in rs]
            meets = {}
            if bias != "colour":
                lost = _mean(van, "clean acc") - _mean(van, "attacked acc")
                if m.startswith("RR-ClArC") or m == "reference recipe":
                    row["loss recovered"] = (_mean(rs, "attacked acc") - _mean(
                        van, "attacked acc")) / lost if lost > 0 else float("nan")
                if m.startswith("RR-ClArC"):
                    meets["RR no collapse"] = not any(r.get("collapsed") for r in rs)
                    if lost >= 0.10:
                        ref = by["reference recipe"]
                        ref_rec = (_mean(ref, "attacked acc") - _mean(van, "attacked acc")) / lost
                        if not np.isnan(ref_rec):  # else the reference recipe refused to fit
                            meets["RR >= reference"] = bool(
                                row["loss recovered"] >= ref_rec - 1e-9
                                and row["clean acc"] >= _mean(van, "clean acc") - 0.03)
                if m.startswith("P-ClArC"):
                    meets["P-ClArC gap <= 5"] = bool(
                        np.mean([abs(r["clean acc"] - r["attacked acc"]) <= 0.05 for r in rs])
                        >= 2 / 3)
                # judged run by run, in the runs where the artifact holds >= 10 % of the relevance
                held = [r for r in rs if m.startswith("SpRAy") and r["relevance share"] >= 0.10]
                if held:
                    meets[_target_key("SpRAy >= 2, ARI >= 0.8", m)] = bool(
                        all(r["clusters"] >= 2 and r["ARI"] >= 0.8 for r in held))
                if m.startswith("TCAV"):
                    meets["TCAV sign agrees"] = bool(all(r["sign agrees"] for r in rs))
            else:
                if m.startswith("EnD (defaults"):
                    # against vanilla trained the same way
                    base = next((by.get(v, van) for part, v in END_BASELINES.items()
                                 if part in m), van)
                    meets["EnD >= vanilla + 5"] = bool(
                        row["unbiased acc"] >= _mean(base, "unbiased acc") + 0.05)
                cut = 1 - row["cf bias"] / _mean(van, "cf bias")
                if m != "vanilla":
                    row["bias cut"] = cut
                if m.startswith("FMD"):
                    meets[_target_key("FMD bias -30 %", m)] = bool(
                        cut >= 0.30 and row["biased acc"] >= _mean(van, "biased acc") - 0.03)
            errors = [r["error"] for r in rs if r.get("error")]
            if errors:
                row["refused"] = f"{len(errors)} of {len(rs)}: {errors[0]}"
            warned = []
            for key, name in (("warned untrained", "UntrainedNetworkWarning"),
                              ("warned clean accuracy", "CleanAccuracyWarning"),
                              ("warned chance", "ChanceLevelWarning"),
                              ("warned saturated", "SaturatedPenaltyWarning"),
                              ("warned confidence", "ConfidenceOnlyWarning"),
                              ("warned weak clusters", "WeakClustersWarning")):
                n = sum(bool(r.get(key)) for r in rs)
                if n:
                    warned.append(f"{n} of {len(rs)}: {name}")
            if warned:
                row["warned"] = "; ".join(warned)
            row["meets"] = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in meets.items())
            row["targets"] = meets
            out.append(row)
    return out


def overall(summary, rows):
    """Every target over the whole zoo: met where it applies? (P-ClArC counted over runs.)"""
    res = {}
    for target in TARGETS:
        vals = [s["targets"][target] for s in summary if target in s["targets"]]
        res[target] = {"rows": len(vals), "met": int(sum(vals)),
                       "all met": bool(vals) and all(vals)}
    pc = [r for r in rows if r["method"].startswith("P-ClArC")]
    for name in ("P-ClArC", "P-ClArC (flatten)"):
        runs = [r for r in pc if r["method"] == name]
        if runs:
            res[f"{name} share of runs within 5 points"] = float(np.mean(
                [abs(r["clean acc"] - r["attacked acc"]) <= 0.05 for r in runs]))
    pc = [r for r in pc if r["method"] == "P-ClArC"]
    if pc:
        share = float(np.mean([abs(r["clean acc"] - r["attacked acc"]) <= 0.05 for r in pc]))
        res["P-ClArC gap <= 5"].update({"share of runs": share, "all met": share >= 2 / 3})
    return res


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 2 architectures, short training")
    parser.add_argument("--seeds", type=int, nargs="*", default=None)
    parser.add_argument("--archs", nargs="*", choices=ARCHS, default=None)
    parser.add_argument("--biases", nargs="*", choices=BIASES, default=None)
    parser.add_argument("--jobs", type=int, default=1,
                        help="processes over (architecture, bias, seed) configurations")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", default=None,
                        help="keep each configuration's rows in this folder and reuse those "
                             "found there (delete it after changing the code)")
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    archs = args.archs or (["small_cnn", "vgg_bn"] if args.quick else list(ARCHS))
    biases = args.biases or list(BIASES)
    # the slowest architectures first, so parallel jobs finish together
    cost = {"resnet": 0, "vgg_bn": 1, "gap_cnn": 2, "small_cnn": 3}
    configs = sorted([(a, b, s) for a in archs for b in biases for s in seeds],
                     key=lambda k: (cost.get(k[0], 9), BIASES.index(k[1]) == 2))
    start = time.perf_counter()
    if args.jobs > 1:
        from joblib import Parallel, delayed

        parts = Parallel(n_jobs=args.jobs)(
            delayed(run_cached)(args.cache_dir, a, b, s, args.quick, args.device)
            for a, b, s in configs)
    else:
        parts = [run_cached(args.cache_dir, a, b, s, args.quick, args.device)
                 for a, b, s in configs]
    rows = [r for part in parts for r in part]
    wall = time.perf_counter() - start
    summary = summarise(rows)
    columns = ["arch", "bias", "method", "clean acc", "attacked acc", "loss recovered",
               "relevance share", "clusters", "ARI", "confidence", "tcav", "reference tcav",
               "reference runs agreeing", "meets", "refused", "warned"]
    colour_columns = ["arch", "bias", "method", "biased acc", "unbiased acc", "cf bias",
                      "flip rate", "bias cut", "kept steps", "meets", "warned"]
    table = [{k: s.get(k) for k in columns} for s in summary if s["bias"] != "colour"]
    colour = [{k: s.get(k) for k in colour_columns} for s in summary if s["bias"] == "colour"]
    totals = overall(summary, rows)
    print("Targets over the zoo (rows where each applies):")
    for target, res in totals.items():
        if target not in TARGETS:
            print(f"  {target}: {100 * res:.0f} %")
            continue
        print(f"  {target:24s} {res['met']}/{res['rows']} rows"
              + (f", {100 * res['share of runs']:.0f} % of runs" if "share of runs" in res
                 else "") + f"  ({TARGETS[target]})")
    print()
    if colour:
        print(format_table(colour, columns=colour_columns, floatfmt=".2f",
                           title=f"Colour bias (rho {RHO}): EnD and FMD with their defaults"))
        print()
    emit("robustness", table,
         title=f"Zoo robustness: {len(configs)} configurations ({', '.join(archs)}; "
               f"{', '.join(biases)}; seeds {seeds}), means over seeds; {wall:.0f} s wall, "
               f"{args.jobs} job(s), device {args.device}" + (" [--quick]" if args.quick else ""),
         columns=columns,
         extra={"colour": colour, "runs": rows,
                "summary": [{k: v for k, v in s.items() if k != "targets"} for s in summary],
                "targets": TARGETS, "overall": totals, "wall s": wall, "quick": args.quick,
                "settings": settings(args.quick), "cache dir": args.cache_dir},
         floatfmt=".2f")
    return 0


if __name__ == "__main__":
    main()
