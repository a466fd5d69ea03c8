"""Project rules that keep the code base healthy (STYLE 1, 5)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_imports_neither_orchestration_nor_dagster_nor_dvc() -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & {"dagster", "dvc", "orchestration", "dagster_pipes"})
        for p in (ROOT / "megacontext").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert "dagster" in _imports(ROOT / "orchestration" / "definitions.py")  # the scan does see imports


def test_modules_stay_small() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.glob("[mo]*/**/*.py")}
    assert sizes and {k: n for k, n in sizes.items() if n > 800} == {}


def test_every_module_opens_with_a_docstring() -> None:
    missing = [str(p.relative_to(ROOT)) for p in (ROOT / "megacontext").rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
