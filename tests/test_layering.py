"""The architecture's rules, checked over the source: imports point one way, no file reaches into another's privates.

* ``dp_microclip/layers/`` (the per-layer maths) imports nothing of the engine above it: only
  ``grouping``, ``errors``, ``tensors`` and other layer files.
* ``clipping.py`` and ``noise.py`` are leaves (no engine imports); ``accounting/`` imports nothing from
  ``dp_microclip``.
* No library file outside ``engine.py`` reads or writes an engine private (``engine._x``), and no
  library file assigns to another object's private attribute (``obj._x = ...``).
* No library file is longer than 500 lines, and ``engine.py`` no longer than 450.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "dp_microclip").rglob("*.py"))
ACCOUNTING = sorted((ROOT / "accounting").rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _library_imports(path: Path) -> set[str]:
    return {name for name in _imports(path) if name.startswith("dp_microclip.")}


LAYERS_MAY_IMPORT = ("dp_microclip.layers", "dp_microclip.grouping", "dp_microclip.errors", "dp_microclip.tensors")


@pytest.mark.parametrize("path", [p for p in LIBRARY if "layers" in p.parts], ids=lambda p: p.name)
def test_layer_rules_import_nothing_above_them(path):
    above = sorted(name for name in _library_imports(path)
                   if not name.startswith(LAYERS_MAY_IMPORT) and name != "dp_microclip")
    assert not above, f"{path.relative_to(ROOT)} imports {above}: layer rules know their maths, not the engine"


@pytest.mark.parametrize("name", ["clipping.py", "noise.py", "tensors.py", "errors.py"])
def test_leaves_import_no_engine_part(name):
    imports = _library_imports(ROOT / "dp_microclip" / name)
    assert not {n for n in imports if not n.startswith(("dp_microclip.errors", "dp_microclip.tensors"))}, imports


@pytest.mark.parametrize("path", ACCOUNTING, ids=lambda p: p.name)
def test_accounting_imports_nothing_from_dp_microclip(path):
    assert not [n for n in _imports(path) if n.split(".")[0] == "dp_microclip"]


_ENGINE_PRIVATE = re.compile(r"\bengine\._[a-zA-Z]")
_FOREIGN_PRIVATE_WRITE = re.compile(r"^\s*(?!self\b)[A-Za-z_][\w.]*\._[a-zA-Z]\w*\s*=[^=]", re.M)


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_file_reaches_into_another_objects_privates(path):
    text = path.read_text()
    if path.name != "engine.py":
        assert not _ENGINE_PRIVATE.findall(text), f"{path.name} touches an engine private"
    writes = [m.group(0).strip() for m in _FOREIGN_PRIVATE_WRITE.finditer(text)]
    assert not writes, f"{path.name} writes another object's private attribute: {writes}"


@pytest.mark.parametrize("path", LIBRARY + ACCOUNTING, ids=lambda p: str(p.relative_to(ROOT)))
def test_files_stay_small(path):
    limit = 450 if path.name == "engine.py" and path.parent.name == "dp_microclip" else 500
    lines = len(path.read_text().splitlines())
    assert lines <= limit, f"{path.relative_to(ROOT)} has {lines} lines (at most {limit}): split it by job"


def test_the_file_map_lists_every_library_file():
    """docs/engine.md's map names every module of the library (a new file gets its one-line job there)."""
    text = (ROOT / "docs" / "engine.md").read_text()
    missing = []
    for path in LIBRARY:
        rel = path.relative_to(ROOT / "dp_microclip")
        if rel.name == "__init__.py":
            continue
        if f"`{rel.as_posix()}`" not in text and f"`{rel.name}`" not in text:
            missing.append(rel.as_posix())
    assert not missing, f"docs/engine.md's file map does not name {missing}"
