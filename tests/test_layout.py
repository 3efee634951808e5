"""The package's floors: what each room may import (docs/design.md, "Layout")."""

import ast
from pathlib import Path

import torch_mhc

PKG = Path(torch_mhc.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every ``torch_mhc...`` module a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch_mhc"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("torch_mhc")}
    return found


def test_ops_imports_only_the_ground_floor():
    for path in (PKG / "ops").glob("*.py"):
        bad = {m for m in imported_modules(path) if not m.startswith(("torch_mhc.ops", "torch_mhc.numerics"))}
        assert not bad, f"{path.name} imports {bad}"


def test_numerics_imports_nothing_from_the_package():
    assert imported_modules(PKG / "numerics.py") == set()
