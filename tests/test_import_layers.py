"""The package's import graph: no cycles, and ``mdm_kernels/ops`` imports only downwards.

Parsed statically (``ast``) from the source files, so every ``import`` counts — also those
inside functions, which would hide a cycle from an import-time check.
"""
from __future__ import annotations

import ast
from pathlib import Path

import mdm_kernels

PACKAGE_DIR = Path(mdm_kernels.__file__).parent

#: Layers of ``mdm_kernels/ops`` (Triton side), lowest first; a module may import only
#: modules of strictly lower layers.
OPS_LAYERS = [
    {"runtime_flags", "launch_context"},
    {"triton_helpers"},
    {"marginal_terms"},
    {"sample_tiles"},
    {"gathered_tiles", "outer_sums", "single_program", "gradient_penalty"},
    {"triton_ops"},
    {"router"},
    {"triton_backend"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module → the package modules it imports (anywhere in its source)."""
    files = {_module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                # the longest package module that the target names
                while t and t not in files:
                    t = t.rpartition(".")[0]
                # a package is initialised before its submodules: importing an ancestor
                # (``from . import sibling``) is no edge
                if t and t != module and not module.startswith(t + "."):
                    graph[module].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules, or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_detects_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_package_has_no_import_cycle():
    graph = import_graph()
    assert "mdm_kernels.ops.router" in graph  # the graph was read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ops_modules_import_only_lower_layers():
    graph = import_graph()
    layer_of = {f"mdm_kernels.ops.{name}": i for i, names in enumerate(OPS_LAYERS)
                for name in names}
    missing = [m for m in layer_of if m not in graph]
    assert not missing, f"layer table names modules that do not exist: {missing}"
    bad = [f"{m} (layer {layer_of[m]}) imports {t} (layer {layer_of[t]})"
           for m in layer_of for t in graph[m]
           if t in layer_of and layer_of[t] >= layer_of[m]]
    assert not bad, "\n".join(bad)
    unlisted = [m for m in graph if m.startswith("mdm_kernels.ops.") and m not in layer_of
                and not m.startswith("mdm_kernels.ops.cuda")]
    assert not unlisted, f"ops modules missing from the layer table: {unlisted}"
