"""Benchmarks and examples use skdebias's public API only.

They are what users copy from and what measures the public behaviour, so a private name in
them is either a gap in the public API or a measurement of something users cannot run. The
scripts are read with ``ast`` (not imported): they train networks at import time.
"""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("examples/*.py")])


def _private(name):
    # dunders such as ``__version__`` are public by convention
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_module(dotted):
    """Whether ``dotted`` is skdebias or one of its modules with a private component."""
    parts = dotted.split(".")
    return parts[0] == "skdebias" and any(_private(p) for p in parts[1:])


def private_uses(source):
    """``(line, what)`` for every private skdebias module, name or attribute ``source`` uses.

    Parameters
    ----------
    source : str
        Python source code.

    Returns
    -------
    list of tuple (int, str)
    """
    tree = ast.parse(source)
    found = []
    bound = set()  # local names that refer to skdebias modules or objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "skdebias":
                    continue
                if _private_module(alias.name):
                    found.append((node.lineno, f"import {alias.name}"))
                bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] != "skdebias":
                continue
            if _private_module(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
            for alias in node.names:
                if _private(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append((node.lineno, f"{ast.unparse(node)}"))
    return sorted(found)


def test_there_are_scripts_to_check():
    names = {p.name for p in SCRIPTS}
    assert {"correction.py", "extraction.py", "correct_clever_hans.py"} <= names


@pytest.mark.parametrize("source", [
    "from skdebias._utils._modules import find_layer",
    "from skdebias.correction._base import build_net",
    "from skdebias._demo import compare_corrections",
    "import skdebias._demo",
    "import skdebias.correction._base as b",
    "from skdebias import _demo",
    "from skdebias.metrics import _predict_labels",
    "import skdebias\nskdebias.metrics._predict_labels(None, None)",
    "from skdebias import metrics\nmetrics._predict_labels(None, None)",
    "from skdebias.correction import GradientPenaltyCorrector as G\nG._check_common",
])
def test_the_checker_finds_private_uses(source):
    assert private_uses(source)


@pytest.mark.parametrize("source", [
    "from skdebias.correction import GradientPenaltyCorrector",
    "import skdebias\nskdebias.__version__",
    "from _common import emit",  # the benchmarks' own helpers
    "import torch\ntorch._C",
    "from skdebias import ActivationExtractor\nclass A:\n    def f(self):\n        self._x = 1",
])
def test_the_checker_lets_public_uses_pass(source):
    assert private_uses(source) == []


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_script_uses_public_names_only(path):
    uses = private_uses(path.read_text())
    where = "; ".join(f"line {line}: {what}" for line, what in uses)
    assert not uses, f"{path.relative_to(REPO)} uses private skdebias names: {where}"
