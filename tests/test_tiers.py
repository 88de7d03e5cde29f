"""The test tiers: a test module that loads an engine when it is imported belongs to the slow tier as a whole.

(tests/conftest.py catches, at run time, a single unmarked test that starts an engine; this catches the
imports at the top of a module, which load the engine for every test in it, fast or not.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import HEAVY_MODULES

REPO = Path(__file__).resolve().parent.parent


def _top_level_imports(path: Path) -> set[str]:
    """Modules a file imports at module level (not inside functions), including `if` and `try` blocks."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return names


def _loads_an_engine(module: str, seen: set[str] | None = None) -> bool:
    """Whether importing module imports pyspark, ray, tensorflow or keras (following m9's own imports)."""
    seen = set() if seen is None else seen
    if module.split(".")[0] in HEAVY_MODULES:
        return True
    if module in seen or not module.startswith("m9"):
        return False
    seen.add(module)
    source = REPO / (module.replace(".", "/") + ".py")
    package = REPO / module.replace(".", "/") / "__init__.py"
    path = source if source.exists() else package if package.exists() else None
    return path is not None and any(_loads_an_engine(m, seen) for m in _top_level_imports(path))


def _marked_slow(path: Path) -> bool:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            return "slow" in ast.unparse(node.value)
    return False


@pytest.mark.parametrize("path", sorted((REPO / "tests").glob("test_*.py")), ids=lambda p: p.name)
def test_a_module_that_imports_an_engine_is_marked_slow(path: Path) -> None:
    heavy = sorted(m for m in _top_level_imports(path) if _loads_an_engine(m))
    if heavy:
        assert _marked_slow(path), (
            f"{path.name} imports {', '.join(heavy)} at module level, so even its fast tests load an engine: "
            f"set pytestmark = pytest.mark.slow, or import inside the tests"
        )


def test_the_engine_import_check_sees_an_engine(tmp_path: Path) -> None:
    """The check above can fail: a module importing pyspark, or an m9 module that does, is caught."""
    module = tmp_path / "test_x.py"
    module.write_text("import pytest\nfrom pyspark.sql import SparkSession\n")
    assert sorted(m for m in _top_level_imports(module) if _loads_an_engine(m)) == [
        "pyspark.sql",
        "pyspark.sql.SparkSession",
    ]
    assert not _marked_slow(module)
    module.write_text("import pytest\nimport ray\npytestmark = [pytest.mark.slow]\n")
    assert _marked_slow(module)
