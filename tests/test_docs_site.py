"""The site builds with ``mkdocs build --strict``; every guide and tutorial is in its nav and linked from its home page.

Needs the docs extra (``pip install -e ".[docs]"``); skipped without it. The screenshot test opens the built
site in headless Chromium (``apt-get install -y chromium``, which ``.ci/run`` does) and skips without it.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from collections import Counter
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


# ---------------------------------------------------------------- the site in a browser
WINDOW = (1280, 900)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it): "
                "the site is not checked in a browser")


def png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """``(width, height, pixels)`` of an 8-bit, non-interlaced PNG (what Chromium writes); zlib and struct only."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data[pos + 8:pos + 8 + length])
        elif kind == b"IDAT":
            idat.append(data[pos + 8:pos + 8 + length])
        pos += 12 + length
    assert header is not None, f"{path.name} has no IHDR chunk"
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and interlace == 0 and colour in (0, 2, 4, 6), header
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    stride, raw = width * bpp, zlib.decompress(b"".join(idat))
    prev, pixels = bytearray(stride), []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride) if kind else ():  # undo the scanline filter (PNG spec, section 9)
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + ((a + b) >> 1)) & 255
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels += [bytes(line[i:i + bpp]) for i in range(0, stride, bpp)]
        prev = line
    return width, height, pixels


@pytest.mark.parametrize("page", ["index.html", "tutorials/01_quickstart.html"])
def test_site_renders_in_a_browser(site, page, tmp_path):
    """Headless Chromium opens the built page and its screenshot is the window's size and not blank."""
    chromium = _chromium()
    shot = tmp_path / "page.png"
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", (site / page).as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), f"chromium failed on {page}:\n{proc.stderr[-2000:]}"
    width, height, pixels = png_pixels(shot)
    assert (width, height) == WINDOW, (page, width, height)
    counts = Counter(pixels)
    background = counts.most_common(1)[0][1] / len(pixels)
    # A page that failed to load (or lost its stylesheet) is one colour, or nearly: text, code and the header
    # bar give a rendered page hundreds of colours (anti-aliasing) and leave well under 95% of it background.
    assert len(counts) > 100, f"{page}: the screenshot has {len(counts)} colours: blank?"
    assert background < 0.95, f"{page}: {background:.0%} of the screenshot is one colour"
