"""The complete programs in docs/ run as written.

A code block in docs/*.md or README.md preceded by the line ``MARK`` is a whole program a reader may paste
(imports included). Each runs in a fresh interpreter from the repository root; a block that no longer runs
(an argument renamed, a setting moved into ``DP(...)``) fails here instead of in a reader's hands. Blocks
without the mark are fragments (``model = ...``) and are not run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- example: tests/test_doc_examples.py runs this block -->"


def marked_blocks() -> list[tuple[str, str]]:
    """``(label, source)`` of every marked python block, in document order."""
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARK:
                continue
            assert i + 1 < len(lines) and lines[i + 1].startswith("```python"), (
                f"{path.name}:{i + 1}: the mark must sit on the line just before a ```python fence")
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            blocks.append((f"{path.relative_to(ROOT)}:{i + 2}", "\n".join(lines[i + 2:end]) + "\n"))
    return blocks


BLOCKS = marked_blocks()


def test_some_blocks_are_marked():
    assert len(BLOCKS) >= 8, "the marked examples went missing from docs/"


@pytest.mark.slow
@pytest.mark.parametrize("label,source", BLOCKS, ids=[label for label, _ in BLOCKS])
def test_doc_example_runs(label, source, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{label} fails as written:\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{label} printed nothing"
