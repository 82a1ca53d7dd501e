"""Bad input to every public estimator and metric.

Hypothesis strategies over shapes, dtypes, labels and hyperparameters. Every
case asserts the error class, that the message names the argument (and, for
parameters, what is allowed) and that no bare torch / numpy / skorch error
escapes: the innermost frame of the traceback is not inside those libraries.
Inputs that must be accepted (uint8 images, negative strides, big-endian
floats, lists) give the same result as the equivalent float32 array.
"""

import numbers
import re
import traceback
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skdebias import (
    ActivationExtractor,
    CAVEstimator,
    ClassArtifactCompensator,
    FastModelDebiaser,
    GradientPenaltyCorrector,
    SpectralRelevanceAnalysis,
    SpuriosityHeadFinetuner,
    SpuriosityRanker,
    cav_alignment,
    metrics,
    spatial_mean_tcav,
    tcav_score,
)
from skdebias.correction import EnDClassifier, GroupBalancedClassifier
from skdebias.models import SmallCNN

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


FEW, SOME, MORE = _settings(3), _settings(8), _settings(20)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks: one thread is much faster than two on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ tiny data, built once
torch.manual_seed(0)
NET = SmallCNN(n_classes=3, width=4, hidden=8).eval()  # 3 x 12 x 12 images, 3 classes
LAYER = "features.6"  # 16 channels
N_CHANNELS = 16
SHAPE = (3, 12, 12)
_RNG = np.random.RandomState(0)
X0 = _RNG.rand(8, *SHAPE).astype(np.float32)
Y0 = np.arange(8) % 3
C0 = np.arange(8) % 2
A0 = _RNG.rand(12, 5)
YA = np.arange(12) % 3
CA = np.arange(12) % 2
NAN, INF = float("nan"), float("inf")


def _images(n, seed=0):
    return np.random.RandomState(seed).rand(n, *SHAPE).astype(np.float32)


def _len(X):
    try:
        return len(X)
    except TypeError:  # an IterableDataset
        return 0


def _labels(n):
    return np.arange(n) % 3


def _concepts(n):
    return np.arange(n) % 2


def _skorch(cls, **params):
    torch.manual_seed(0)
    return cls(SmallCNN, **{"module__n_classes": 3, "module__width": 4, "module__hidden": 8,
                            "max_epochs": 1, "batch_size": 4, "train_split": None, "verbose": 0,
                            **params})


def _flat(*parts):
    return np.concatenate([np.ravel(np.asarray(p, dtype=np.float64)) for p in parts])


# ------------------------------------------------------------------ assertions
_BARE = re.compile(r"(^|[/\\])(torch|numpy|skorch)[/\\]")
#: words of a message that says what is allowed ("must be ...", "choose one of ...", "closest
#: valid names ...", "cav has 3 dimensions but layer ... has 16 channels", "classes in y: ...")
_ALLOWED = re.compile(r"\bmust\b|choose one of|\bvalid\b|\bexpect|\bclosest\b|\bgive\b"
                      r"|\bbut\b.* has \d|\bin y\b|\bamong\b", re.IGNORECASE)


def _names(message, name):
    """Whether ``message`` names the argument ``name`` (as a word, e.g. not X inside X_cf)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


def _raises(expected, names, call, sample=None, allowed=False):
    """``call()`` raises ``expected``; its message names one of ``names`` (and ``sample``,
    and with ``allowed`` what is allowed); the innermost frame is not torch / numpy / skorch
    code (no bare library error)."""
    names = (names,) if isinstance(names, str) else tuple(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:
            call()
    exc = info.value
    message = str(exc)
    where = traceback.extract_tb(exc.__traceback__)[-1]
    detail = f"{type(exc).__name__}: {message!r} raised at {where.filename}:{where.lineno}"
    assert isinstance(exc, expected), f"expected {expected}, got {detail}"
    assert any(_names(message, name) for name in names), f"message does not name {names}: {detail}"
    assert not _BARE.search(where.filename), f"bare library error: {detail}"
    if sample is not None:
        assert re.search(rf"sample {sample}\b", message), f"sample {sample} not named: {detail}"
    if allowed:
        assert _ALLOWED.search(message), f"message does not say what is allowed: {detail}"
    return exc


def _expected(value):
    """ValueError for a number out of range or an unknown choice; TypeError is also fine for
    a value of the wrong type."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return ValueError
    return (ValueError, TypeError)


# ------------------------------------------------------------------ who takes images
def _ae(X, y):
    return ActivationExtractor(NET, LAYER, device="cpu").fit(X).transform(X)


def _spray(X, y):
    spray = SpectralRelevanceAnalysis(NET, method="gradient", n_neighbors=3, device="cpu",
                                      random_state=0).fit(X, y)
    return _flat(*[spray.maps_[c] for c in spray.classes_])


def _rr(X, y):
    rr = GradientPenaltyCorrector(NET, LAYER, max_epochs=1, lr=1e-2, batch_size=4,
                                  device="cpu", random_state=0)
    rr.fit(X, y, concept_labels=_concepts(_len(X)))
    return _flat(rr.cav_, rr.predict_proba(X))


def _clarc(X, y):
    clarc = ClassArtifactCompensator(NET, LAYER, device="cpu")
    clarc.fit(X, y, concept_labels=_concepts(_len(X)))
    return _flat(clarc.cav_, clarc.predict_proba(X))


