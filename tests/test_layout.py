"""The package's floors: what each room may import (docs/design.md, "Layout")."""

import ast
from pathlib import Path

import torch_mhc

PKG = Path(torch_mhc.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every ``torch_mhc...`` module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "torch_mhc":  # from torch_mhc import ops
            found |= {f"torch_mhc.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch_mhc"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("torch_mhc")}
    return found


def test_ops_imports_only_the_ground_floor():
    for path in (PKG / "ops").glob("*.py"):
        bad = {m for m in imported_modules(path) if not m.startswith(("torch_mhc.ops", "torch_mhc.numerics"))}
        assert not bad, f"{path.name} imports {bad}"


def test_ground_floor_imports_nothing_from_the_package():
    for name in ("numerics.py", "errors.py"):
        assert imported_modules(PKG / name) == set(), name
    assert imported_modules(PKG / "serialization.py") == {"torch_mhc.errors"}  # one step up: loading files


def room_of_module(module: str) -> str:
    """The room (first-level folder or top-level module) of a ``torch_mhc...`` module name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def room_graph() -> dict[str, set[str]]:
    """Room -> the other rooms its files import (at the top or inside functions)."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG)
        room = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        graph.setdefault(room, set()).update(r for m in imported_modules(path) if (r := room_of_module(m)) != room)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_on_handmade_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_no_room_imports_a_room_that_imports_it_back():
    graph = room_graph()
    assert {"nn", "ops", "models", "train", "diagnostics", "distributed", "reports", "integrations"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle between folders: {' -> '.join(cycle)}"


def test_distributed_sits_below_train():
    graph = room_graph()
    assert "train" not in graph["distributed"] and "integrations" not in graph["train"]


def test_diagnostics_sit_below_train_and_reports_above():
    graph = room_graph()
    assert "train" not in graph["diagnostics"] and "reports" not in graph["diagnostics"]
    assert "reports" not in graph["train"]
