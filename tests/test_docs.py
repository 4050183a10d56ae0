"""The documentation site: every code example on its pages runs (doctest) and the site builds
with warnings as errors (when Sphinx is installed: ``pip install -e ".[docs]"``)."""

import doctest
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"
PAGES = sorted(DOCS.rglob("*.rst"))


def test_every_page_is_listed():
    assert {p.relative_to(DOCS).as_posix() for p in PAGES} >= {
        "index.rst",
        "install.rst",
        "api.rst",
        "torchjd.rst",
        "examples/basic.rst",
        "examples/iwrm.rst",
        "examples/mtl.rst",
        "examples/data_parallel.rst",
    }


# The pages' examples run in .ci/run's documentation step (every page, always) and in the slow
# sweep, not in the default suite (its 5-minute aim on 2 cores; the library code they call
# is tested there).
@pytest.mark.slow
@pytest.mark.parametrize(
    "page",
    PAGES,
    ids=lambda p: p.relative_to(DOCS).as_posix(),
)
def test_page_examples_run(page):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    result = doctest.testfile(str(page), module_relative=False, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {page}"


@pytest.mark.slow  # about 25 s; .ci/run builds the site too
@pytest.mark.skipif(importlib.util.find_spec("sphinx") is None, reason="Sphinx not installed")
def test_site_builds_without_warnings(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-E", "-q", "-b", "html", str(DOCS), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "api.html").exists()
    api = (tmp_path / "api.html").read_text()
    import jaxjd

    missing = [name for name in jaxjd.__all__ if f"jaxjd.{name}" not in api and name not in api]
    assert not missing, missing
