"""The static checks CI runs with the tests: lint (ruff), types (mypy on quinkgl_cli/) and the package layers
(import-linter contracts in pyproject.toml). Each runs as its own tool so its report reads as the tool prints it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: install the test extras (pip install -c constraints.txt -e '.[test]')")
    return path


def _run(*argv: str) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout}\n{proc.stderr}"


def test_ruff_is_clean() -> None:
    _run(_tool("ruff"), "check", "quinkgl_cli", "tests", "benchmarks")


def test_mypy_is_clean() -> None:
    _run(_tool("mypy"))


def test_package_layers_hold() -> None:
    _run(_tool("lint-imports"))
