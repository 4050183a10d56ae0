"""Sphinx configuration of jaxjd's documentation (``python -m sphinx -W -b html docs
docs/_build/html``). Sphinx because its autodoc reads the docstrings as they are (Google-style
sections through napoleon, ``:func:`` roles, math) and its wheels are all that is needed: no
theme or Markdown plug-in outside Sphinx itself."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import jaxjd

project = "jaxjd"
author = "the jaxjd developers"
release = version = jaxjd.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the jaxtyping shapes are in the signatures' text already
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: autodoc documents the NamedTuple fields once
napoleon_attr_annotations = False  # jaxtyping strings such as "*batch" are not reST
exclude_patterns = ["_build"]
html_theme = "alabaster"
suppress_warnings = ["ref.python"]  # duplicate names re-exported at the top level


def _cell(text: str) -> str:
    """A Markdown table cell as reStructuredText inline text."""
    text = text.replace("\\|", "|")
    return re.sub(r"`([^`]+)`", r"``\1``", text)


def _tables_from_readme() -> str:
    """The README's "TorchJD -> jaxjd" tables as reStructuredText list-tables (one source)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## TorchJD → jaxjd", 1)[1].split("\n## ", 1)[0]
    out, rows = [], []

    def flush():
        if rows:
            out.append(".. list-table::\n   :header-rows: 1\n")
            for row in rows:
                out.append("   * - " + "\n     - ".join(_cell(c) or "\\ " for c in row))
            out.append("")
            rows.clear()

    for line in section.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-", ":"} for c in cells):
                rows.append(cells)
        else:
            flush()
    flush()
    return "\n".join(out)


def _figure_from_notebook() -> bytes:
    """The dual-cone picture: the first figure of notebook 1 (executed and committed, so that the
    site needs neither matplotlib nor a second copy of the plotting code)."""
    notebook = Path(__file__).parents[1] / "notebooks" / "01_basic_usage.ipynb"
    for cell in json.loads(notebook.read_text())["cells"]:
        for output in cell.get("outputs", []):
            if "image/png" in output.get("data", {}):
                return base64.b64decode(output["data"]["image/png"])
    raise RuntimeError(f"{notebook} has no figure")


def _write_generated(app) -> None:
    for target, content in (
        (Path(app.srcdir) / "_generated_torchjd_tables.inc", _tables_from_readme().encode()),
        (Path(app.srcdir) / "_static" / "dual_cone.png", _figure_from_notebook()),
    ):
        target.parent.mkdir(exist_ok=True)
        if not target.exists() or target.read_bytes() != content:
            target.write_bytes(content)


def setup(app):
    app.connect("builder-inited", _write_generated)
