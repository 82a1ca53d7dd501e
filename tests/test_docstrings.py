"""Every parameter of every public class is documented in its numpydoc ``Parameters`` section."""

import inspect

import pytest

import skdebias
import skdebias.correction
import skdebias.metrics
import skdebias.models

PUBLIC_MODULES = [skdebias, skdebias.correction, skdebias.metrics, skdebias.models]


def _public_classes():
    seen = {}
    for mod in PUBLIC_MODULES:
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            if inspect.isclass(obj) and obj.__module__.startswith("skdebias"):
                seen[obj.__qualname__] = obj
    return [seen[k] for k in sorted(seen)]


def documented_parameters(doc):
    """Names listed in the ``Parameters`` section of a numpydoc docstring.

    An entry is a line at the section's indentation: ``name : type`` or several names
    sharing one description (``lr, batch_size : ...`` or ``lr, batch_size``).
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    names, inside = set(), False
    for i, line in enumerate(lines):
        underline = i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        if underline:
            inside = line.strip() == "Parameters"
            continue
        if not inside or not line.strip() or line.startswith(" ") or set(line) == {"-"}:
            continue
        head = line.split(" :")[0]
        names.update(n.strip() for n in head.split(",") if n.strip())
    return names


def test_the_parser_reads_numpydoc_entries():
    doc = """Summary.

    Parameters
    ----------
    a : int
        First.
    b, c : float
    d, e
        Shared.

    Attributes
    ----------
    x_ : int
    """
    assert documented_parameters(doc) == {"a", "b", "c", "d", "e"}


def _init_parameters(cls):
    sig = inspect.signature(cls.__init__)
    return [p.name for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


CLASSES = _public_classes()


def test_public_classes_found():
    names = {c.__name__ for c in CLASSES}
    assert {"ActivationExtractor", "GradientPenaltyCorrector", "FastModelDebiaser",
            "EnDClassifier", "GroupBalancedClassifier", "DebiasScorer"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_init_parameter_is_documented(cls):
    missing = [p for p in _init_parameters(cls) if p not in documented_parameters(cls.__doc__)]
    assert not missing, f"{cls.__name__} does not document {missing}"
