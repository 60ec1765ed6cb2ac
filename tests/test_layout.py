"""The library's shape, measured from its own code: no import cycles, no import that runs back up the stages, no
Dagster in `moce_model/`, no function-local import of the library's own modules, no library file over 500 lines
(but the synthetic data's templates), and every function over 80 lines says why in its docstring.

Stages, lowest first (a module may import its own stage and the ones below it):
common < variants < data < clustering < model < training < merging, generate < evaluation < study < experiment
< rehearsal. `python -m tests.test_layout` prints the figures.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "moce_model"
STAGES: tuple[tuple[str, ...], ...] = (
    ("common",), ("variants",), ("data",), ("clustering",), ("model",), ("training",), ("merging", "generate"),
    ("evaluation",), ("study",), ("experiment",), ("rehearsal",),
)
MAX_LIBRARY_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
# Pure data templates may be longer: they are text, not logic.
LONG_FILES_ALLOWED = {"moce_model/data/synthetic.py"}


def library_files() -> list[Path]:
    return sorted((ROOT / LIBRARY).rglob("*.py"))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imported_modules(node: ast.AST, known: set[str]) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        found = []
        for alias in node.names:
            full = f"{node.module}.{alias.name}"
            found.append(full if full in known else node.module)
        return found
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def import_graph() -> dict[str, set[str]]:
    """Module → the library modules it imports, anywhere in the file (function bodies included)."""
    known = {module_name(p) for p in library_files()}
    graph: dict[str, set[str]] = defaultdict(set)
    for path in library_files():
        name = module_name(path)
        graph[name]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported_modules(node, known):
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != name and target != LIBRARY:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def stage_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for rank, names in enumerate(STAGES):
        if top in names:
            return rank
    raise AssertionError(f"{module}: not in any stage of tests/test_layout.py STAGES; place it there")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{source} -> {target}" for source, targets in graph.items() for target in targets
                  if source != LIBRARY and stage_of(target) > stage_of(source))


def local_library_imports() -> list[str]:
    """Function-local imports of the library's own modules (each one hides an edge of the graph)."""
    found = []
    for path in library_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if any(m.startswith(LIBRARY) for m in _imported_modules(inner, set())):
                        found.append(f"{path.relative_to(ROOT)}:{inner.lineno}")
    return found


def long_files() -> list[str]:
    return [f"{p.relative_to(ROOT)} ({n} lines)" for p in library_files()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LIBRARY_FILE_LINES
            and str(p.relative_to(ROOT)) not in LONG_FILES_ALLOWED]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_import_runs_back_up_the_stages():
    assert upward_imports(import_graph()) == []


def test_library_has_no_dagster():
    graph_sources = [p for p in library_files() if "dagster" in p.read_text(encoding="utf-8")
                     and any(m.split(".")[0] == "dagster" for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                             for m in _imported_modules(node, set()))]
    assert graph_sources == []


def long_functions_without_reason() -> list[str]:
    """Functions over MAX_FUNCTION_LINES lines (nested definitions included) whose docstring does not say why
    (a line starting `Long:`), in the library and the Dagster side."""
    found = []
    for folder in (LIBRARY, "assets", "pipelines", "resources"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES \
                        and "Long:" not in (ast.get_docstring(node) or ""):
                    found.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_long_functions_say_why():
    assert long_functions_without_reason() == []


def test_library_files_stay_short():
    assert long_files() == []


def test_library_imports_its_own_modules_at_module_level():
    assert local_library_imports() == []


def test_the_checks_can_fail():
    graph = {"moce_model.data.a": {"moce_model.model.b"}, "moce_model.model.b": {"moce_model.data.a"}}
    assert cycles(graph) == [["moce_model.data.a", "moce_model.model.b"]]
    assert upward_imports(graph) == ["moce_model.data.a -> moce_model.model.b"]


if __name__ == "__main__":
    graph = import_graph()
    print(f"modules: {len(graph)}; import edges: {sum(map(len, graph.values()))}")
    print(f"import cycles: {len(cycles(graph))} {cycles(graph)}")
    print(f"upward imports: {len(upward_imports(graph))} {upward_imports(graph)}")
    print(f"function-local library imports: {len(local_library_imports())}")
    print(f"library files over {MAX_LIBRARY_FILE_LINES} lines: {long_files()}")
    print(f"functions over {MAX_FUNCTION_LINES} lines without a reason: {long_functions_without_reason()}")
