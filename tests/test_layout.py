"""The package's shape: sub-packages in layers, no import cycle, Ray and click only where they belong.

Imports are read from the source (top-level and function-level alike), so a lazy import that breaks a
rule counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Top to bottom: a module may import its own layer's and lower layers' modules, never a higher one's.
LAYERS = [
    {"jobs"},
    {"pipeline.ops"},
    {"pipeline.run"},
    {"pipeline.data", "pipeline.encode"},
    {"pipeline.tokenize"},
    {"pipeline.output"},
    {"pipeline.config", "pipeline.hub", "pipeline.inputs", "pipeline.sample_data"},
    {"pipeline.errors", "pipeline.faults", "pipeline"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for package in ("pipeline", "jobs"):
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _layer(module: str) -> int:
    best = None
    for depth, group in enumerate(LAYERS):
        for prefix in group:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (depth, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_module_imports_a_higher_layer():
    wrong = [f"{a} imports {b}" for a, deps in _graph().items() for b in deps if _layer(b) < _layer(a)]
    assert not wrong, wrong


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(dep):] + [node, dep])
                                     if dep in trail else f"import cycle through {node} -> {dep}")
            if dep not in state:
                visit(dep, trail + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


RAY_LAYER = ("pipeline.run.ray_engine",)  # the Ray engine; the local one and everything else run without Ray


def test_only_the_ray_layer_imports_ray_and_only_jobs_imports_click():
    for name, path in _modules().items():
        imported = {m.split(".")[0] for m in _imports(path)}
        if name not in RAY_LAYER:
            assert "ray" not in imported, f"{name} imports ray"
        if not name.startswith("jobs"):
            assert "click" not in imported, f"{name} imports click"


def test_the_readers_and_the_contract_import_no_encoder():
    graph = _graph()
    for name in graph:
        if name.startswith(("pipeline.data", "pipeline.output")):
            assert not any(dep.startswith(("pipeline.encode", "pipeline.run")) for dep in graph[name]), name
