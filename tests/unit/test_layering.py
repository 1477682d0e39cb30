"""The package's import graph: no circle, and no module imports one from a layer above it.

Every ``megatron_tgdpo`` import is counted, at module level and inside functions (a lazy import is
still a dependency). Layers, low to high (``docs/architecture.md``)::

    0 foundation   compat, manifest, monitoring, distributed, tasks/, data/, ops/
    1 model        models/llama, layers, state_dict, fused_head, losses/, memory, config
    2 storage      checkpointing, convert/
    3 sources      models/sources
    4 runtime      runtime/
    5 methods      logprob_cache, generation/, algorithms/, pipeline/
    6 entry points train, demo, replicate, ppo, precompute; testing (the multi-rank harness preloads everything)
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_tgdpo"

LAYERS = [
    ("compat", "manifest", "monitoring", "distributed", "tasks", "data", "ops"),
    ("models.llama", "models.layers", "models.state_dict", "models.fused_head", "models", "losses", "memory", "config"),
    ("checkpointing", "convert"),
    ("models.sources",),
    ("runtime",),
    ("logprob_cache", "generation", "algorithms", "pipeline"),
    ("train", "demo", "replicate", "ppo", "precompute", "testing"),
]


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


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".") if package else []
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join(anchor + ([base] if base else []))
                base = "megatron_tgdpo." + base if base else "megatron_tgdpo"
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


def test_no_import_circle():
    graph = _graph()
    # Packages import their own submodules (re-exports); those edges are containment, not dependencies.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
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
    assert not cycles, f"import circles: {cycles}"


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
