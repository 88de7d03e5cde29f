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


#: The rooms of m9 that work without an engine: importing any module in them must not load pyspark, ray,
#: tensorflow, keras or onnxruntime (the fast tier tests them; the engines are imported inside functions).
ENGINE_FREE = (
    "m9.config",
    "m9.errors",
    "m9.io",
    "m9.store",
    "m9.ui",
    "m9.data",
    "m9.stages.contract",
    "m9.stages.lifecycle",
    "m9.model.decode",
)

#: What an engine-free room must not import: the engines, and ONNX Runtime (the model's runtime).
ENGINES = (*HEAVY_MODULES, "onnxruntime")


def _modules_of(name: str) -> list[str]:
    path = REPO / name.replace(".", "/")
    if not path.is_dir():
        return [name]
    return sorted(f"{name}.{p.stem}" if p.stem != "__init__" else name for p in path.glob("*.py"))


def _imports_without(modules: list[str], blocked: tuple[str, ...]) -> tuple[bool, str]:
    """Import modules in a fresh interpreter in which every top-level package of blocked is missing."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError('engine ' + name + ' imported')\n"
        "sys.meta_path.insert(0, Block())\n" + "".join(f"import {module}\n" for module in modules)
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    return result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("room", ENGINE_FREE)
def test_an_engine_free_room_imports_without_an_engine(room: str) -> None:
    ok, stderr = _imports_without(_modules_of(room), ENGINES)
    assert ok, f"a module of {room} needs an engine to import:\n{stderr}"


def test_the_engine_free_check_sees_an_import() -> None:
    """The check above can fail: m9.io.storage imports pyarrow at module level, so without it it fails."""
    assert _imports_without(["m9.io.storage"], ("pyarrow",))[0] is False
    assert _imports_without(["m9.io.storage"], ENGINES)[0] is True
