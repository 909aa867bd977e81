"""The package's shape, checked from its source: no import cycles, layers that import downwards
only, and modules and functions short enough to read in one sitting.

Imports are read with ``ast``, so a function-level (lazy) import counts like a module-level
one; only imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastvlm"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

# Layers from the bottom up: a module may import its own layer and the ones below it.
LAYERS = [
    {"fastvlm.errors"},
    {
        "fastvlm.files",
        "fastvlm.state_dicts",
        "fastvlm.measure",
        "fastvlm.dtypes",
        "fastvlm.native",
        "fastvlm.allocator",
    },
    {"fastvlm.vision"},
    {"fastvlm.processing", "fastvlm.presets", "fastvlm.config"},
    {"fastvlm.formats"},
    {
        "fastvlm.model",
        "fastvlm.generation",
        "fastvlm.decoding",
        "fastvlm.quantization",
        "fastvlm.linears",
        "fastvlm.greedy_head",
        "fastvlm.precision",
    },
    {"fastvlm.train", "fastvlm.eval", "fastvlm.serve", "fastvlm.export"},
    {"fastvlm.bench"},
    {"fastvlm.cli", "fastvlm.integrations"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_imports(tree: ast.AST, package: str) -> set[str]:
    """fastvlm modules a module imports when it runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in MODULES else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    # Importing fastvlm.a.b runs fastvlm/a/__init__.py first, so the parent packages count too
    # (all but the root package, whose only job is to re-export the public API).
    with_parents = set(found)
    for name in found:
        parts = name.split(".")
        with_parents.update(".".join(parts[:i]) for i in range(2, len(parts)))
    return {name for name in with_parents if name in MODULES}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imports = _runtime_imports(ast.parse(path.read_text()), package) - {name}
        # A module's own enclosing packages are already being imported when it runs.
        graph[name] = {target for target in imports if not name.startswith(target + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in MODULES if m != "fastvlm" and layer_of(m) is None]
    assert not unplaced, f"modules outside LAYERS (add them where they belong): {unplaced}"


def test_layers_import_only_their_own_level_or_below():
    upward = []
    for module, imports in import_graph().items():
        own = layer_of(module)
        if own is None:  # the package root re-exports the public API
            continue
        upward += [f"{module} imports {target}" for target in imports if (layer_of(target) or 0) > own]
    assert not upward, "imports that reach up a layer:\n" + "\n".join(sorted(upward))


def test_evaluation_does_not_import_the_benchmarks():
    leaks = [
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if module.startswith("fastvlm.eval")
        for target in targets
        if target.startswith("fastvlm.bench")
    ]
    assert not leaks


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_under_the_line_limit(module):
    lines = MODULES[module].read_text().count("\n")
    assert lines <= MAX_MODULE_LINES, f"{MODULES[module]} has {lines} lines (limit {MAX_MODULE_LINES})"


def test_functions_stay_under_the_line_limit():
    long = []
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, "functions over the limit:\n" + "\n".join(long)


def test_no_formatter_escapes_in_the_package():
    skips = [
        f"{path.relative_to(PACKAGE.parent)}:{number}"
        for path in MODULES.values()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "fmt: skip" in line or "fmt: off" in line
    ]
    assert not skips, f"formatter escapes: {skips}"
