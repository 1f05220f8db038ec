"""Docstring rendering fixes for the API site: a MkDocs hook and a Griffe extension (both named in mkdocs.yml).

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
import re

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


_EXAMPLE_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename Google-style ``Example:`` sections to ``Examples:`` before Griffe parses the docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: ARG002  (griffe event signature)
        docstring = obj.docstring
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _EXAMPLE_HEADER.sub(r"\1Examples:", docstring.value)