def _shf(X, y):
    shf = SpuriosityHeadFinetuner(NET, k=1, max_epochs=1, validation_fraction=0.0, device="cpu",
                                  random_state=0)
    shf.fit(X, y, spuriosity=np.arange(_len(X), dtype=float))
    return shf.predict_proba(X)


def _fmd(X, y):
    fmd = FastModelDebiaser(NET, max_iter=1, device="cpu", random_state=0).fit(X, y, X_cf=X)
    return _flat(fmd.bias_before_, fmd.predict_proba(X))


def _end(X, y):
    return _skorch(EnDClassifier).fit(X, y, bias=_concepts(_len(X))).predict_proba(X)


def _balanced(X, y):
    return _skorch(GroupBalancedClassifier).fit(X, y, bias=_concepts(_len(X))).predict_proba(X)


def _sensitivity(X, y):
    res = metrics.concept_sensitivity(NET, X, LAYER, np.ones(N_CHANNELS))
    return _flat(res["mean_abs"], res["mean"], res["tcav"])


def _spatial_tcav(X, y):
    return spatial_mean_tcav(NET, X, LAYER, np.ones(N_CHANNELS), target=0)


#: concept and random images of tcav_score (X is the input to explain)
TCAV_SETS = dict(concept_X=X0[:4] + 0.5, random_X=[X0[4:6], X0[6:8]])


def _tcav(X, y):
    res = tcav_score(NET, X, LAYER, target=0, random_state=0, **TCAV_SETS)
    return _flat(res.directional_derivatives, res.scores, res.random_scores)


def _attacked(X, y):
    return metrics.attacked_accuracy(NET, X, y, lambda Z: Z)


def _relevance(X, y):
    return metrics.artifact_relevance(NET, X, np.ones(SHAPE[1:]), method="gradient_x_input",
                                      device="cpu")


def _cf_bias(X, y):
    return metrics.counterfactual_bias(NET, X, X, y, signed=True)


def _cf_flip(X, y):
    return metrics.counterfactual_flip_rate(NET, X, X)


IMAGE_USERS = {
    "ActivationExtractor": _ae, "SpectralRelevanceAnalysis": _spray,
    "GradientPenaltyCorrector": _rr, "ClassArtifactCompensator": _clarc,
    "SpuriosityHeadFinetuner": _shf, "FastModelDebiaser": _fmd, "EnDClassifier": _end,
    "GroupBalancedClassifier": _balanced, "concept_sensitivity": _sensitivity,
    "tcav_score": _tcav, "spatial_mean_tcav": _spatial_tcav, "attacked_accuracy": _attacked,
    "artifact_relevance": _relevance,
    "counterfactual_bias": _cf_bias, "counterfactual_flip_rate": _cf_flip,
}
USER_NAMES = sorted(IMAGE_USERS)


# ------------------------------------------------------------------ X: strategies
@st.composite
def wrong_shapes(draw):
    """Image batches the 3 x 12 x 12 network cannot take."""
    n = draw(st.integers(2, 5))
    kind = draw(st.sampled_from(["1d", "2d", "3d", "5d", "channels", "spatial"]))
    if kind == "1d":
        shape = (n,)
    elif kind == "2d":
        shape = (n, draw(st.integers(1, 40)))
    elif kind == "3d":
        shape = (n, draw(st.integers(1, 14)), draw(st.integers(1, 14)))
    elif kind == "5d":
        shape = (n, draw(st.integers(1, 3)), 3, 12, 12)
    elif kind == "channels":
        shape = (n, draw(st.sampled_from([1, 2, 4, 6])), 12, 12)
    else:  # too small for two 2x2 max-pools
        shape = (n, 3, draw(st.integers(1, 3)), draw(st.integers(1, 12)))
    tensor = draw(st.booleans())
    X = np.random.RandomState(n).rand(*shape).astype(np.float32)
    return (torch.as_tensor(X) if tensor else X), n


@st.composite
def non_finite(draw):
    """Images with NaN / inf somewhere in sample ``first`` (and maybe in a later one)."""
    n = draw(st.integers(2, 7))
    first = draw(st.integers(0, n - 1))
    X = _images(n, seed=draw(st.integers(0, 3)))
    value = draw(st.sampled_from([NAN, INF, -INF]))
    X[(first,) + tuple(draw(st.integers(0, d - 1)) for d in SHAPE)] = value
    if first + 1 < n and draw(st.booleans()):
        X[draw(st.integers(first + 1, n - 1)), 0, 0, 0] = NAN
    if draw(st.booleans()):
        X = X.astype(np.float64)
    return (torch.as_tensor(X) if draw(st.booleans()) else X), first


@st.composite
def non_numeric(draw):
    """Complex, string and object images."""
    n = draw(st.integers(2, 4))
    kind = draw(st.sampled_from(["complex", "complex_tensor", "strings", "objects"]))
    X = _images(n)
    if kind == "complex":
        return X.astype(draw(st.sampled_from([np.complex64, np.complex128]))), n
    if kind == "complex_tensor":
        return torch.as_tensor(X).to(torch.complex64), n
    if kind == "strings":
        word = draw(st.text(alphabet="abcxyz", min_size=1, max_size=4))
        return np.full(X.shape, word), n
    obj = X.astype(object)
    obj[draw(st.integers(0, n - 1)), 0, 0, 0] = draw(st.sampled_from([None, "cat", {"a": 1}]))
    return obj, n


