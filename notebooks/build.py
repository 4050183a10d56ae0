"""Builds and executes the notebooks from the cell sources in this folder's ``src_*.py`` files.

Each source file is split into cells at lines ``# %%`` (code) and ``# %% [markdown]`` (markdown,
written as ``#``-comments). The notebook is executed in place with nbclient, so outputs and plots
are kept.

    python notebooks/build.py            # all notebooks
    python notebooks/build.py 01 04      # those whose name starts with 01 or 04
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent


def cells_of(source: str):
    cells, kind, lines = [], None, []

    def flush():
        text = "\n".join(lines).strip("\n")
        if kind == "markdown":
            text = "\n".join(line[2:] if line.startswith("# ") else line[1:] for line in lines)
            text = text.strip("\n")
            cells.append(nbformat.v4.new_markdown_cell(text))
        elif kind == "code" and text:
            cells.append(nbformat.v4.new_code_cell(text))

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return cells


def build(src: Path, execute: bool = True, timeout: int = 600) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells_of(src.read_text())
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    out = HERE / (src.stem.removeprefix("src_") + ".ipynb")
    if execute:
        NotebookClient(nb, timeout=timeout, resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(nb, out)
    return out


def main(prefixes):
    for src in sorted(HERE.glob("src_*.py")):
        name = src.stem.removeprefix("src_")
        if prefixes and not any(name.startswith(p) for p in prefixes):
            continue
        print("built", build(src), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
