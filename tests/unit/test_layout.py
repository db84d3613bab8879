"""The dependency rules of the layout: common/ stands alone; actors/ and learner/ never import each other; no
import circles anywhere in the product."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTER = {"launch", "launcher", "tools", "mlx_ppo", "examples"}
FORBIDDEN = {
    "common": {"actors", "learner"} | OUTER,
    "actors": {"learner"} | OUTER,
    "learner": {"actors"} | OUTER,
}


def _imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_the_layout(package):
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_packages(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_no_pickle_anywhere():
    for path in ROOT.glob("[!.]*/**/*.py"):
        assert not _imported_packages(path) & {"pickle", "cloudpickle", "dill"}, path


PRODUCT = ["actors", "learner", "common", "launcher", "tools", "mlx_ppo", "examples"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, known: set[str]) -> set[str]:
    """The product modules ``path`` imports, at the top or inside functions alike (a lazy import still
    makes a circle: it only moves the failure to run time)."""
    package = _module_name(path).rpartition(".")[0] if path.name != "__init__.py" else _module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + [base]
                ).strip(".")
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in candidates if name in known}
    return found


def _import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    paths = [p for package in PRODUCT if (root / package).is_dir() for p in (root / package).rglob("*.py")]
    known = {_module_name(p) for p in paths}
    return {_module_name(p): _imported_modules(p, known) - {_module_name(p)} for p in paths}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm): each is a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_cycle_finder_finds_a_circle_and_none_in_a_chain():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circles():
    graph = _import_graph()
    assert "common.config_checks" in graph["common.config"]  # the graph sees package imports
    assert "common.exit_codes" in graph["actors.reward_process"]
    assert _cycles(graph) == []
