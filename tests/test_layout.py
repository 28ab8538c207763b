"""The package layout: no import circles, and the experiments' plots import no runner."""

from __future__ import annotations

import ast
from pathlib import Path

import adadamp

PACKAGE = Path(adadamp.__file__).parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package), for every module of adadamp."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _import_graph() -> dict[str, set[str]]:
    """Module -> the adadamp modules it imports anywhere in its source.

    Every import statement counts: at the top, inside functions, and under
    ``if TYPE_CHECKING:``; a circle of any of them is a design circle.
    """
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for a in node.names:
                    # "from . import model" imports a module; "from .model import X" a name of one.
                    sub = f"{source}.{a.name}"
                    if sub in modules:
                        targets.add(sub)
                    elif source in modules:
                        targets.add(source)
        targets.discard(name)
        graph[name] = targets
    return graph


def _find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules, first repeated last), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return path[path.index(name) :] + [name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            circle = visit(target, path + [name])
            if circle:
                return circle
        done.add(name)
        return None

    for name in sorted(graph):
        circle = visit(name, [])
        if circle:
            return circle
    return None


def test_graph_sees_every_kind_of_import():
    graph = _import_graph()
    assert "adadamp.simulate.model" in graph["adadamp.simulate.cli"]  # from . import model
    assert "adadamp.estimators" in graph["adadamp"]  # inside a function
    assert "adadamp.experiments.results" in graph["adadamp.experiments.plots"]


def test_find_circle_finds_one():
    assert _find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_circle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    assert _find_circle(_import_graph()) is None


def test_plots_import_no_runner():
    runners = {f"adadamp.experiments.{m}" for m in ("compare", "synthetic", "train")}
    assert not _import_graph()["adadamp.experiments.plots"] & runners
