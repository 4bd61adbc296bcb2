"""The import graph of embedkit: no cycles, and the stages upstream of deployment never import it.

Static rules, from the source alone (``ast``): every ``import`` / ``from ... import`` in every
module of embedkit/, at module level and inside functions / methods alike (a function-level
import is still a dependency, only a deferred one), relative imports resolved. Imports under
``if TYPE_CHECKING:`` are left out: they never run. ``from pkg import name`` counts as an
import of the submodule ``pkg.name`` when that is a module, else of ``pkg`` itself. A package is
its ``__init__`` module; importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, but
those implicit edges are not in the graph (each package's ``__init__`` is checked on its own).
Imports by computed name (``__import__(f"{__name__}.{name}")``, importlib) are not seen.

No exception is made for registries: a package ``__init__`` that imports its plugin modules
(even inside a function) while they import the registry back from the package is a cycle here
too; keep the registry in a module of its own that the plugins import.

Run as a script (``python tests/test_imports.py``) to print the cycles and the upstream modules
that reach ``embedkit.deploy``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "embedkit"

#: The deployment stage and the command line, the only modules that may import embedkit.deploy.
#: Everything else is upstream of deployment (training, heads, extraction, evaluation, the
#: report, the core modules): "data flows one way" (embedkit/__init__.py).
DOWNSTREAM = ("embedkit.deploy", "embedkit.cli")
#: Upstream modules named outright, so that a rename does not silently empty the rule.
UPSTREAM = (
    "embedkit.cnn",
    "embedkit.heads",
    "embedkit.backbones",
    "embedkit.audio",
    "embedkit.report",
    "embedkit.fit",
    "embedkit.pipeline",
    "embedkit.extract",
    "embedkit.store",
    "embedkit.evaluate",
    "embedkit.runs",
)
#: The model files the deployment stage loads: they must not pull in the training engine either.
MODEL_MODULES = ("embedkit.cnn.model", "embedkit.cnn.finetuned")
TRAINING_ENGINE = "embedkit.cnn.loop"


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=1)
def modules() -> dict[str, Path]:
    """embedkit module name -> source file."""
    return {_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, deferred: bool = True):
    """Every Import / ImportFrom node, at any depth, except under ``if TYPE_CHECKING:``;
    ``deferred`` False: only those that run on import (not inside functions)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if not deferred and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base = base[:-1]  # a plain module's relative imports start from its package
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _target(name: str) -> str | None:
    """The embedkit module ``name`` refers to (the nearest enclosing module), or None."""
    mods = modules()
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


@lru_cache(maxsize=1)
def graph() -> dict[str, dict[str, int]]:
    """module -> {imported embedkit module: line of the first such import}."""
    out: dict[str, dict[str, int]] = {}
    for mod, path in modules().items():
        edges: dict[str, int] = {}
        is_package = path.name == "__init__.py"
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = _resolve(node, mod, is_package)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names]
            for n in names:
                t = _target(n) if n.split(".")[0] == "embedkit" else None
                if t is not None and t != mod:
                    edges.setdefault(t, node.lineno)
        out[mod] = edges
    return out


