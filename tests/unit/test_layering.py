"""The package's import graph: no circle (between modules, nor between the packages of the layer
table), no module imports one from a layer above it, and no module reaches into another's private
(underscore) names.

Every ``megatron_tgdpo`` import is counted, at module level and inside functions (a lazy import is
still a dependency). Layers, low to high (``docs/architecture.md``)::

    0 foundation   compat, integrity, safe_pickle, monitoring, distributed, flag_checks, runtime/lifecycle, tasks/, data/, ops/, resources/, plotting
    1 model        models/llama, layers, state_dict, fused_head, losses/, guidance/, memory, config
    2 storage      checkpointing, convert/
    3 sources      models/sources
    4 runtime      runtime/
    5 methods      logprob_cache, generation/, algorithms/, pipeline/
    6 entry points train, demo, replicate, ppo, precompute, cli/, __main__; testing (the multi-rank harness preloads everything)
"""
from __future__ import annotations

import ast
from pathlib import Path

from suite import ROOT

PACKAGE = ROOT / "megatron_tgdpo"

LAYERS = [
    # runtime.lifecycle (parent-death signal, shielded helpers) needs only the standard library and is
    # what distributed calls when a launcher started the process.
    ("compat", "integrity", "safe_pickle", "monitoring", "distributed", "flag_checks", "runtime.lifecycle", "tasks", "data", "ops", "resources", "plotting"),
    ("models.llama", "models.layers", "models.state_dict", "models.fused_head", "models", "losses", "guidance", "memory", "config"),
    ("checkpointing", "convert"),
    ("models.sources",),
    ("runtime",),
    ("logprob_cache", "generation", "algorithms", "pipeline"),
    ("train", "demo", "replicate", "ppo", "precompute", "testing", "cli", "__main__"),
]


