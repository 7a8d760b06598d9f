"""The package has no import cycle: no module needs, while it loads or runs, a module that
needs it. Imports inside functions would hide one: only the command line imports lazily
(to start fast), nothing else."""

import ast
import pkgutil
from pathlib import Path

import tasprune

ROOT = Path(tasprune.__file__).parent


def _modules() -> dict[str, Path]:
    found = {"tasprune": ROOT / "__init__.py"}
    for info in pkgutil.walk_packages([str(ROOT)], prefix="tasprune."):
        base = ROOT.joinpath(*info.name.split(".")[1:])
        found[info.name] = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
    return found


LAZY = ("tasprune.cli", "tasprune.commands")  # the command line may import in functions


def _imports(path: Path, inside_functions: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module, those inside a function or the others."""
    tree = ast.parse(path.read_text())
    kinds = (ast.Import, ast.ImportFrom)
    in_functions = {id(n) for f in ast.walk(tree)
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                    for n in ast.walk(f) if isinstance(n, kinds)}
    return [n for n in ast.walk(tree)
            if isinstance(n, kinds) and (id(n) in in_functions) == inside_functions]


def _loads(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tasprune modules `name` imports, at module level or inside a function, and the
    packages above them."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in [*_imports(path, False), *_imports(path, True)]:
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    out = set()
    for target in targets:
        parts = target.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # a package above the importer is loading already: importing from it loads nothing
    return {t for t in out if t in modules and t != name and not name.startswith(t + ".")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_level_import_cycle():
    modules = _modules()
    assert len(modules) > 40 and "tasprune.tas.searcher" in modules
    graph = {name: _loads(name, path, modules) for name, path in modules.items()}
    assert "tasprune.settings" in graph["tasprune.tas.searcher"]
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_only_the_command_line_imports_inside_functions():
    lazy = []
    for name, path in _modules().items():
        if name.startswith(LAZY):
            continue
        for node in _imports(path, inside_functions=True):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if (module or "").startswith("tasprune") or getattr(node, "level", 0):
                lazy.append(f"{name}: {module}")
    assert not lazy, lazy


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
