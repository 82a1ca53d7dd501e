"""The package's import structure: no import cycle, no private name taken from a sibling.

Both checks read the source with ``ast``, so imports inside functions count as much as those
at the top of a module (a cycle hidden in a function still ties the modules together).
"""

import ast
import pathlib

import pytest

import skdebias

ROOT = pathlib.Path(skdebias.__file__).parent


def _module_name(path):
    parts = ("skdebias",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _package(name):
    """The package a module's relative imports start from."""
    return name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]


def _imports(name):
    """``(target module, imported names, line)`` for every skdebias import of module ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package(name).split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("skdebias"):
                continue
            names = [a.name for a in node.names]
            # ``from . import x`` / ``from .pkg import mod`` import modules
            mods = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            out.append((target, [n for n in names if f"{target}.{n}" not in MODULES],
                        node.lineno))
            out.extend((m, [], node.lineno) for m in mods)
        elif isinstance(node, ast.Import):
            out.extend((a.name, [], node.lineno) for a in node.names
                       if a.name.startswith("skdebias"))
    return out


def _graph():
    graph = {}
    for name in MODULES:
        edges = set()
        for target, _, _ in _imports(name):
            # importing a.b.c runs a and a.b first
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                if t in MODULES and t != name and not name.startswith(t + "."):
                    edges.add(t)
        graph[name] = edges
    return graph


def _find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_checker_sees_imports_inside_functions():
    edges = _graph()
    # the CLI imports the demo lazily, inside its command functions
    assert any(t.startswith("skdebias.") for t in edges["skdebias.cli"])
    assert len(MODULES) > 20


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _is_private_module(target):
    return any(part.startswith("_") and part != "__init__" for part in target.split(".")[1:])


def _shared(target):
    """The utilities package and the bases are there to be imported by every module."""
    last = target.split(".")[-1]
    return target.startswith("skdebias._utils") or last in ("base", "_base")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_private_name_from_another_module(name):
    for target, names, line in _imports(name):
        if target not in MODULES or target == name or _shared(target):
            continue
        # a package re-exports the public names of its own private modules
        own_package = target.rpartition(".")[0] == _package(name)
        private = [n for n in names if n.startswith("_")]
        where = f"{MODULES[name].relative_to(ROOT.parent)}:{line}"
        assert not private, f"{where} imports private {private} from {target}"
        assert not (_is_private_module(target) and not own_package), (
            f"{where} imports from the private module {target} of another package")


def test_public_names_are_exported():
    import skdebias

    for name in skdebias.__all__:
        assert getattr(skdebias, name) is not None, name