#: Known uses of another module's private names, left to their own change; each entry is
#: ``"importer -> module.name"``. An entry that no longer occurs fails the test: remove it.
PRIVATE_IMPORTS_KNOWN: frozenset[str] = frozenset()


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _level(module: str) -> int:
    best = None
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), level)
    if best is None:
        raise AssertionError(f"megatron_tgdpo.{module} is in no layer; add it to LAYERS (and docs/architecture.md)")
    return best[1]


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The dotted module an ``import from`` names, relative imports resolved against ``package``."""
    base = node.module or ""
    if node.level:
        anchor = package.split(".") if package else []
        anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
        base = ".".join(anchor + ([base] if base else []))
        base = "megatron_tgdpo." + base if base else "megatron_tgdpo"
    return base


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith("megatron_tgdpo"):
                continue
            target = name.removeprefix("megatron_tgdpo").lstrip(".")
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(p, m, known) for m, p in modules.items() if m}


def test_no_module_imports_a_layer_above_it():
    wrong = []
    for module, targets in _graph().items():
        for target in targets:
            if _level(target) > _level(module) and not (module.startswith(target + ".") or target.startswith(module + ".")):
                wrong.append(f"{module} (layer {_level(module)}) imports {target} (layer {_level(target)})")
    assert not wrong, "\n".join(sorted(wrong))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one node (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_circle():
    graph = _graph()
    # Packages import their own submodules (re-exports); those edges are containment, not dependencies.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    cycles = _cycles(edges)
    assert not cycles, f"import circles: {cycles}"


def _unit(module: str) -> str:
    """The entry of LAYERS that holds ``module`` (its longest matching prefix): the package the layer
    table speaks of, such as ``data``, ``tasks`` or ``models.sources``."""
    matches = [p for prefixes in LAYERS for p in prefixes if module == p or module.startswith(p + ".")]
    if not matches:
        raise AssertionError(f"megatron_tgdpo.{module} is in no layer; add it to LAYERS (and docs/architecture.md)")
    return max(matches, key=len)


def _package_edges(graph: dict[str, set[str]]) -> dict[str, dict[str, list[str]]]:
    """Package -> package it imports -> the module-level imports behind that edge."""
    edges: dict[str, dict[str, list[str]]] = {}
    for module, targets in graph.items():
        for target in targets:
            a, b = _unit(module), _unit(target)
            if a != b:
                edges.setdefault(a, {}).setdefault(b, []).append(f"{module} -> {target}")
    return edges


def test_no_package_circle():
    """Two packages of one layer may not import each other either (the layer test cannot see that):
    one of them is the lower one, and the shared piece belongs there."""
    edges = _package_edges(_graph())
    cycles = _cycles({a: set(bs) for a, bs in edges.items()})
    detail = [f"{a} -> {b}: {', '.join(sorted(edges[a][b]))}" for cycle in cycles for a in cycle for b in cycle
              if b in edges.get(a, {})]
    assert not cycles, f"package circles: {cycles}\n" + "\n".join(detail)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_uses(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """``(line, "module.name")`` for each private name of another ``megatron_tgdpo`` module that the file
    imports (``from m import _x``) or reads from an imported module (``m._x``)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    bound: dict[str, str] = {}  # local name -> the package module it is bound to
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = alias.name.removeprefix("megatron_tgdpo").lstrip(".")
                if alias.name.startswith("megatron_tgdpo") and alias.asname and target in known:
                    bound[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            if not base.startswith("megatron_tgdpo"):
                continue
            source = base.removeprefix("megatron_tgdpo").lstrip(".")
            for alias in node.names:
                submodule = f"{source}.{alias.name}" if source else alias.name
                if submodule in known:
                    bound[alias.asname or alias.name] = submodule
                elif _private(alias.name) and source != module:
                    uses.append((node.lineno, f"{source}.{alias.name}"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and _private(node.attr) and bound[node.value.id] != module):
            uses.append((node.lineno, f"{bound[node.value.id]}.{node.attr}"))
    return uses


def _all_private_uses() -> dict[str, list[str]]:
    """``"importer -> module.name"`` -> where, over the package and ``tools/``."""
    modules = _modules()
    known = set(modules)
    files = [(m, p) for m, p in modules.items() if m] + [(f"tools.{p.stem}", p) for p in (ROOT / "tools").glob("*.py")]
    found: dict[str, list[str]] = {}
    for module, path in files:
        for line, name in _private_uses(path, module, known):
            found.setdefault(f"{module} -> {name}", []).append(f"{path.relative_to(ROOT)}:{line}")
    return found


def test_no_private_name_used_across_modules():
    """A name with a leading underscore is its module's own; another module that needs it needs a
    public name (or the piece moved to where both can import it)."""
    found = _all_private_uses()
    new = sorted(f"{where[0]}: {key}" for key, where in found.items() if key not in PRIVATE_IMPORTS_KNOWN)
    assert not new, "private names used from another module:\n" + "\n".join(new)
    gone = sorted(PRIVATE_IMPORTS_KNOWN - set(found))
    assert not gone, f"PRIVATE_IMPORTS_KNOWN lists uses that no longer occur; remove them: {gone}"


def test_the_package_checker_sees_a_circle_inside_one_layer(monkeypatch):
    """Guard: data.x -> tasks.y and tasks.z -> data.w (both layer 0) is a package circle."""
    fake = {"data.x": {"tasks.y"}, "tasks.z": {"data.w"}, "data.w": set(), "tasks.y": set()}
    monkeypatch.setattr(__import__(__name__), "_graph", lambda: fake)
    try:
        test_no_package_circle()
    except AssertionError as exc:
        assert "['data', 'tasks']" in str(exc) and "data.x -> tasks.y" in str(exc)
    else:
        raise AssertionError("the package circle data -> tasks -> data was not detected")


def test_the_private_name_checker_sees_both_forms(tmp_path):
    """Guard: ``from m import _x`` and ``m._y`` are both found; dunders and a module's own names are not."""
    source = tmp_path / "user.py"
    source.write_text("from megatron_tgdpo.data.prepare import _write, public\n"
                      "from megatron_tgdpo.data import prepare\n"
                      "import megatron_tgdpo.config as cfg\n"
                      "def f():\n"
                      "    return prepare._helper(cfg._field, prepare.__name__)\n")
    known = {"data", "data.prepare", "config"}
    assert sorted(name for _, name in _private_uses(source, "tools.user", known)) == [
        "config._field", "data.prepare._helper", "data.prepare._write"]
    assert _private_uses(source, "data.prepare", known) == [(5, "config._field")]


def test_the_checker_sees_a_circle():
    """Guard against a checker that cannot fail: a made-up circle is found."""
    global _graph
    real = _graph
    try:
        _graph = lambda: {"a": {"b"}, "b": {"a"}}  # noqa: E731
        try:
            test_no_import_circle()
        except AssertionError as exc:
            assert "['a', 'b']" in str(exc)
        else:
            raise AssertionError("a circle a -> b -> a was not detected")
    finally:
        _graph = real
