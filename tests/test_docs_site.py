"""The site builds with ``mkdocs build --strict``; every guide and tutorial is in its nav and linked from its home page.

Needs the docs extra (``pip install -e ".[docs]"``); skipped without it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_PAGES = {
    "dp_microclip": "dp_microclip",
    "settings": "dp_microclip.settings",
    "engine": "dp_microclip.engine",
    "audit": "dp_microclip.tools.audit",
    "losses": "dp_microclip.losses",
    "hf_trainer": "dp_microclip.integrations.hf_trainer",
    "accounting": "accounting",
}


def _require_docs_tools() -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} is not installed: pip install -e \".[docs]\" to build the site")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    _require_docs_tools()
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    problems = [line for line in proc.stderr.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(problems or [proc.stderr[-3000:]])
    return out


def test_strict_build_writes_home_and_guides(site):
    assert "README.md" in (site / "index.html").read_text()
    for guide in sorted((ROOT / "docs").glob("*.md")):
        assert (site / guide.with_suffix(".html").name).is_file(), guide.name


@pytest.mark.parametrize("page, module", sorted(API_PAGES.items()))
def test_api_page_documents_its_module(site, page, module):
    text = (site / "api" / f"{page}.html").read_text()
    assert f'id="{module}"' in text, f"api/{page}.html has no heading for {module}"
    # Sphinx roles in docstrings are rendered by docs/_hooks.py, never shown as ":class:".
    assert not re.search(r":(func|class|meth|mod|attr|data|exc|obj):<code>", text)
    # "Example:" sections render as code (docs/_hooks.py), not as ">>>" block quotes run together.
    assert "<blockquote>" not in text


def test_every_guide_in_docs_is_in_the_nav():
    yaml = pytest.importorskip("yaml", reason="PyYAML (installed with mkdocs) reads mkdocs.yml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def files(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from files(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from files(value)

    in_nav = set(files(config["nav"]))
    missing = sorted(p.name for p in (ROOT / "docs").glob("*.md") if p.name not in in_nav)
    assert not missing, f"docs/{missing[0]} is not in mkdocs.yml's nav: add it under 'Guides'"
    tutorials = set(_tutorial_pages())
    missing = sorted(tutorials - in_nav)
    assert not missing, f"{missing[0]} (rendered from tutorials/) is not in mkdocs.yml's nav: add it under 'Tutorials'"
    absent = sorted(f for f in in_nav if not (ROOT / "docs" / f).is_file() and f not in tutorials)
    assert not absent, f"mkdocs.yml's nav names {absent}, which are neither in docs/ nor rendered from tutorials/"


def _tutorial_pages() -> dict[str, str]:
    pytest.importorskip("griffe", reason="docs/_hooks.py needs griffe (the docs extra)")
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import _hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    return _hooks.tutorial_pages()


def test_home_page_links_every_guide_and_tutorial():
    links = set(re.findall(r"\]\(([^)#\s]+)", (ROOT / "docs" / "index.md").read_text()))
    guides = {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert guides - links == set(), f"docs/index.md does not link {sorted(guides - links)}"
    notebooks = {f"tutorials/{p.stem}.md" for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb")}
    assert notebooks and notebooks - links == set(), f"docs/index.md does not link {sorted(notebooks - links)}"
    assert "tutorials/06_torchrun.md" in links


def test_tutorial_pages_keep_code_outputs_and_plots():
    pages = _tutorial_pages()
    assert set(pages) >= {f"tutorials/{p.stem}.md" for p in (ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb")}
    assert "tutorials/01_noise_free_clipping.md" not in pages  # a stub that says the tutorial moved
    quickstart = pages["tutorials/01_quickstart.md"]
    assert "```python" in quickstart and "dp_microclip.attach" in quickstart and "```text" in quickstart
    for uri in ("01_quickstart", "02_dp_training", "04_from_opacus", "05_huggingface"):  # their plots, inline
        assert '<img alt="' in pages[f"tutorials/{uri}.md"], uri
    for uri, page in pages.items():  # links that the site cannot resolve are dropped, not left to break it
        for target in re.findall(r"\]\(([^)\s]+)\)", page):
            assert target.startswith(("../", "#", "http")) or target.endswith(".md"), (uri, target)


def test_site_has_the_rendered_tutorials(site):
    for uri in _tutorial_pages():
        page = site / uri.replace(".md", ".html")
        assert page.is_file(), uri
    assert "data:image/png;base64," in (site / "tutorials" / "02_dp_training.html").read_text()
    home = (site / "index.html").read_text()
    assert 'href="tutorials/01_quickstart.html"' in home and 'href="science.html"' in home
