"""MkDocs hooks and a Griffe extension for the site (both named in mkdocs.yml).

0. ``on_files`` (MkDocs hook) adds the tutorials to the site: each executed
   notebook ``tutorials/NN_*.ipynb`` (and a tutorial kept as Markdown, such as
   ``tutorials/06_torchrun.md``) becomes the page ``tutorials/NN_*.md``, with
   its code, text outputs and plots (see :func:`tutorial_pages`).
1. ``on_page_content`` (MkDocs hook) renders Sphinx roles as code and links.
2. ``ExampleSections`` (Griffe extension) reads a Google-style ``Example:``
   section as ``Examples:``. Griffe treats the singular form as an admonition
   of Markdown text, so its ``>>>`` lines would render as nested block quotes
   run together into one paragraph; as ``Examples:`` they render as code.

Sphinx roles:

The docstrings use Sphinx roles such as ``:class:`~accounting.mechanism.Mechanism```,
which mkdocstrings leaves as literal text (":class:" before the code). This
hook drops the role, shortens a ``~``-prefixed name to its last part (as Sphinx
does) and turns the name into an *optional* cross-reference: a link when the
API reference documents that object, plain code otherwise (never a warning).
Names that are not fully qualified are looked up in the module of the API page
(its ``::: module`` line).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|const|py:\w+):<code>(~?)([\w.]+?)(\(\))?</code>")
_MODULE = re.compile(r"^:::\s*([\w.]+)", flags=re.MULTILINE)
_OUR_PACKAGES = ("dp_microclip", "accounting")


def on_page_content(html_text: str, page, **kwargs) -> str:  # noqa: ARG001  (mkdocs hook signature)
    found = _MODULE.search(page.markdown or "")
    module = found.group(1) if found else None

    def replace(match: re.Match) -> str:
        short, name, call = match.group(1), match.group(2), match.group(3) or ""
        shown = html.escape((name.rsplit(".", 1)[-1] if short else name) + call)
        if name.split(".")[0] in _OUR_PACKAGES:
            identifier = name
        elif module is not None:
            identifier = f"{module}.{name}"
        else:
            return f"<code>{shown}</code>"
        return f'<autoref identifier="{html.escape(identifier)}" optional><code>{shown}</code></autoref>'

    return _ROLE.sub(replace, html_text)


TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _site_links(markdown: str) -> str:
    """Links of a tutorial, as seen from its page ``tutorials/NN_*.md`` in the site.

    A guide (``../docs/X.md``) and another tutorial (``NN_*.ipynb``) stay
    links; a link to any other file of the repository (a script) keeps only
    its text, since the site does not hold that file.
    """
    def replace(match: re.Match) -> str:
        bang, text, target = match.groups()
        if bang or re.match(r"^([a-z]+:|#)", target):
            return match.group(0)
        if target.startswith("../docs/") and target.split("#")[0].endswith(".md"):
            return f"[{text}](../{target[len('../docs/'):]})"
        stem = target.split("#")[0]
        if re.fullmatch(r"\d\d_\w+\.ipynb", stem):
            return f"[{text}]({stem[:-len('.ipynb')]}.md)"
        return text

    return _LINK.sub(replace, markdown)


def _fence(text: str, language: str) -> str:
    ticks = "````" if "```" in text else "```"
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"


def render_notebook(path: Path) -> str:
    """A notebook as one Markdown page: its Markdown cells, its code, its text outputs and its plots.

    Args:
        path: an executed ``.ipynb`` file (nbformat 4).

    Returns:
        Markdown; a PNG output becomes an ``<img>`` with the image inline (a data URI).
    """
    notebook = json.loads(path.read_text(encoding="utf-8"))
    parts = [f"<small>Rendered from `tutorials/{path.name}`, executed by the test suite "
             f"(`python -m tutorials.render` runs it again). Source: `tutorials/{path.stem}.py`.</small>"]
    for cell in notebook["cells"]:
        source = "".join(cell.get("source", []))
        if cell["cell_type"] == "markdown":
            parts.append(_site_links(source))
            continue
        if cell["cell_type"] != "code" or not source.strip():
            continue
        parts.append(_fence(source, "python"))
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if output["output_type"] == "stream":
                parts.append(_fence("".join(output["text"]), "text"))
            elif "image/png" in data:
                png = "".join(data["image/png"]).replace("\n", "")
                alt = html.escape("".join(data.get("text/plain", "plot")), quote=True)
                parts.append(f'<img alt="{alt}" src="data:image/png;base64,{png}"/>')
            elif "text/plain" in data:
                parts.append(_fence("".join(data["text/plain"]), "text"))
            elif output["output_type"] == "error":
                parts.append(_fence("\n".join(output.get("traceback", [])), "text"))
    return "\n\n".join(parts) + "\n"


def tutorial_pages(folder: Path = TUTORIALS) -> dict[str, str]:
    """The site's tutorial pages: ``{"tutorials/NN_name.md": markdown}``, in the order of their numbers.

    Every ``NN_*.ipynb`` is rendered (:func:`render_notebook`); an ``NN_*.md``
    is a page of its own only when no notebook has its number (the others say
    where their tutorial moved).
    """
    notebooks = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    numbers = {p.name[:2] for p in notebooks}
    pages = {f"tutorials/{p.stem}.md": render_notebook(p) for p in notebooks}
    for page in sorted(folder.glob("[0-9][0-9]_*.md")):
        if page.name[:2] not in numbers:
            pages[f"tutorials/{page.name}"] = _site_links(page.read_text(encoding="utf-8"))
    return dict(sorted(pages.items()))


def on_files(files, config, **kwargs):  # noqa: ARG001  (mkdocs hook signature)
    """Add the tutorial pages (:func:`tutorial_pages`) to the site's files."""
    from mkdocs.structure.files import File

    for uri, content in tutorial_pages().items():
        files.append(File.generated(config, uri, content=content))
    return files


_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename Google-style ``Example:`` sections to ``Examples:`` before Griffe parses the docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: ARG002  (griffe event signature)
        docstring = obj.docstring
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _EXAMPLE_HEADER.sub(r"\1Examples:", docstring.value)