@st.composite
def wide_integers(draw):
    """Integer images other than uint8: their value range is unknown."""
    n = draw(st.integers(2, 4))
    dtype = draw(st.sampled_from(["int8", "int16", "int32", "int64", "uint16"]))
    X = (_images(n) * 100).astype(dtype)
    return (torch.as_tensor(X) if draw(st.booleans()) and dtype != "uint16" else X), n


def _check_bad_images(user, X, n, **kwargs):
    return _raises(ValueError, "X", lambda: IMAGE_USERS[user](X, _labels(n)), **kwargs)


@pytest.mark.parametrize("user", USER_NAMES)
@MORE
@given(case=wrong_shapes())
def test_wrong_shape_names_X(user, case):
    X, n = case
    _check_bad_images(user, X, n)


@pytest.mark.parametrize("user", USER_NAMES)
@SOME
@given(shape=st.sampled_from([(0,), (0, 3, 12, 12), (0, 5), (0, 3, 12, 12, 1)]),
       container=st.sampled_from(["array", "tensor", "list"]))
def test_zero_samples_name_X(user, shape, container):
    X = np.zeros(shape, dtype=np.float32)
    X = {"array": X, "tensor": torch.as_tensor(X), "list": X.tolist()}[container]
    _check_bad_images(user, X, 0)


