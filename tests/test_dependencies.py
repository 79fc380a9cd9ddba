"""pyproject.toml's runtime dependencies are exactly the distributions the packages import."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tensornets", "compress", "adapters")
#: runtime dependencies the packages use through another library, not by importing them
USED_THROUGH = {"gguf"}  # transformers reads GGUF files with it (tensornets.models.load_gguf)


def imported_modules() -> set[str]:
    """Top-level names of every module the packages import, at module level or inside functions."""
    names = set()
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - set(PACKAGES) - {"__future__"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_dependencies_are_what_the_packages_import():
    declared = {canonical(re.split(r"[<>=!~;\[ ]", spec, maxsplit=1)[0])
                for spec in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    imported = {canonical(dist) for module in imported_modules() for dist in distributions.get(module, [module])}
    imported |= USED_THROUGH
    assert imported == declared, (f"imported but not declared: {sorted(imported - declared)}; "
                                  f"declared but not imported: {sorted(declared - imported)}")