def components() -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each is a set of
    modules every one of which imports, directly or not, every other."""
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, comps = set(), [], []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(g)))
    for v in sorted(g):
        if v not in index:
            strong(v)
    return sorted(comps, key=min)


def _shortest_cycle(start: str, comp: set[str]) -> list[str]:
    g = graph()
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier and start not in prev:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if w in comp and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    path, v = [start], prev[start]
    while v != start:
        path.append(v)
        v = prev[v]
    return [start] + path[:0:-1] + [start]


def cycles() -> list[list[str]]:
    """Import cycles as paths [a, b, ..., a]: shortest ones, enough of them to pass through
    every module of every strongly connected component."""
    found = []
    for comp in components():
        covered: set[str] = set()
        for v in sorted(comp):
            if v not in covered:
                c = _shortest_cycle(v, comp)
                covered.update(c)
                found.append(c)
    return found


def _show_path(path: list[str]) -> str:
    g = graph()
    return " -> ".join(
        [path[0]] + [f"{b} ({modules()[a].relative_to(ROOT)}:{g[a][b]})" for a, b in zip(path, path[1:])]
    )


def path_to(src: str, is_target) -> list[str] | None:
    """A shortest import chain from ``src`` to a module for which ``is_target(name)``."""
    g = graph()
    prev = {src: None}
    frontier = [src]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(g[v]):
                if w in prev:
                    continue
                prev[w] = v
                if is_target(w):
                    chain = [w]
                    while prev[chain[-1]] is not None:
                        chain.append(prev[chain[-1]])
                    return chain[::-1]
                nxt.append(w)
        frontier = nxt
    return None


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _deploy(name: str) -> bool:
    return _under(name, ("embedkit.deploy",))


def upstream_reaching_deploy() -> dict[str, list[str]]:
    """Module outside DOWNSTREAM -> an import chain (module-level or deferred) that ends in
    embedkit.deploy."""
    out = {}
    for mod in sorted(graph()):
        if not _under(mod, DOWNSTREAM):
            chain = path_to(mod, _deploy)
            if chain is not None:
                out[mod] = chain
    return out


# ---------------------------------------------------------------------------------------------
# Tests


def test_the_graph_sees_relative_and_function_level_imports():
    g = graph()
    assert len(g) > 50 and "embedkit.deploy.tagger" in g
    # relative, module level: ``from ..errors import ...``
    assert "embedkit.errors" in g["embedkit.deploy.tagger"]
    # relative, inside a function: ``from ..cnn.finetuned import load_finetuned`` in a loader
    assert "embedkit.cnn.finetuned" in g["embedkit.deploy.tagger"]
    # ``from . import headcache`` inside a function: the submodule, not the package
    assert "embedkit.deploy.headcache" in g["embedkit.deploy.tagger"]
    assert "embedkit.deploy" not in g["embedkit.deploy.tagger"]


def test_no_import_cycles():
    found = cycles()
    assert not found, "import cycles among embedkit's modules (module (file:line of the import)):\n" + "\n".join(
        _show_path(c) for c in found
    )


def test_upstream_stages_never_import_deploy():
    for mod in UPSTREAM:
        assert mod in graph() and not _under(mod, DOWNSTREAM), f"{mod} is gone: update UPSTREAM"
    bad = upstream_reaching_deploy()
    assert not bad, "upstream modules importing embedkit.deploy (directly or through another module):\n" + "\n".join(
        _show_path(chain) for chain in bad.values()
    )


def test_model_files_do_not_import_the_training_engine():
    for mod in MODEL_MODULES:
        assert mod in graph(), f"{mod} is gone: update MODEL_MODULES"
        chain = path_to(mod, lambda n: n == TRAINING_ENGINE or _deploy(n))
        assert chain is None, f"{mod} reaches {chain[-1]}: " + _show_path(chain)


def test_loading_model_files_imports_neither_deploy_nor_the_training_engine():
    """The same at runtime, parent packages included (what ``load_tagger`` pays for a .pt file)."""
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODEL_MODULES)
        + "bad = sorted(m for m in sys.modules if m.startswith('embedkit.deploy') or m == "
        + repr(TRAINING_ENGINE)
        + ")\nprint(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {', '.join(MODEL_MODULES)} imported: {r.stdout.strip()}"


def test_onnx_runtime_imports_no_torch_statically():
    """``embedkit.deploy.onnx_runtime`` and every embedkit module it imports at module level
    import no torch / sklearn / librosa at module level (tests/test_export.py checks the same at
    runtime)."""
    heavy = ("torch", "sklearn", "librosa")
    seen, todo, bad = set(), ["embedkit.deploy.onnx_runtime"], []
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = modules()[mod]
        tree = ast.parse(path.read_text(), str(path))
        for sub in _import_nodes(tree, deferred=False):  # what runs on import: deferred imports are the point
            if isinstance(sub, ast.Import):
                names = [a.name for a in sub.names]
            else:
                base = _resolve(sub, mod, path.name == "__init__.py")
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in sub.names]
            for n in names:
                if n.split(".")[0] in heavy:
                    bad.append(f"{path.relative_to(ROOT)}:{sub.lineno} imports {n}")
                t = _target(n) if n.split(".")[0] == "embedkit" else None
                if t is not None:
                    todo.append(t)
                    # importing a.b.c runs a/__init__ and a/b/__init__ first
                    parts = t.split(".")
                    todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    for c in cycles():
        print("cycle:", _show_path(c))
    for chain in upstream_reaching_deploy().values():
        print("upstream -> deploy:", _show_path(chain))
    for mod in MODEL_MODULES:
        if mod in graph():
            chain = path_to(mod, lambda n: n == TRAINING_ENGINE or _deploy(n))
            if chain:
                print("model file -> engine/deploy:", _show_path(chain))
