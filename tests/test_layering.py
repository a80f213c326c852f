"""The import graph of fastopt points downward: no module imports itself through others
(also through imports inside functions), no package cycle, and code outside the backends
reaches a backend only through the registry (fastopt._backends), the shared constants
(fastopt._backends._layout) and the storage formats' contract (fastopt._backends._formats)."""

import ast
from pathlib import Path

import fastopt

ROOT = Path(fastopt.__file__).parent
# what may be imported from outside fastopt._backends
BACKEND_ENTRY = {"fastopt._backends", "fastopt._backends._layout", "fastopt._backends._formats"}


def _modules():
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _imports(name):
    """The fastopt modules `name` imports, anywhere in its file."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycle(graph):
    """A cycle of the graph as a list of nodes, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in graph:
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def test_no_module_cycle():
    assert _cycle(GRAPH) is None


def _package(name):
    parts = name.split(".")
    return ".".join(parts[:2]) if name in MODULES and len(parts) > 1 else name


def test_no_package_cycle():
    packages = {}
    for name, deps in GRAPH.items():
        edges = packages.setdefault(_package(name), set())
        edges |= {_package(d) for d in deps if _package(d) != _package(name)}
    assert _cycle(packages) is None


def test_front_ends_use_the_registry():
    for name, deps in GRAPH.items():
        if name.startswith("fastopt._backends"):
            continue
        reached = {d for d in deps if d.startswith("fastopt._backends")}
        assert reached <= BACKEND_ENTRY, (name, reached - BACKEND_ENTRY)


def test_backends_do_not_import_front_ends():
    """The backends depend on the table and the host scalars, never on the optimizer
    classes or the user-facing modules."""
    allowed = {"fastopt._rules", "fastopt._scalars", "fastopt._interop", "fastopt._config",
               "fastopt._check", "fastopt._cpu"}
    for name, deps in GRAPH.items():
        if name.startswith("fastopt._backends"):
            outside = {d for d in deps if not d.startswith(("fastopt._backends", "fastopt._cpu"))}
            assert outside <= allowed, (name, outside - allowed)
