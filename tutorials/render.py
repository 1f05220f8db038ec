"""Regenerate the tutorial notebooks from their jupytext scripts, executed, with outputs.

    python -m tutorials.render                 # every tutorial
    python -m tutorials.render 02_dp_training  # some of them

Each ``tutorials/NN_name.py`` with a jupytext header (percent format) is the source; the
``tutorials/NN_name.ipynb`` beside it is generated: read with jupytext, executed top to
bottom with nbclient in a kernel running this Python (the repository root as working
directory), written with its outputs. ``06_torchrun.py`` is a plain script: it runs under
``torchrun --standalone --nproc-per-node 2`` and its output replaces the block between the
``<!-- output -->`` markers of ``06_torchrun.md``. ``tests/test_tutorials.py`` runs the same
functions, so a tutorial that errors fails CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KERNEL = "dp-microclip-tutorials"
SCRIPTS = ("06_torchrun",)          # run as scripts with torchrun, not as notebooks


def notebook_sources() -> list[Path]:
    """The jupytext-paired tutorial scripts (``NN_name.py`` with a jupytext header), in order."""
    return sorted(p for p in HERE.glob("[0-9][0-9]_*.py") if "jupytext:" in p.read_text()[:500])


def script_sources() -> list[Path]:
    """The tutorials run as plain scripts under torchrun."""
    return [HERE / f"{name}.py" for name in SCRIPTS]


def _env_with_repo(env: dict) -> dict:
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@contextlib.contextmanager
def kernel_for_this_python():
    """A temporary kernelspec whose kernel is ``sys.executable`` (this virtualenv), found via JUPYTER_PATH.

    Why: the "python3" kernel a machine already has may belong to another Python; this one never does,
    and nothing is installed into the user's Jupyter directories.
    """
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "dp-microclip (tutorials)", "language": "python",
        }))
        saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "PYTHONPATH", "OMP_NUM_THREADS")}
        os.environ.update(_env_with_repo(os.environ))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (tmp, saved["JUPYTER_PATH"] or "") if p)
        try:
            yield KERNEL
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def execute(source: Path, timeout: int = 300):
    """Read ``source`` (a jupytext script) as a notebook and execute it; returns the executed notebook.

    Raises nbclient's ``CellExecutionError`` (with the traceback) when a cell fails, and a
    timeout error when a cell runs longer than ``timeout`` seconds.
    """
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(source)
    with kernel_for_this_python() as kernel:
        client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, record_timing=False,
                                resources={"metadata": {"path": str(REPO)}})
        client.execute()
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    return nb


def render(source: Path, timeout: int = 300) -> Path:
    """Execute ``source`` and write ``NN_name.ipynb`` beside it (with outputs)."""
    import jupytext

    target = source.with_suffix(".ipynb")
    jupytext.write(execute(source, timeout), target)
    return target


def run_script(source: Path, timeout: int = 300) -> str:
    """Run ``source`` under ``torchrun --standalone --nproc-per-node 2`` (gloo); return its output.

    Raises ``subprocess.CalledProcessError`` (output attached) when any process fails.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(source)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env_with_repo(os.environ), capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc.stdout


def render_script(source: Path, timeout: int = 300) -> Path:
    """Run the script and put its output between the markers of the markdown page beside it."""
    output = run_script(source, timeout).strip()
    page = source.with_suffix(".md")
    text = page.read_text()
    new, count = re.subn(r"(<!-- output -->\n```text\n).*?(```\n<!-- /output -->)",
                         lambda m: m.group(1) + output + "\n" + m.group(2), text, flags=re.S)
    if count != 1:
        raise ValueError(f"{page}: no <!-- output --> ```text ... ``` <!-- /output --> block to fill.")
    page.write_text(new)
    return page


def main(argv=None) -> int:
    names = set(sys.argv[1:] if argv is None else argv)
    chosen = [p for p in notebook_sources() + script_sources() if not names or p.stem in names]
    if names - {p.stem for p in chosen}:
        print(f"unknown tutorial(s): {sorted(names - {p.stem for p in chosen})}", file=sys.stderr)
        return 2
    for source in chosen:
        start = time.perf_counter()
        written = render_script(source) if source.stem in SCRIPTS else render(source)
        print(f"{written.relative_to(REPO)}  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
