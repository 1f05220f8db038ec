"""Lint (ruff) and type check (mypy) of the library, configured in pyproject.toml: part of `make test`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff_finds_nothing_in_the_library_and_tests():
    pytest.importorskip("ruff", reason="ruff comes with the dev extra (make install)")
    proc = _run("ruff", "check", "dp_microclip", "accounting", "tests", "benchmarks", "experiments", "tutorials")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_finds_nothing_in_the_library():
    pytest.importorskip("mypy", reason="mypy comes with the dev extra (make install)")
    proc = _run("mypy")
    assert proc.returncode == 0, proc.stdout + proc.stderr
