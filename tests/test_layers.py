"""The code flows one way: no module imports one that imports it back, and each of limo's packages
(and benchmarks/, above them all) imports only the layers below it (docs/ARCHITECTURE.md draws them). Every import counts, the
ones inside functions included: an import deferred to dodge a cycle is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Each package's layer: a package imports only packages of lower layers (siblings never import each other).
LAYERS = {"limo.tools": 0, "limo.kernels": 1, "limo.model": 2, "limo.data": 3, "limo.engine": 4, "limo.eval": 4,
          "limo.curate": 5, "benchmarks": 6}


def _package(module: str) -> str | None:
    """The layered package a module name belongs to (limo.eval.sampler.llm -> limo.eval), or None."""
    parts = module.split(".")
    name = ".".join(parts[:2]) if parts[0] == "limo" else parts[0]
    return name if name in LAYERS else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """What `path` imports of ours: `import a.b` names a.b; `from a import b` names a.b (a module, or
    a name in module a: _graph resolves it to the longest module that exists)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the importing module's package
                package = module.split(".")[: len(module.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, base] if base else package)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if _package(n))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in LAYERS for p in (ROOT / pkg.replace(".", "/")).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = set()
        for imported in _imports(path, name):
            while imported not in files and "." in imported:  # `from pkg.mod import fn` names pkg.mod.fn
                imported = imported.rsplit(".", 1)[0]
            if imported in files and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path (a, b, ..., a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_packages_import_only_the_layers_below_them():
    wrong = sorted({(_package(a), _package(b), a, b) for a, targets in _graph().items() for b in targets
                    if _package(a) != _package(b) and LAYERS[_package(b)] >= LAYERS[_package(a)]})  # fmt: skip
    assert not wrong, "imports against the layers (package -> package: module -> module):\n" + "\n".join(
        f"  {pa} -> {pb}: {a} -> {b}" for pa, pb, a, b in wrong)


# Inside benchmarks/: scripts share helpers through the harness alone. These run other scripts'
# measurements: the CI profile, the GPU summary and projection, the sampler's front (--host and
# --contexts run bench_sampler_cpu.py), the pytest-benchmark entry points.
AGGREGATORS = {"benchmarks.regression", "benchmarks.summary", "benchmarks.project", "benchmarks.bench_sampler",
               "benchmarks.test_bench_kernels"}


def test_benchmark_scripts_share_helpers_through_the_harness_only():
    wrong = sorted((a, b) for a, targets in _graph().items() if a.startswith("benchmarks.") and a not in AGGREGATORS
                   for b in targets if b.startswith("benchmarks.") and b != "benchmarks.harness")  # fmt: skip
    assert not wrong, "benchmark scripts importing each other (share the helper through benchmarks/harness.py):\n" + "\n".join(
        f"  {a} -> {b}" for a, b in wrong)


def test_the_checks_see_a_cycle_and_a_layer_broken_in_a_function():
    """The checks themselves: a cycle through a deferred import is found and named."""
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": set()}
    assert _cycle(graph) == ["a.x", "a.y", "a.z", "a.x"]
    assert _cycle({"a.x": {"a.y"}, "a.y": set()}) is None
    imported = _imports(ROOT / "limo" / "engine" / "train.py", "limo.engine.train")
    assert "limo.model.qwen2.build_model" in imported and "limo.data.dataset.load_samples" in imported  # the second, inside train()
