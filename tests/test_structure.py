"""The package's modules import each other without a circle, lazy imports inside functions included:
each module is reachable from the ones above it only (docs/modules.md)."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "d2dmoe"


def module_of(path: Path) -> tuple[str, str]:
    """(module name, the package its relative imports start from)."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), ".".join(parts)
    return ".".join(parts), ".".join(parts[:-1])


def imports() -> dict[str, set[str]]:
    """Module -> the d2dmoe modules it imports, at the top or inside functions."""
    graph = {}
    for path in SRC.rglob("*.py"):
        name, package = module_of(path)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                # `from . import x`: the module x, not the package; `from .m import y`: m (or m.y, a submodule)
                deps |= {f"{target}.{a.name}" for a in node.names} | ({target} if node.module else set())
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_circles():
    graph, state, circles = imports(), {}, []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, f"import circles: {circles}"
