"""Every notebook runs from its source, top to bottom, in a fresh kernel (its cells assert what
they show); the committed .ipynb files are the executed outputs of the same sources."""

import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("src_*.py"))

pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
sys.path.insert(0, str(NOTEBOOKS))
import build  # noqa: E402


def test_there_are_five_notebooks_each_committed_with_outputs():
    assert len(SOURCES) == 5
    for src in SOURCES:
        nb = json.loads((NOTEBOOKS / (src.stem.removeprefix("src_") + ".ipynb")).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(c.get("outputs") for c in code[:1]), src.name
        committed = [
            c["source"] if isinstance(c["source"], str) else "".join(c["source"]) for c in code
        ]
        assert committed == [
            c.source for c in build.cells_of(src.read_text()) if c.cell_type == "code"
        ], f"{src.name} changed: run python notebooks/build.py"
        images = [o for c in code for o in c["outputs"] if "image/png" in o.get("data", {})]
        assert images, f"{src.name} has no plot"


# Running the five notebooks takes ~90 s of the default suite's budget: the slow sweep runs them
# (CI runs it when time allows); the check above, that each committed notebook is its source's
# build with outputs and a plot, stays in the default suite.
@pytest.mark.slow
@pytest.mark.parametrize("src", SOURCES, ids=[s.stem for s in SOURCES])
def test_notebook_runs(src, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.v4.new_notebook()
    nb.cells = build.cells_of(src.read_text())
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
