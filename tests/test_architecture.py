"""The package's import graph has no cycles, and each layer imports only what it may (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "loramerge"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (any import, also inside functions: a cycle through a
    deferred import is still a cycle of responsibilities)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from package import submodule`` imports the submodule; ``from module import name`` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "loramerge":
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return [*path[path.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_is_read():
    graph = import_graph()
    assert len(graph) > 30 and sum(map(len, graph.values())) > 50


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


FOUNDATION = {"errors", "catalogue", "seeding", "threads", "devices", "dtypes", "recipe"}
MAY_IMPORT = {  # package -> the packages it may use (docs/architecture.md); the foundation is open to all
    "errors": set(), "catalogue": set(), "seeding": set(), "threads": set(), "devices": set(), "dtypes": set(),
    "recipe": set(),
    "kernels": set(), "lowrank": set(), "io": set(),
    "adapters": {"kernels", "lowrank", "io"},
    "folding": {"adapters", "lowrank", "io"},
    "dense": {"adapters", "folding", "kernels", "lowrank", "io"},
    "evaluate": {"io"},
    "moe": {"adapters", "dense", "io"},
    "train": {"adapters", "evaluate", "io"},
    "search": {"adapters", "evaluate", "io"},
    "workflows": {"adapters", "dense", "folding", "evaluate", "io"},
}  # fmt: skip


def package_of(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_each_package_imports_only_the_layers_below_it():
    wrong = []
    for module, targets in import_graph().items():
        source = package_of(module)
        if source not in MAY_IMPORT:  # the CLI and the lazy top-level API may use everything
            continue
        for target in targets:
            used = package_of(target)
            if used != source and used not in MAY_IMPORT[source] | (FOUNDATION - {source}):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports across the layering: " + ", ".join(sorted(wrong))


def test_no_command_module_imports_another():
    graph = import_graph()
    commands = [name for name in graph if name.startswith("loramerge.cli.") and name.endswith("_cmd")]
    assert len(commands) >= 5
    for command in commands:
        others = {t for t in graph[command] if t.startswith("loramerge.cli.") and t != "loramerge.cli.present"}
        assert not others, f"{command} imports {others}"
