"""Fast Model Debiasing (FMD): influence-guided Newton unlearning on the last linear layer.

Chen et al., "Fast Model Debias with Machine Unlearning", NeurIPS 2023. With
counterfactual pairs ``(x, x_cf)`` that differ only in the bias attribute, the
bias is ``B = mean_i |p_y(x_i) - p_y(x_cf_i)|``. The last linear layer
``theta = [W | b]`` (``K x (d + 1)``) is updated by Newton steps
``theta <- theta + H^{-1} sum_k (grad L(z_k) - grad L(z_cf_k))`` over the pairs
whose swap is predicted (by influence) to lower ``B``, with the exact damped
Hessian of the softmax cross-entropy of that layer.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import numpy as np
import torch
from sklearn.base import ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted
from skorch.history import History

from .._utils._data import check_input, n_samples
from .._utils._hooks import layer_inputs
from .._utils._modules import resolve_linear
from .._utils._runtime import limit_threads
from .._utils._validation import check_choice, check_int, check_real, check_seed
from ..base import BaseNetworkEstimator, NetworkClassifierMixin, atomic_fit
from ..exceptions import ConfidenceOnlyWarning

__all__ = ["FastModelDebiaser", "softmax_cross_entropy_hessian"]

#: Largest number of last-layer parameters ``K * (d + 1)`` for the exact Hessian; with
#: ``solver="auto"`` larger heads use conjugate gradient on Hessian-vector products.
MAX_HESSIAN_SIZE = 12_000
SOLVERS = ("auto", "exact", "cg")
#: Up to this many last-layer parameters the unlearning algebra runs on one CPU thread: its
#: operations are so small that multi-threading costs more in synchronisation than it saves
#: (seconds instead of a fraction of one on a busy machine). Above it (e.g. SmallCNN's head,
#: 10 x 65 = 650 parameters) the Hessian products are large enough that two threads win: the
#: colored-digits fit took 0.41-0.43 s with 2 threads vs 0.53-0.54 s on one, on an idle 2-core machine.
SINGLE_THREAD_SIZE = 256
#: Smallest relative bias cut that is checked for being a loss of confidence only.
MIN_CHECKED_CUT = 0.1


# ------------------------------------------------------------------ linear-layer algebra
def _augment(F):
    """Features with a trailing column of ones (for the bias of the layer)."""
    return torch.cat([F, F.new_ones(F.shape[0], 1)], dim=1)


def _probs(theta, Fa):
    return torch.softmax(Fa @ theta.T, dim=1)


def softmax_cross_entropy_hessian(features, weight, bias=None, damping=0.0):
    """Exact Hessian of the summed softmax cross-entropy of a linear layer.

    For logits ``z_i = W x_i + b`` and ``p_i = softmax(z_i)``, with parameters
    ``theta = [W | b]`` flattened row by row (``theta[k * (d + 1) + j]`` is
    ``W[k, j]``, and ``j = d`` the bias ``b[k]``) and ``x~_i = [x_i, 1]``::

        H = sum_i (diag(p_i) - p_i p_i^T) kron (x~_i x~_i^T) + damping * n * I

    It does not depend on the labels. Built in ``O(n (K (d + 1))^2)`` as
    ``blockdiag_k(X~^T diag(p_k) X~) - Q^T Q`` with ``Q_i = p_i kron x~_i``.

    Parameters
    ----------
    features : torch.Tensor of shape (n, d)
        Inputs of the layer.
    weight : torch.Tensor of shape (K, d)
    bias : torch.Tensor of shape (K,) or None
        ``None`` for a layer without bias: the Hessian is then over ``W`` only
        (``K * d`` parameters).
    damping : float >= 0, default=0.0
        ``lambda``; ``lambda * n`` is added to the diagonal.

    Returns
    -------
    H : torch.Tensor of shape (P, P), float64, ``P = K (d + 1)`` (or ``K d``)

    Examples
    --------
    >>> import torch
    >>> from skdebias.correction import softmax_cross_entropy_hessian
    >>> H = softmax_cross_entropy_hessian(torch.randn(5, 3), torch.randn(4, 3), torch.zeros(4))
    >>> H.shape
    torch.Size([16, 16])
    """
    F = torch.as_tensor(features).detach().to(torch.float64)
    W = torch.as_tensor(weight).detach().to(torch.float64)
    if bias is not None:
        theta = torch.cat([W, torch.as_tensor(bias).detach().to(torch.float64)[:, None]], dim=1)
        Fa = _augment(F)
    else:
        theta, Fa = W, F
    return _hessian(theta, Fa, float(damping))


def _hessian(theta, Fa, damping):
    """Damped Hessian; built in the dtype of ``Fa`` (float32 internally for speed)."""
    n, m = Fa.shape
    K = theta.shape[0]
    P = _probs(theta, Fa)
    H = torch.zeros(K * m, K * m, dtype=Fa.dtype, device=Fa.device)
    for k in range(K):
        H[k * m:(k + 1) * m, k * m:(k + 1) * m] = (Fa * P[:, k:k + 1]).T @ Fa
    Q = (P[:, :, None] * Fa[:, None, :]).reshape(n, K * m)
    H -= Q.T @ Q
    if damping:
        H.diagonal().add_(damping * n)
    return H


class _HessianBuilder:
    """Damped Hessians (see :func:`_hessian`) of fixed features ``Fa`` at changing ``theta``.

    Block ``(k, l)`` of the Hessian is ``sum_i w_kl(i) x~_i x~_i^T`` with
    ``w_kl = delta_kl p_k - p_k p_l``. For small layers the products
    ``x~_ia x~_ib`` (``a <= b``) are computed once, so each Hessian costs one
    ``(K (K + 1) / 2, n) x (n, m (m + 1) / 2)`` product (both symmetries used),
    about half the work of :func:`_hessian`'s ``Q^T Q``; larger layers, whose
    products would not fit in ``max_products`` floats, use :func:`_hessian`.
    """

    def __init__(self, Fa, K, damping, max_products=4_000_000):
        n, m = Fa.shape
        self.Fa, self.K, self.damping = Fa, K, damping
        self.Z = None
        if n * m * (m + 1) // 2 <= max_products:
            self.iu, self.ju = torch.triu_indices(m, m)
            self.ku, self.lu = torch.triu_indices(K, K)
            self.on_diagonal = self.ku == self.lu
            self.Z = Fa[:, self.iu] * Fa[:, self.ju]

    def __call__(self, theta):
        if self.Z is None:
            return _hessian(theta, self.Fa, self.damping)
        Fa, K = self.Fa, self.K
        n, m = Fa.shape
        P = _probs(theta, Fa)
        Wkl = -P[:, self.ku] * P[:, self.lu]
        Wkl[:, self.on_diagonal] += P
        A = Wkl.T @ self.Z  # (pairs of classes, pairs of features)
        blocks = Fa.new_empty(len(self.ku), m, m)
        blocks[:, self.iu, self.ju] = A
        blocks[:, self.ju, self.iu] = A
        H = Fa.new_empty(K * m, K * m)
        H4 = H.view(K, m, K, m)
        H4[self.ku, :, self.lu, :] = blocks
        H4[self.lu, :, self.ku, :] = blocks
        if self.damping:
            H.diagonal().add_(self.damping * n)
        return H


class _HessianOperator:
    """Products with the damped Hessian of :func:`_hessian`, never forming it.

    For ``V`` of shape ``(K, m)`` (``theta``-shaped), with ``Z = Fa V^T`` (the change of the
    logits along ``V``) and ``S = P o Z - P o rowsum(P o Z)`` (each row ``(diag(p_i) -
    p_i p_i^T) z_i``), ``H V = S^T Fa + damping * n * V``: two ``(n, m) x (m, K)``-sized
    products and ``O(n K)`` memory, against ``(K m)^2`` for the Hessian.
    """

    def __init__(self, Fa, damping):
        self.Fa, self.damping = Fa, damping
        self.P = None

    def at(self, theta):
        """Use the probabilities of the layer ``theta`` (in the dtype of ``Fa``)."""
        self.P = _probs(theta.to(self.Fa.dtype), self.Fa)
        return self

    def __call__(self, V):
        Fa, P = self.Fa, self.P
        PZ = P * (Fa @ V.T)
        S = PZ - P * PZ.sum(dim=1, keepdim=True)
        HV = S.T @ Fa
        if self.damping:
            HV += (self.damping * Fa.shape[0]) * V
        return HV


def _conjugate_gradient(hvp, b, x0=None, tol=1e-4, max_iter=100):
    """``(x, n_iter)`` with ``H x = b`` for symmetric positive (semi-)definite ``H``.

    ``hvp(V)`` returns ``H V`` for ``V`` shaped like ``b``; stops when
    ``||b - H x|| <= tol ||b||`` or after ``max_iter`` products. Started from zero, a
    consistent singular system (no damping: the softmax Hessian is flat along a shift of
    all logits, and ``b`` is orthogonal to it) converges to the least-squares solution.
    """
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0:
        return torch.zeros_like(b), 0
    if x0 is None:
        x = torch.zeros_like(b)
        r = b.clone()
    else:
        x = x0.clone()
        r = b - hvp(x)
    p = r.clone()
    rs = float((r * r).sum())
    target = (tol * b_norm) ** 2
    n_iter = 0
    while rs > target and n_iter < max_iter:
        Hp = hvp(p)
        curvature = float((p * Hp).sum())
        if curvature <= 0.0:  # numerically singular direction: stop with the current iterate
            break
        alpha = rs / curvature
        x.add_(p, alpha=alpha)
        r.sub_(Hp, alpha=alpha)
        rs_new = float((r * r).sum())
        p.mul_(rs_new / rs).add_(r)
        rs = rs_new
        n_iter += 1
    return x, n_iter


def _loss_gradient_dots(theta, Fa, y, V):
    """``(grad L(z_i) . V)_i`` for every sample, without the ``(n, K m)`` per-sample gradients.

    ``grad L(z_i) = (p_i - e_{y_i}) kron x~_i``, so the product is
    ``sum_k (p_i - e_{y_i})_k (V x~_i)_k``.
    """
    R = _probs(theta, Fa)
    R[torch.arange(len(y)), y] -= 1.0
    return (R * (Fa @ V.T)).sum(dim=1)


def _loss_gradient_sum(theta, Fa, y):
    """``sum_i grad L(z_i)`` as a ``theta``-shaped ``(K, m)`` matrix, ``(P - Y)^T Fa``."""
    R = _probs(theta, Fa)
    R[torch.arange(len(y)), y] -= 1.0
    return R.T @ Fa


def _loss_gradients(theta, Fa, y):
    """Per-sample gradients of the cross-entropy, (n, K * m)."""
    P = _probs(theta, Fa)
    R = P.clone()
    R[torch.arange(len(y)), y] -= 1.0
    return (R[:, :, None] * Fa[:, None, :]).reshape(len(y), -1)


def _bias_and_gradient(theta, Fa, Fa_cf, y):
    """``B = mean |p_y(x) - p_y(x_cf)|`` and its gradient with respect to theta (flat)."""
    rows = torch.arange(len(y))
    P, P_cf = _probs(theta, Fa), _probs(theta, Fa_cf)
    py, py_cf = P[rows, y], P_cf[rows, y]
    sign = torch.sign(py - py_cf)

    def grad_py(Pm, py_m):
        # d p_y / d theta = p_y (e_y - p) kron x~: the rows R_i of (n, K), paired with x~_i
        R = -Pm * py_m[:, None]
        R[rows, y] += py_m
        return sign[:, None] * R

    # mean_i sign_i (R_i kron x~_i - R_cf_i kron x~_cf_i) as two (K, n) x (n, m) products:
    # per-sample gradients would take n K m floats (6.5 GB for a 2048 -> 1000 head)
    G = grad_py(P, py).T @ Fa - grad_py(P_cf, py_cf).T @ Fa_cf
    return float((py - py_cf).abs().mean()), G.reshape(-1) / len(y)


def _evaluate(theta, Fa, Fa_cf, y):
    """(bias, accuracy on the factual images) of the layer ``theta``."""
    rows = torch.arange(len(y))
    P, P_cf = _probs(theta, Fa), _probs(theta, Fa_cf)
    bias = float((P[rows, y] - P_cf[rows, y]).abs().mean())
    acc = float((P.argmax(dim=1) == y).double().mean())
    return bias, acc


def _decisions(theta, Fa, Fa_cf):
    """(flip rate, mean top-class probability of the factual images) of the layer ``theta``."""
    P, P_cf = _probs(theta, Fa), _probs(theta, Fa_cf)
    flip = float((P.argmax(dim=1) != P_cf.argmax(dim=1)).double().mean())
    return flip, float(P.max(dim=1).values.mean())


def _factor(H):
    """Cholesky factor of the symmetric positive definite ``H`` (``None`` if it is not PD)."""
    L, info = torch.linalg.cholesky_ex(H)
    return L if int(info) == 0 else None


def _solve(H, L, g):
    """``H^{-1} g`` with the Cholesky factor ``L`` (least squares when ``L`` is None).

    Computed in the dtype of ``H`` and returned in the dtype of ``g``.
    """
    rhs = g.reshape(-1, 1).to(H.dtype)
    if L is not None:
        return torch.cholesky_solve(rhs, L).reshape(-1).to(g.dtype)
    return torch.linalg.lstsq(H, rhs).solution.reshape(-1).to(g.dtype)


# ------------------------------------------------------------------ validation helpers
class FastModelDebiaser(ClassifierMixin, NetworkClassifierMixin, BaseNetworkEstimator):
    """Fast Model Debiasing (FMD): remove a bias by unlearning on the last linear layer.

    Given counterfactual pairs ``(X[i], X_cf[i])`` that differ only in the bias
    attribute (e.g. the same digit in another colour), the bias of the network is
    ``B = mean_i |p_y(x_i) - p_y(x_cf_i)|``. FMD

    1. records the features entering the last linear layer ``theta = [W | b]``
       (``K`` classes, ``d`` features) for both images of every pair;
    2. builds the exact damped Hessian of the softmax cross-entropy of that layer
       over both images of the fitting pairs,
       ``H = sum_i (diag(p_i) - p_i p_i^T) kron (x~_i x~_i^T) + damping * n * I``
       (see :func:`softmax_cross_entropy_hessian`); for heads above 12,000
       parameters (``solver="auto"``) it is never formed: the solves
       ``H^{-1} g`` below run by conjugate gradient on Hessian-vector products;
    3. scores each pair by the predicted change of ``B`` when ``x_k`` is unlearnt
       and ``x_cf_k`` learnt, ``grad B^T H^{-1} (grad L(x_k) - grad L(x_cf_k))``;
    4. takes the Newton step ``theta <- theta + step_size * H^{-1} sum_k
       (grad L(x_k) - grad L(x_cf_k))`` over the pairs with a negative score,
       and accepts it only if the bias on the held-out pairs falls and the
       accuracy on their factual images stays within ``max_accuracy_drop`` of the
       original network's; otherwise the step is halved (up to ``max_halvings``
       times) and the procedure stops when no step is accepted.

    Only the last layer changes, so features are extracted once: the cost is one
    forward pass over the pairs plus a few ``K (d + 1)``-sized solves (seconds on
    a CPU). The network is never modified: ``estimator_`` is a copy.

    Parameters
    ----------
    estimator : torch.nn.Module or skorch.NeuralNet
        The network to debias; its last linear layer must output the logits.
    layer : str or None, default=None
        Name of the :class:`torch.nn.Linear` layer to update; ``None`` picks the
        last one.
    damping : float >= 0, default=1.0
        ``lambda`` of the damped Hessian (``lambda * n`` added to its diagonal).
        Larger values give shorter, more gradient-like steps.
    step_size : float > 0, default=1.0
        Scale of the first try of every Newton step.
    max_iter : int >= 1, default=10
        Maximum number of accepted unlearning steps.
    max_halvings : int >= 0, default=8
        How often a rejected step is halved before giving up. After an accepted
        step the next one starts from twice the accepted length (at most
        ``step_size``).
    max_accuracy_drop : float in [0, 1] or None, default=0.02
        Accuracy guard: a step whose in-distribution accuracy (on the factual
        images of the held-out pairs) is more than this below the original
        network's (0.02 = 2 points) is rejected. ``None``: no guard. With the
        defaults the held-out pairs are 100 images, one image a point: on new
        data the accuracy can fall by more (more pairs or a larger
        ``validation_fraction`` make the guard finer).
    refresh_hessian : bool, default=True
        Rebuild the Hessian at the current parameters before every step (exact
        Newton steps). ``False`` keeps the Hessian of the original layer (one
        build and factorisation, as in the one-shot update of the paper).
    solver : {"auto", "exact", "cg"}, default="auto"
        How ``H^{-1} g`` is computed. ``"exact"``: the Hessian is built and
        Cholesky-factorised (heads up to ``MAX_HESSIAN_SIZE`` = 12,000 parameters).
        ``"cg"``: conjugate gradient on Hessian-vector products, never forming
        ``H`` (memory ``O(n (K + d))``; any head size, e.g. resnet50's 2048 -> 1000).
        ``"auto"``: exact up to ``MAX_HESSIAN_SIZE`` parameters, cg above.
    cg_tol : float > 0, default=1e-4
        Conjugate gradient stops when ``||g - H x|| <= cg_tol ||g||``.
    cg_max_iter : int >= 1, default=100
        Most Hessian-vector products per conjugate gradient solve.
    n_pairs : int >= 2, default=500
        Number of counterfactual pairs used (a random subset when more are given).
    validation_fraction : float in [0, 1), default=0.2
        Fraction of the pairs held out for the acceptance test; with ``0`` the
        fitting pairs are used.
    counterfactual : callable or None, default=None
        ``X -> X_cf``, used when ``fit`` gets no ``X_cf``.
    batch_size : int, default=256
        Batch size of the feature extraction.
    device : str or torch.device, default="auto"
    num_workers : int, default=0
        DataLoader worker processes that read a Dataset input (0: read in this
        process); arrays and tensors are sliced per batch. See docs/parameters.md.
    precision : {"float32", "bfloat16", "float16"}, default="float32"
        Arithmetic of the network's forward passes that compute the last layer's inputs
        (torch autocast); ``"float16"`` needs CUDA. The Newton steps on the head run in float64.
    random_state : int, RandomState instance or None, default=None
        Seeds the subset of pairs and the held-out split.
    verbose : int, default=0
        0: silent; 1 or more: progress bars over the long steps (tqdm).

    Attributes
    ----------
    estimator_ : torch.nn.Module or skorch.NeuralNet
        The debiased copy of ``estimator``.
    module_ : torch.nn.Module
        Its module.
    layer_ : str
        Name of the updated linear layer.
    classes_ : ndarray
        ``arange(K)``, the network's output indices.
    bias_before_, bias_after_ : float
        Bias on the held-out pairs before and after unlearning.
    accuracy_before_, accuracy_after_ : float
        Accuracy on the factual images of the held-out pairs.
    flip_rate_before_, flip_rate_after_ : float
        Share of the held-out pairs whose predicted class changes with the bias
        attribute (:func:`skdebias.metrics.counterfactual_flip_rate`). Unlike the
        bias, it does not fall when the network only grows less confident; a
        :class:`~skdebias.exceptions.ConfidenceOnlyWarning` says when the bias
        fell by 10 % or more, less than half of that cut shows in the flip rate
        and the confidence fell.
    confidence_before_, confidence_after_ : float
        Mean top-class probability on the factual images of the held-out pairs.
    n_steps_ : int
        Number of accepted unlearning steps.
    n_iter_ : int
        Number of unlearning iterations run (accepted or not).
    history_ : skorch.history.History
        A list with one dict per tried step: ``step``, ``step_size``, ``n_selected``,
        ``bias_fit``, ``bias_val``, ``accuracy_val``, ``accepted``.
    fit_time_ : float
        Wall time of :meth:`fit` in seconds.
    solver_ : str
        The solver used, ``"exact"`` or ``"cg"``.
    n_cg_iter_ : int
        Hessian-vector products over all conjugate gradient solves (0 with ``"exact"``).
    n_features_in_ : int
        Only for 2-d input ``(n, n_features)``.

    See Also
    --------
    skdebias.metrics.counterfactual_bias : The bias ``B`` of any network.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from skdebias.correction import FastModelDebiaser
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> X = np.random.RandomState(0).randn(60, 4).astype("float32")
    >>> X_cf = X.copy(); X_cf[:, 3] *= -1          # flip the "bias" feature
    >>> y = np.random.RandomState(1).randint(0, 3, 60)
    >>> fmd = FastModelDebiaser(net, random_state=0).fit(X, y, X_cf=X_cf)
    >>> fmd.bias_after_ <= fmd.bias_before_
    True
    """

    def __init__(self, estimator, layer=None, damping=1.0, step_size=1.0, max_iter=10,
                 max_halvings=8, max_accuracy_drop=0.02, refresh_hessian=True, solver="auto",
                 cg_tol=1e-4, cg_max_iter=100, n_pairs=500, validation_fraction=0.2,
                 counterfactual=None, batch_size=256, device="auto", random_state=None,
                 verbose=0, precision="float32", num_workers=0):
        super().__init__(estimator, batch_size, device, verbose, precision=precision,
                         num_workers=num_workers)
        self.layer = layer
        self.damping = damping
        self.step_size = step_size
        self.max_iter = max_iter
        self.max_halvings = max_halvings
        self.max_accuracy_drop = max_accuracy_drop
        self.refresh_hessian = refresh_hessian
        self.solver = solver
        self.cg_tol = cg_tol
        self.cg_max_iter = cg_max_iter
        self.n_pairs = n_pairs
        self.validation_fraction = validation_fraction
        self.counterfactual = counterfactual
        self.random_state = random_state

    # ---------------------------------------------------------------- validation
    def _check_params(self):
        check_real("damping", self.damping, low=0.0)
        check_real("step_size", self.step_size, low=0.0, low_open=True)
        check_int("max_iter", self.max_iter)
        check_int("max_halvings", self.max_halvings, low=0)
        if self.max_accuracy_drop is not None:
            check_real("max_accuracy_drop", self.max_accuracy_drop, low=0, high=1)
        check_choice("solver", self.solver, SOLVERS)
        check_real("cg_tol", self.cg_tol, low=0.0, low_open=True)
        check_int("cg_max_iter", self.cg_max_iter)
        check_int("n_pairs", self.n_pairs, low=2)
        check_real("validation_fraction", self.validation_fraction, low=0.0, high=1.0, high_open=True)
        check_int("batch_size", self.batch_size)
        check_seed("random_state", self.random_state)
        if self.counterfactual is not None and not callable(self.counterfactual):
            raise ValueError(
                f"counterfactual must be a callable X -> X_cf or None, got {self.counterfactual!r}.")

    def _labels(self, y, n, K, name="y"):
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target {name} is None.")
        y = np.asarray(y.detach().cpu() if isinstance(y, torch.Tensor) else y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()
        if y.ndim != 1 or len(y) != n:
            raise ValueError(f"{name} must be a 1-d array with {n} labels, got shape {y.shape}.")
        if not np.issubdtype(y.dtype, np.integer):
            if (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y))
                    and np.all(y == np.round(y))):
                y = y.astype(np.int64)
            else:
                raise ValueError(
                    f"{name} must hold integer class indices of the network's outputs "
                    f"(0..{K - 1}), got dtype {y.dtype}.")
        if len(y) and (y.min() < 0 or y.max() >= K):
            raise ValueError(
                f"{name} must hold class indices of the network's outputs in [0, {K - 1}], "
                f"got values in [{y.min()}, {y.max()}].")
        return y.astype(np.int64)

    # ---------------------------------------------------------------- features
    def _features(self, X, indices=None, desc="features", check_output=False):
        """Inputs of the last layer (float64, CPU) for ``X`` (optionally a subset)."""
        hint = ("FastModelDebiaser needs the last linear layer to produce the logits."
                if check_output else None)
        with self._autocast(self.device_):
            return layer_inputs(self.module_, self.layer_, X, self.batch_size, self.device_,
                                indices=indices, check_output=hint, verbose=self.verbose,
                                desc=desc).double()

    # ---------------------------------------------------------------- fit
    @atomic_fit
    def fit(self, X, y, X_cf=None, y_cf=None):
        """Unlearn the bias shown by the counterfactual pairs ``(X, X_cf)``.

        Parameters
        ----------
        X : array-like or tensor of shape (n, C, H, W) (or (n, n_features))
            Factual images.
        y : array-like of shape (n,)
            Their classes (indices of the network's outputs).
        X_cf : array-like or tensor of the same shape as ``X``, optional
            ``X_cf[i]`` is ``X[i]`` with another bias attribute. Required unless
            ``counterfactual`` is set.
        y_cf : array-like of shape (n,), optional
            Classes of the counterfactual images; defaults to ``y`` (a change of the
            bias attribute keeps the class).

        Returns
        -------
        self : FastModelDebiaser
        """
        start = time.perf_counter()
        self._check_params()
        X = self._validate_X(X, reset=True)
        shape = self.input_shape_
        if X_cf is None:
            if self.counterfactual is None:
                raise ValueError(
                    "FastModelDebiaser needs counterfactual pairs: pass fit(X, y, X_cf=...) "
                    "(X_cf[i] = X[i] with another bias attribute) or set counterfactual=callable.")
            X_cf = self.counterfactual(X)
        X_cf, shape_cf = check_input(X_cf, name="X_cf")
        n = n_samples(X)
        if n_samples(X_cf) != n or shape_cf != shape:
            raise ValueError(
                f"The counterfactual set must match X (one counterfactual per sample): X has "
                f"{n} samples of shape {shape}, X_cf has {n_samples(X_cf)} samples of shape "
                f"{shape_cf}.")
        if n < 2:
            raise ValueError(
                f"FastModelDebiaser needs at least 2 counterfactual pairs, got n_samples={n}.")

        self.device_ = self._resolve_device()
        self.estimator_, self.module_ = self._copy_network(self.device_)
        self.layer_, lin = resolve_linear(self.module_, self.layer, type(self).__name__)
        K, d = lin.out_features, lin.in_features
        has_bias = lin.bias is not None
        size = K * (d + int(has_bias))
        if self.solver == "exact" and size > MAX_HESSIAN_SIZE:
            raise ValueError(
                f"The layer {self.layer_!r} has {size} parameters; the exact Hessian "
                f"({size}x{size}) is too large (limit {MAX_HESSIAN_SIZE}). Use solver='cg' "
                "(or 'auto'), which never forms it.")
        solver = self.solver
        if solver == "auto":
            solver = "exact" if size <= MAX_HESSIAN_SIZE else "cg"
        self.classes_ = np.arange(K)
        y = self._labels(y, n, K)
        y_cf = y if y_cf is None else self._labels(y_cf, n, K, name="y_cf")

        # pairs: a random subset, then a held-out split
        rng = check_random_state(self.random_state)
        idx = rng.permutation(n)[:min(n, self.n_pairs)]
        n_val = int(round(self.validation_fraction * len(idx)))
        n_val = min(n_val, len(idx) - 1)
        val_idx, fit_idx = idx[:n_val], idx[n_val:]
        if n_val == 0:
            val_idx = fit_idx

        all_idx = np.concatenate([fit_idx, val_idx]) if n_val else fit_idx
        F = self._features(X, np.sort(all_idx), check_output=True)
        F_cf = self._features(X_cf, np.sort(all_idx), desc="counterfactual features")
        if has_bias:
            F, F_cf = _augment(F), _augment(F_cf)
        pos = {int(i): k for k, i in enumerate(np.sort(all_idx))}
        fi = torch.as_tensor([pos[int(i)] for i in fit_idx])
        vi = torch.as_tensor([pos[int(i)] for i in val_idx])
        Ff, Ff_cf, yf, yf_cf = F[fi], F_cf[fi], torch.as_tensor(y[fit_idx]), \
            torch.as_tensor(y_cf[fit_idx])
        Fv, Fv_cf, yv = F[vi], F_cf[vi], torch.as_tensor(y[val_idx])

        W = lin.weight.detach().to("cpu", torch.float64)
        theta0 = torch.cat([W, lin.bias.detach().to("cpu", torch.float64)[:, None]], 1) \
            if has_bias else W
        self.n_pairs_ = len(idx)
        algebra = limit_threads(1) if size <= SINGLE_THREAD_SIZE else contextlib.nullcontext()
        with algebra:
            theta = self._unlearn(theta0, Ff, Ff_cf, yf, yf_cf, Fv, Fv_cf, yv, solver)
        if self.n_steps_:
            with torch.no_grad():
                if has_bias:
                    lin.weight.copy_(theta[:, :-1].to(lin.weight))
                    lin.bias.copy_(theta[:, -1].to(lin.bias))
                else:
                    lin.weight.copy_(theta.to(lin.weight))
        self._theta0 = theta0
        self._has_bias = has_bias
        self.solver_ = solver
        self.fit_time_ = time.perf_counter() - start
        return self

    def _unlearn(self, theta0, Ff, Ff_cf, yf, yf_cf, Fv, Fv_cf, yv, solver="exact"):
        """The unlearning loop on the last-layer parameters; returns the final ``theta``."""
        # bias pairs use the factual label for both images (the definition of B)
        F_both32 = torch.cat([Ff, Ff_cf]).float()
        theta = theta0.clone()
        damping = float(self.damping)

        bias_val, acc_val = _evaluate(theta, Fv, Fv_cf, yv)
        self.bias_before_, self.accuracy_before_ = bias_val, acc_val
        self.flip_rate_before_, self.confidence_before_ = _decisions(theta, Fv, Fv_cf)
        self.history_ = History()
        self.n_steps_ = 0
        self._influence_direction = None
        H = L = None
        self.n_cg_iter_ = 0
        if solver == "cg":
            # float32 products with damping, as the exact path factorises in float32; without
            # damping (singular Hessian) in float64, as the exact path falls back to float64
            cg_dtype = torch.float32 if damping > 0 else torch.float64
            hvp = _HessianOperator(torch.cat([Ff, Ff_cf]).to(cg_dtype), damping)
            x_v = x_delta = None  # warm starts: the previous step's solutions
        else:
            # the precomputed products pay off only over several Hessians
            hessian = _HessianBuilder(F_both32, theta.shape[0], damping,
                                      max_products=4_000_000 if self.refresh_hessian else 0)

        def solve(g, x0):
            """``H^{-1} g`` for a theta-shaped ``g`` (cg) or its flat form (exact)."""
            g = g.reshape(theta.shape).to(cg_dtype)
            x, n_iter = _conjugate_gradient(hvp, g, x0, tol=float(self.cg_tol),
                                            max_iter=int(self.cg_max_iter))
            self.n_cg_iter_ += n_iter
            return x

        eta = float(self.step_size)
        self.n_iter_ = 0
        for step in range(int(self.max_iter)):
            self.n_iter_ = step + 1
            bias_fit, grad_b = _bias_and_gradient(theta, Ff, Ff_cf, yf)
            if solver == "cg":
                if hvp.P is None or self.refresh_hessian:
                    hvp.at(theta)
                x_v = solve(grad_b, x_v)
                v = x_v.reshape(-1).to(grad_b.dtype)  # H^{-1} grad B
            else:
                if H is None or self.refresh_hessian:
                    # built in float32; with damping (eigenvalues >= damping * n) also
                    # factorised and solved in float32: the entries carry float32 rounding
                    # either way, so a float64 factor would not make the solves more exact.
                    # Without damping (the softmax Hessian is singular along a shift of all
                    # logits), or if float32 cannot factorise it, in float64
                    H = hessian(theta.float())
                    L = _factor(H) if damping > 0 else None
                    if L is None:
                        H = H.double()
                        L = _factor(H)
                v = _solve(H, L, grad_b)  # H^{-1} grad B
            if self._influence_direction is None:
                self._influence_direction = v.clone()
            if bias_fit <= 1e-12 or not bool(torch.any(grad_b != 0)):
                break
            # predicted change of B per pair swap, (grad L(x_k) - grad L(x_cf_k)) . v, in
            # closed form (per-sample gradients would take n K (d + 1) floats)
            V = v.reshape(theta.shape)
            scores = (_loss_gradient_dots(theta, Ff, yf, V)
                      - _loss_gradient_dots(theta, Ff_cf, yf_cf, V))
            selected = scores < 0
            n_sel = int(selected.sum())
            if n_sel == 0:
                break
            g_sel = (_loss_gradient_sum(theta, Ff[selected], yf[selected])
                     - _loss_gradient_sum(theta, Ff_cf[selected], yf_cf[selected]))
            if solver == "cg":
                x_delta = solve(g_sel, x_delta)
                delta = x_delta.to(theta.dtype)
            else:
                delta = _solve(H, L, g_sel.reshape(-1)).reshape(theta.shape)
            accepted = False
            for _ in range(int(self.max_halvings) + 1):
                candidate = theta + eta * delta
                b_new, a_new = _evaluate(candidate, Fv, Fv_cf, yv)
                ok = (b_new < bias_val - 1e-9
                      and (self.max_accuracy_drop is None
                           or a_new >= self.accuracy_before_ - self.max_accuracy_drop - 1e-12))
                self.history_.append({
                    "step": step, "step_size": eta, "n_selected": n_sel, "bias_fit": bias_fit,
                    "bias_val": b_new, "accuracy_val": a_new, "accepted": ok})
                if ok:
                    theta, bias_val, acc_val = candidate, b_new, a_new
                    accepted = True
                    self.n_steps_ += 1
                    break
                eta /= 2.0
            if not accepted:
                break
            # after an accepted step, first try a step twice as long (at most step_size)
            eta = min(2.0 * eta, float(self.step_size))
        self.bias_after_, self.accuracy_after_ = bias_val, acc_val
        self.flip_rate_after_, self.confidence_after_ = _decisions(theta, Fv, Fv_cf)
        self._check_confidence_only()
        return theta

    def _check_confidence_only(self):
        """Warn when the bias cut is mostly a loss of confidence (decisions unchanged)."""
        if self.bias_before_ <= 0 or self.flip_rate_before_ <= 0:
            return
        bias_cut = 1.0 - self.bias_after_ / self.bias_before_
        flip_cut = 1.0 - self.flip_rate_after_ / self.flip_rate_before_
        if (bias_cut < MIN_CHECKED_CUT or flip_cut >= bias_cut / 2
                or self.confidence_after_ >= self.confidence_before_):
            return
        warnings.warn(
            f"FastModelDebiaser cut the counterfactual bias of the held-out pairs by "
            f"{bias_cut:.0%} ({self.bias_before_:.3f} -> {self.bias_after_:.3f}) mostly by "
            f"making the network less confident (mean top-class probability "
            f"{self.confidence_before_:.2f} -> {self.confidence_after_:.2f}): the predicted "
            f"class still changes with the bias attribute on {self.flip_rate_after_:.0%} of "
            f"those pairs ({self.flip_rate_before_:.0%} before), so bias_after_ overstates the "
            "debiasing (see flip_rate_after_ and skdebias.metrics.counterfactual_flip_rate). "
            "A last-layer edit cannot remove a bias that the features alone carry: allow "
            f"longer steps with a larger max_accuracy_drop (now {self.max_accuracy_drop}) or "
            "retrain the features (e.g. EnDClassifier).",
            ConfidenceOnlyWarning, stacklevel=5)

    # ---------------------------------------------------------------- identification
    def influence_on_bias(self, X_train, y_train):
        """Influence of each training sample on the bias of the original network.

        ``I(z) = -grad_theta B^T H^{-1} grad_theta L(z)`` (Koh & Liang), with
        ``H`` and ``grad B`` of the original last layer as computed in :meth:`fit`.
        Removing sample ``z`` from training changes the bias by about ``-I(z)``:
        the highest scores mark the samples that induce the bias most (the
        identification step of FMD).

        Parameters
        ----------
        X_train : array-like or tensor (n, C, H, W)
        y_train : array-like of shape (n,)

        Returns
        -------
        scores : ndarray of shape (n,), float64
            Rank with ``np.argsort(-scores)``.
        """
        check_is_fitted(self, "history_")
        X_train = self._validate_X(X_train, reset=False, name="X_train")
        n = n_samples(X_train)
        y_train = self._labels(y_train, n, len(self.classes_), name="y_train")
        # the features are those of the original network: only the last layer changed
        F = self._features(X_train, desc="training features")
        if self._has_bias:
            F = _augment(F)
        V = self._influence_direction.reshape(self._theta0.shape)
        return (-_loss_gradient_dots(self._theta0, F, torch.as_tensor(y_train), V)).numpy()