class _Items(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(SHAPE), 0


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield torch.zeros(SHAPE)


@pytest.mark.parametrize("user", USER_NAMES)
@SOME
@given(kind=st.sampled_from(["empty", "empty_loader", "iterable", "iterable_loader"]))
def test_empty_or_iterable_datasets_name_X(user, kind):
    if user == "ActivationExtractor" and kind.startswith("iterable"):
        return  # it reads an IterableDataset in one pass (tests/test_extraction.py)
    X = {"empty": _Items(0), "empty_loader": torch.utils.data.DataLoader(_Items(0)),
         "iterable": _Stream(), "iterable_loader": torch.utils.data.DataLoader(_Stream())}[kind]
    _raises((ValueError, TypeError), "X", lambda: IMAGE_USERS[user](X, _labels(0)))


@pytest.mark.parametrize("user", USER_NAMES)
@MORE
@given(case=non_finite())
def test_nan_or_inf_names_X_and_the_first_bad_sample(user, case):
    X, first = case
    _check_bad_images(user, X, len(X), sample=first)


@pytest.mark.parametrize("user", USER_NAMES)
@SOME
@given(case=non_numeric())
def test_complex_strings_and_objects_name_X(user, case):
    X, n = case
    _raises((ValueError, TypeError), "X", lambda: IMAGE_USERS[user](X, _labels(n)))


@pytest.mark.parametrize("user", USER_NAMES)
@SOME
@given(case=wide_integers())
def test_integer_images_other_than_uint8_are_refused(user, case):
    X, n = case
    exc = _check_bad_images(user, X, n)
    assert "float32" in str(exc), "the message must say what is allowed"


@pytest.mark.parametrize("user", USER_NAMES)
@FEW
@given(n=st.integers(6, 9), seed=st.integers(0, 100))
def test_accepted_inputs_equal_their_float32_version(user, n, seed):
    """uint8 images (scaled by 1/255, with a warning), negative strides, big-endian floats and
    nested lists give the result of the equivalent float32 array."""
    run = IMAGE_USERS[user]
    y = _labels(n)
    X8 = (_images(n, seed) * 255).astype(np.uint8)
    X = X8.astype(np.float32) / 255
    reversed_twice = np.ascontiguousarray(X[..., ::-1])[..., ::-1]  # X's values, stride < 0
    assert reversed_twice.strides[-1] < 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = run(X, y)
        for variant in (reversed_twice, X.astype(">f4"), X.tolist()):
            np.testing.assert_allclose(run(variant, y), reference, rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaled = run(X8, y)
    assert any(issubclass(w.category, UserWarning) and str(w.message).startswith(
        "X holds uint8 images; they are scaled from 0..255 to [0, 1]") for w in caught)
    np.testing.assert_allclose(scaled, reference, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ A: activations (2-d)
def _cav_fit(A, labels=None):
    return CAVEstimator().fit(A, CA[:len(A)] if labels is None else labels)


def _ranker_fit(A, labels=None):
    return SpuriosityRanker(spurious_features=[0]).fit(A, YA[:len(A)] if labels is None else labels)


ACTIVATION_USERS = {"CAVEstimator": _cav_fit, "SpuriosityRanker": _ranker_fit}


@st.composite
def bad_activations(draw):
    kind = draw(st.sampled_from(["1d", "3d", "empty", "nan", "inf", "complex", "strings",
                                 "objects"]))
    A = A0.copy()
    if kind == "1d":
        return A[:, 0]
    if kind == "3d":
        return A[:, :, None].repeat(draw(st.integers(1, 3)), axis=2)
    if kind == "empty":
        return A[:0]
    if kind in ("nan", "inf"):
        A[draw(st.integers(0, 11)), draw(st.integers(0, 4))] = NAN if kind == "nan" else -INF
        return torch.as_tensor(A) if draw(st.booleans()) else A
    if kind == "complex":
        return A.astype(complex)
    if kind == "strings":
        return np.full(A.shape, draw(st.text(alphabet="abc", min_size=1, max_size=3)))
    A = A.astype(object)
    A[draw(st.integers(0, 11)), 0] = draw(st.sampled_from([None, "cat"]))
    return A


@pytest.mark.parametrize("user", sorted(ACTIVATION_USERS))
@MORE
@given(A=bad_activations())
def test_bad_activations_name_A(user, A):
    _raises((ValueError, TypeError), "A", lambda: ACTIVATION_USERS[user](A))


@pytest.mark.parametrize("user", sorted(ACTIVATION_USERS))
@SOME
@given(n_features=st.sampled_from([1, 3, 4, 6, 9]), tensor=st.booleans())
def test_wrong_number_of_features_after_fit_names_A(user, n_features, tensor):
    est = ACTIVATION_USERS[user](A0)
    A = _RNG.rand(4, n_features)
    A = torch.as_tensor(A) if tensor else A
    method = est.transform
    _raises(ValueError, "A", lambda: method(A))


# ------------------------------------------------------------------ labels
@st.composite
def bad_class_labels(draw, n):
    """Class labels for ``n`` samples that no 3-output network can take: wrong length, 2-d,
    NaN, or a label the network has no output for."""
    y = _labels(n)
    kind = draw(st.sampled_from(["length", "2d", "nan", "unknown"]))
    if kind == "length":
        m = draw(st.sampled_from([1, n - 1, n + 1, 2 * n]))
        return _labels(m), kind
    if kind == "2d":
        return np.c_[y, y], kind
    if kind == "nan":
        y = y.astype(float)
        y[draw(st.integers(0, n - 1))] = NAN
        return y, kind
    y = y.copy()
    y[draw(st.integers(0, n - 1))] = draw(st.sampled_from([3, 7, 100, -1]))
    return y, kind


LABEL_USERS = {
    "SpectralRelevanceAnalysis": _spray, "GradientPenaltyCorrector": _rr,
    "ClassArtifactCompensator": _clarc, "SpuriosityHeadFinetuner": _shf,
    "FastModelDebiaser": _fmd, "EnDClassifier": _end, "GroupBalancedClassifier": _balanced,
    "attacked_accuracy": _attacked, "counterfactual_bias": _cf_bias,
}
# attacked_accuracy compares with any classifier's predictions: only its shape is checked
SHAPE_ONLY = {"attacked_accuracy"}


@pytest.mark.parametrize("user", sorted(LABEL_USERS))
@MORE
@given(data=st.data())
def test_bad_class_labels_name_y(user, data):
    y, kind = data.draw(bad_class_labels(8))
    if user in SHAPE_ONLY and kind in ("nan", "unknown"):
        kind = "length"
        y = _labels(data.draw(st.sampled_from([1, 7, 9])))
    _raises(ValueError, "y", lambda: LABEL_USERS[user](X0, y))


@pytest.mark.parametrize("user", ["GradientPenaltyCorrector", "ClassArtifactCompensator"])
@MORE
@given(data=st.data())
def test_bad_concept_labels_name_concept_labels(user, data):
    kind = data.draw(st.sampled_from(["length", "2d", "values", "nan", "fraction", "one_class",
                                      "strings"]))
    c = _concepts(8).astype(np.float64)
    i = data.draw(st.integers(0, 7))
    if kind == "length":
        c = c[:data.draw(st.integers(0, 7))]
    elif kind == "2d":
        c = np.c_[c, c]
    elif kind == "values":
        c[i] = data.draw(st.sampled_from([2, -2, 5, 255]))
    elif kind == "nan":
        c[i] = NAN
    elif kind == "fraction":
        c[i] = 0.5
    elif kind == "one_class":
        c = np.full(8, data.draw(st.sampled_from([0, 1])), dtype=np.int64)
        c[data.draw(st.lists(st.integers(0, 7), max_size=4))] = -1
    else:
        c = np.array(["yes", "no"] * 4)
    est = {"GradientPenaltyCorrector": GradientPenaltyCorrector,
           "ClassArtifactCompensator": ClassArtifactCompensator}[user](
        NET, LAYER, max_epochs=0, device="cpu")
    _raises(ValueError, "concept_labels", lambda: est.fit(X0, Y0, concept_labels=c))


@st.composite
def bad_binary_labels(draw, n):
    kind = draw(st.sampled_from(["length", "2d", "nan", "three", "one_class"]))
    c = _concepts(n).astype(np.float64)
    if kind == "length":
        return c[:draw(st.integers(1, n - 1))]
    if kind == "2d":
        return np.c_[c, 1 - c]
    if kind == "nan":
        c[draw(st.integers(0, n - 1))] = NAN
        return c
    if kind == "three":
        c[draw(st.integers(0, n - 1))] = draw(st.sampled_from([2, 5, -1]))
        return c
    return np.full(n, draw(st.sampled_from([0, 1])))


@MORE
@given(data=st.data())
def test_cav_estimator_bad_concept_labels(data):
    c = data.draw(bad_binary_labels(12))
    _raises(ValueError, "concept_labels", lambda: CAVEstimator().fit(A0, c))


@MORE
@given(data=st.data())
def test_ranker_bad_concept_labels(data):
    c = data.draw(bad_binary_labels(12))
    ranker = SpuriosityRanker(cav=CAVEstimator())
    _raises(ValueError, "concept_labels", lambda: ranker.fit(A0, YA, concept_labels=c))


@MORE
@given(data=st.data())
def test_ranker_bad_class_labels_name_y(data):
    kind = data.draw(st.sampled_from(["length", "2d", "nan", "continuous"]))
    y = YA.astype(np.float64)
    if kind == "length":
        y = y[:data.draw(st.integers(1, 11))]
    elif kind == "2d":
        y = np.c_[y, y]
    elif kind == "nan":
        y[data.draw(st.integers(0, 11))] = NAN
    else:
        y = y + data.draw(st.floats(0.1, 0.9))
    _raises(ValueError, "y", lambda: SpuriosityRanker(spurious_features=[0]).fit(A0, y))


@pytest.mark.parametrize("user", ["EnDClassifier", "GroupBalancedClassifier"])
@SOME
@given(data=st.data())
def test_bad_bias_labels_name_bias(user, data):
    kind = data.draw(st.sampled_from(["length", "2d", "nan", "fraction", "strings"]))
    bias = _concepts(8).astype(np.float64)
    if kind == "length":
        bias = bias[:data.draw(st.integers(0, 7))]
    elif kind == "2d":
        bias = np.c_[bias, bias]
    elif kind == "nan":
        bias[data.draw(st.integers(0, 7))] = data.draw(st.sampled_from([NAN, INF]))
    elif kind == "fraction":
        bias[data.draw(st.integers(0, 7))] = 0.5
    else:
        bias = np.array(["red", "green"] * 4)
    cls = EnDClassifier if user == "EnDClassifier" else GroupBalancedClassifier
    _raises(ValueError, "bias", lambda: _skorch(cls).fit(X0, Y0, bias=bias))


@st.composite
def bad_targets(draw, n):
    """``target=`` values that are not class indices of a 3-output network."""
    kind = draw(st.sampled_from(["out_of_range", "nan", "inf", "string", "length", "array"]))
    if kind == "out_of_range":
        return draw(st.sampled_from([-1, 3, 10]))
    if kind in ("nan", "inf"):
        return NAN if kind == "nan" else INF
    if kind == "string":
        return draw(st.text(alphabet="abc", min_size=1, max_size=3))
    if kind == "length":
        return np.zeros(draw(st.sampled_from([1, n - 1, n + 1])), dtype=int)
    t = np.zeros(n)
    t[draw(st.integers(0, n - 1))] = draw(st.sampled_from([NAN, 3, -1, 0.5]))
    return t


TARGET_USERS = {
    "concept_sensitivity": lambda t: metrics.concept_sensitivity(NET, X0, LAYER,
                                                                 np.ones(N_CHANNELS), target=t),
    "spatial_mean_tcav": lambda t: spatial_mean_tcav(NET, X0, LAYER, np.ones(N_CHANNELS),
                                                     target=t),
    "tcav_score": lambda t: tcav_score(NET, X0, LAYER, target=t, **TCAV_SETS),
    "artifact_relevance": lambda t: metrics.artifact_relevance(
        NET, X0, np.ones(SHAPE[1:]), target=t, method="gradient", device="cpu"),
}


@pytest.mark.parametrize("user", sorted(TARGET_USERS))
@MORE
@given(data=st.data())
def test_bad_targets_name_target(user, data):
    t = data.draw(bad_targets(8))
    _raises(_expected(t), "target", lambda: TARGET_USERS[user](t))


# ------------------------------------------------------------------ array metrics
@MORE
@given(data=st.data())
def test_worst_group_accuracy_bad_input(data):
    y = _labels(8)
    kind = data.draw(st.sampled_from(["y_true", "y_pred", "groups", "groups_scalar",
                                      "groups_3d", "empty"]))
    args = {"y_true": y, "y_pred": y, "groups": _concepts(8)}
    names = kind
    if kind in ("y_true", "y_pred", "groups"):
        args[kind] = _labels(data.draw(st.sampled_from([0, 1, 7, 9])))
        names = ("y_true", "y_pred", "groups")
    elif kind == "groups_scalar":
        args["groups"] = data.draw(st.sampled_from([0, 1.5, None, "a"]))
        names = "groups"
    elif kind == "groups_3d":
        args["groups"] = np.zeros((8, 2, 2))
        names = "groups"
    else:
        args = {"y_true": [], "y_pred": [], "groups": []}
        names = ("y_true", "sample")
    _raises(ValueError, names, lambda: metrics.worst_group_accuracy(**args))


@MORE
@given(data=st.data())
def test_spurious_gap_bad_input(data):
    y = _labels(12)
    s = np.arange(12, dtype=float)
    kind = data.draw(st.sampled_from(["y_pred", "spuriosity", "y", "nan_mix", "strings", "k"]))
    args = {"y_true": y, "y_pred": y, "spuriosity": s, "k": 2}
    if kind in ("y_pred", "spuriosity", "y"):
        args[kind] = args[kind if kind != "y" else "y_pred"][:data.draw(st.integers(1, 11))]
    elif kind == "nan_mix":
        s = s.copy()
        s[data.draw(st.integers(0, 11))] = data.draw(st.sampled_from([NAN, INF]))
        args["spuriosity"], kind = s, "spuriosity"
    elif kind == "strings":
        args["spuriosity"], kind = np.full(12, "high"), "spuriosity"
    else:
        args["k"] = data.draw(st.sampled_from([0, -1, 2.5, NAN, "2", None, 5]))
    _raises(_expected(args["k"]) if kind == "k" else ValueError, kind,
            lambda: metrics.spurious_gap(**args))


@MORE
@given(data=st.data())
def test_cav_alignment_bad_input(data):
    A_with, A_without = A0 + 1.0, A0.copy()
    args = {"cav": np.ones(5), "A_with": A_with, "A_without": A_without}
    kind = data.draw(st.sampled_from(["cav", "A_with", "A_without"]))
    if kind == "cav":
        bad = data.draw(st.sampled_from(["length", "zero", "nan", "strings", "scalar", "2d"]))
        args["cav"] = {"length": np.ones(4), "zero": np.zeros(5), "nan": np.full(5, NAN),
                       "strings": np.full(5, "a"), "scalar": 1.0, "2d": np.ones((1, 7))}[bad]
    else:
        bad = data.draw(st.sampled_from(["features", "rows", "nan", "strings", "scalar", "3d"]))
        A = args[kind].copy()
        if bad == "nan":
            A[data.draw(st.integers(0, 11)), data.draw(st.integers(0, 4))] = NAN
        args[kind] = {"features": A[:, :3], "rows": A[:data.draw(st.integers(1, 11))], "nan": A,
                      "strings": np.full(A.shape, "a"), "scalar": 1.0, "3d": A[:, :, None]}[bad]
    _raises((ValueError, TypeError), kind, lambda: cav_alignment(**args))


@MORE
@given(data=st.data())
def test_counterfactual_bias_bad_X_cf(data):
    kind = data.draw(st.sampled_from(["length", "shape", "nan"]))
    X_cf = X0.copy()
    if kind == "length":
        X_cf = X_cf[:data.draw(st.integers(1, 7))]
    elif kind == "shape":
        X_cf = X_cf[:, :, :data.draw(st.integers(1, 11))]
    else:
        X_cf[data.draw(st.integers(0, 7)), 0, 0, 0] = NAN
    _raises(ValueError, "X_cf", lambda: metrics.counterfactual_bias(NET, X0, X_cf, Y0))
    _raises(ValueError, "X_cf", lambda: metrics.counterfactual_flip_rate(NET, X0, X_cf))
    if kind != "nan":
        fmd = FastModelDebiaser(NET, device="cpu")
        _raises(ValueError, "X_cf", lambda: fmd.fit(X0, Y0, X_cf=X_cf))


# ------------------------------------------------------------------ hyperparameters
WRONG_TYPES = st.sampled_from(["abc", "1", [1], (2,), {"a": 1}, b"x"])
NON_FINITE = st.sampled_from([NAN, INF, -INF])
FLOATS = st.floats(allow_nan=True, allow_infinity=True)


def not_int(low=1, none_ok=False):
    """Values an integer parameter >= ``low`` must refuse."""
    parts = [st.integers(max_value=low - 1), FLOATS, WRONG_TYPES, st.booleans()]
    if not none_ok:
        parts.append(st.none())
    return st.one_of(*parts)


def not_real(low=None, high=None, low_open=False, high_open=False, none_ok=False):
    """Values a finite real parameter in the given range must refuse."""
    parts = [NON_FINITE, WRONG_TYPES, st.booleans()]
    if low is not None:
        parts.append(st.floats(max_value=low, exclude_max=not low_open, allow_nan=False))
    if high is not None:
        parts.append(st.floats(min_value=high, exclude_min=not high_open, allow_nan=False))
    if not none_ok:
        parts.append(st.none())
    return st.one_of(*parts)


def not_choice(none_ok=False):
    """Values a string choice must refuse (no valid choice can be spelt from these letters)."""
    parts = [st.text(alphabet="QZ#", min_size=1, max_size=5), st.integers(), FLOATS,
             st.sampled_from([[1], {"a": 1}])]
    if not none_ok:
        parts.append(st.none())
    return st.one_of(*parts)


NOT_DEVICE = st.one_of(st.sampled_from(["gpu", "cuda:x", "tpu", "", "cpu0"]), st.integers(),
                       st.floats(), st.sampled_from([[1], True]))
NOT_SEED = st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), FLOATS,
                     st.sampled_from(["abc", [1.5], {"a": 1}]))
NOT_LAYER = st.one_of(st.sampled_from(["features.9", "head", "classifier.7", "", "Features"]),
                      st.integers(), st.floats(), st.sampled_from([[1], ("features",), True]))
# a layer name or a list of names (tcav_score scores several layers in one pass)
NOT_LAYERS = st.one_of(st.sampled_from(["features.9", "", "Features"]), st.integers(),
                       st.floats(), st.sampled_from([[1], [], ["features.9"], True, None]))
# skorch's batch_size: a positive integer, or -1 for the whole data set
NOT_SKORCH_BATCH = st.one_of(st.integers(max_value=-2), st.just(0), FLOATS, WRONG_TYPES,
                             st.booleans(), st.none())
NOT_CAV = st.sampled_from([np.ones(3), np.zeros(N_CHANNELS), np.full(N_CHANNELS, NAN),
                           np.full(N_CHANNELS, "a"), 1.0, "abc", np.ones((N_CHANNELS, 2))])


def _check_param(make, fit, name, value):
    """``fit(make(**{name: value}))`` raises naming ``name`` (values are checked in fit, so
    ``set_params`` and ``GridSearchCV`` get the same errors)."""
    _raises(_expected(value), name, lambda: fit(make(**{name: value})), allowed=True)


def _fit_images(est):
    return est.fit(X0, Y0, concept_labels=C0) if isinstance(
        est, (GradientPenaltyCorrector, ClassArtifactCompensator)) else est.fit(X0, Y0)


ESTIMATOR_PARAMS = {
    ActivationExtractor: (
        lambda **p: ActivationExtractor(NET, **{"layer": LAYER, "device": "cpu", **p}),
        lambda est: est.fit(X0),
        {"layer": NOT_LAYER, "pooling": not_choice(none_ok=True), "batch_size": not_int(),
         "device": NOT_DEVICE}),
    CAVEstimator: (
        lambda **p: CAVEstimator(**{"method": "svm", **p}),
        lambda est: est.fit(A0, CA),
        {"method": not_choice(), "C": not_real(low=0, low_open=True),
         "alpha": not_real(low=0, low_open=True), "max_iter": not_int(),
         "class_weight": st.one_of(not_choice(none_ok=True), st.just({3: 1.0})),
         "random_state": NOT_SEED}),
    SpuriosityRanker: (
        lambda **p: SpuriosityRanker(**p),
        lambda est: est.fit(A0, YA),
        {"k": not_int(),
         "spurious_features": st.sampled_from([[-1], [5], [0.5], [], "abc", {0: [7]}, {9: [0]},
                                               {0: []}, [[0, 1]]]),
         "cav": NOT_CAV}),
    SpectralRelevanceAnalysis: (
        lambda **p: SpectralRelevanceAnalysis(NET, **{"method": "gradient", "device": "cpu", **p}),
        lambda est: est.fit(X0, Y0),
        {"method": not_choice(), "normalize": not_choice(none_ok=True), "map_size": not_int(),
         "n_neighbors": not_int(), "n_clusters": not_int(none_ok=True),
         "max_clusters": not_int(), "batch_size": not_int(), "device": NOT_DEVICE,
         "random_state": NOT_SEED, "classes": st.sampled_from([[5], [0, 7], ["a"]])}),
    GradientPenaltyCorrector: (
        lambda **p: GradientPenaltyCorrector(NET, **{"layer": LAYER, "max_epochs": 1,
                                                     "device": "cpu", **p}),
        _fit_images,
        {"layer": NOT_LAYER, "cav": NOT_CAV, "penalty": not_real(low=0, low_open=True),
         "gradient_target": not_choice(), "aggregation": not_choice(),
         "train_layers": st.one_of(not_choice(), st.just(["nothing."])),
         "max_epochs": not_int(low=0), "lr": not_real(low=0, low_open=True),
         "batch_size": not_int(), "validation_fraction": not_real(low=0, high=1),
         "output": not_choice(), "max_grad_norm": not_real(low=0, low_open=True, none_ok=True),
         "device": NOT_DEVICE, "random_state": NOT_SEED,
         "optimizer": st.sampled_from(["sgd", 1, torch.nn.Linear]),
         "net_params": st.sampled_from([[1], "lr", {"train_split": None}]),
         "callbacks": st.sampled_from([1, "abc", [1], [("a", 1)]])}),
    ClassArtifactCompensator: (
        lambda **p: ClassArtifactCompensator(NET, **{"layer": LAYER, "device": "cpu", **p}),
        _fit_images,
        {"layer": NOT_LAYER, "cav": NOT_CAV, "mode": not_choice(),
         "pooling": not_choice(), "max_epochs": not_int(low=0),
         "reference": st.one_of(NON_FINITE, WRONG_TYPES), "lr": not_real(low=0, low_open=True),
         "batch_size": not_int(), "validation_fraction": not_real(low=0, high=1),
         "output": not_choice(), "device": NOT_DEVICE, "random_state": NOT_SEED,
         "train_layers": st.one_of(not_choice(), st.just(["nothing."]))}),
    SpuriosityHeadFinetuner: (
        lambda **p: SpuriosityHeadFinetuner(NET, **{"k": 1, "max_epochs": 1, "device": "cpu",
                                                    "validation_fraction": 0.0, **p}),
        lambda est: est.fit(X0, Y0, spuriosity=np.arange(8.0)),
        {"layer": NOT_LAYER, "k": not_int(), "val_k": not_int(), "max_epochs": not_int(),
         "batch_size": not_int(), "lr": not_real(low=0, low_open=True),
         "weight_decay": not_real(low=0), "target_gap": not_real(low=-1, high=1),
         "validation_fraction": not_real(low=0, high=1), "baseline": not_choice(none_ok=True),
         "max_accuracy_drop": not_real(low=0, high=1, none_ok=True), "device": NOT_DEVICE,
         "random_state": NOT_SEED, "ranker": st.sampled_from([1, "abc", CAVEstimator()])}),
    FastModelDebiaser: (
        lambda **p: FastModelDebiaser(NET, **{"max_iter": 1, "device": "cpu", **p}),
        lambda est: est.fit(X0, Y0, X_cf=X0[::-1]),
        {"layer": NOT_LAYER, "damping": not_real(low=0),
         "step_size": not_real(low=0, low_open=True),
         "max_iter": not_int(), "max_halvings": not_int(low=0),
         "max_accuracy_drop": not_real(low=0, high=1, none_ok=True), "n_pairs": not_int(low=2),
         "validation_fraction": not_real(low=0, high=1), "batch_size": not_int(),
         "device": NOT_DEVICE, "random_state": NOT_SEED,
         "counterfactual": st.sampled_from([1, "flip", [np.flip]])}),
    EnDClassifier: (
        lambda **p: _skorch(EnDClassifier, **p),
        lambda est: est.fit(X0, Y0, bias=C0),
        {"alpha": not_real(low=0), "beta": not_real(low=0), "layer": NOT_LAYER,
         "lr": not_real(low=0), "max_epochs": not_int(low=0), "batch_size": NOT_SKORCH_BATCH}),
    GroupBalancedClassifier: (
        lambda **p: _skorch(GroupBalancedClassifier, **p),
        lambda est: est.fit(X0, Y0, bias=C0),
        {"lr": not_real(low=0), "max_epochs": not_int(low=0), "batch_size": NOT_SKORCH_BATCH}),
}
PARAM_CASES = [(cls.__name__, name) for cls, (_, _, params) in ESTIMATOR_PARAMS.items()
               for name in params]
_BY_NAME = {cls.__name__: spec for cls, spec in ESTIMATOR_PARAMS.items()}


@pytest.mark.parametrize("estimator,param", PARAM_CASES, ids=[f"{e}-{p}" for e, p in PARAM_CASES])
@SOME
@given(data=st.data())
def test_bad_hyperparameter_names_it(estimator, param, data):
    make, fit, params = _BY_NAME[estimator]
    value = data.draw(params[param], label=param)
    _check_param(make, fit, param, value)


METRIC_PARAMS = {
    "concept_sensitivity": (
        lambda **p: metrics.concept_sensitivity(NET, X0, **{"layer": LAYER,
                                                            "cav": np.ones(N_CHANNELS), **p}),
        {"layer": NOT_LAYER, "cav": NOT_CAV, "gradient_pooling": not_choice(),
         "batch_size": not_int()}),
    "spatial_mean_tcav": (
        lambda **p: spatial_mean_tcav(NET, X0, **{"layer": LAYER, "cav": np.ones(N_CHANNELS),
                                                  **p}),
        {"layer": NOT_LAYER, "cav": NOT_CAV, "batch_size": not_int()}),
    "tcav_score": (
        lambda **p: tcav_score(NET, X0, **{"layer": LAYER, "target": 0, **TCAV_SETS, **p}),
        {"layer": NOT_LAYERS, "batch_size": not_int(), "cav_method": not_choice()}),
    "attacked_accuracy": (
        lambda **p: metrics.attacked_accuracy(NET, X0, Y0, **{"add_artifact": lambda Z: Z, **p}),
        {"add_artifact": st.sampled_from([None, 1, "patch", [1]]), "batch_size": not_int()}),
    "artifact_relevance": (
        lambda **p: metrics.artifact_relevance(NET, X0, **{"masks": np.ones(SHAPE[1:]),
                                                           "method": "gradient",
                                                           "device": "cpu", **p}),
        {"method": not_choice(), "batch_size": not_int(), "device": NOT_DEVICE,
         "masks": st.sampled_from([np.ones((5, 5)), np.ones((8, 3, 12, 12)), "abc", None, 1.0,
                                   np.ones((7, 12, 12))])}),
    "spurious_gap": (
        lambda **p: metrics.spurious_gap(YA, YA, **{"spuriosity": np.arange(12.0), "k": 1, **p}),
        {"k": not_int()}),
    "counterfactual_bias": (
        lambda **p: metrics.counterfactual_bias(NET, X0, X0, Y0, **p),
        {"batch_size": not_int()}),
    "counterfactual_flip_rate": (
        lambda **p: metrics.counterfactual_flip_rate(NET, X0, X0, **p),
        {"batch_size": not_int()}),
    "make_debias_scorer": (
        lambda **p: metrics.make_debias_scorer(**p),
        {"sensitivity_weight": not_real(low=0, high=1), "gradient_pooling": not_choice(),
         "batch_size": not_int(), "reference": not_real(low=0, none_ok=True)}),
}
METRIC_CASES = [(m, name) for m, (_, params) in METRIC_PARAMS.items() for name in params]


@pytest.mark.parametrize("metric,param", METRIC_CASES, ids=[f"{m}-{p}" for m, p in METRIC_CASES])
@SOME
@given(data=st.data())
def test_bad_metric_parameter_names_it(metric, param, data):
    call, params = METRIC_PARAMS[metric]
    value = data.draw(params[param], label=param)
    _raises(_expected(value), param, lambda: call(**{param: value}), allowed=True)


def test_every_public_estimator_and_metric_is_covered():
    """The strategies above reach every public estimator and metric (none is skipped)."""
    import skdebias
    from sklearn.base import BaseEstimator

    from skdebias import correction

    estimators = {name for name in skdebias.__all__
                  if isinstance(getattr(skdebias, name), type)
                  and issubclass(getattr(skdebias, name), BaseEstimator)} | {
        "EnDClassifier", "GroupBalancedClassifier"}
    estimators -= {"EnDRegularizer"}  # a skorch callback / loss term, not an estimator
    covered = {cls.__name__ for cls in ESTIMATOR_PARAMS}
    assert estimators <= covered, estimators - covered
    assert set(IMAGE_USERS) >= covered - {"CAVEstimator", "SpuriosityRanker"}
    public_metrics = set(metrics.__all__) - {"DebiasScorer"}
    assert public_metrics <= set(METRIC_PARAMS) | {"worst_group_accuracy"}
    assert {"tcav_score", "spatial_mean_tcav", "cav_alignment"} <= set(dir(skdebias))
    assert correction.EnDClassifier is EnDClassifier
