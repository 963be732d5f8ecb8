"""The documentation site builds without a single warning (``sphinx-build -W``).

The build reads the Markdown pages of ``docs/``, generates the API reference
from the docstrings and copies the tutorials' figures; it never runs a
tutorial.  About 20 s of CPU time (single-threaded); much longer in wall time on a busy machine.
"""

from __future__ import annotations

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="the docs build needs sphinx (the `docs` or `test` extra)")
pytest.importorskip("myst_parser", reason="the docs build needs myst-parser (the `docs` or `test` extra)")

import gpytorch_tp

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def built_site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    html, doctrees = out / "html", out / "doctrees"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", "-d", str(doctrees)]
        + [str(DOCS), str(html)],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"sphinx-build -W failed:\n{result.stdout}\n{result.stderr}"
    assert "WARNING" not in result.stderr, result.stderr
    return html


def test_every_markdown_page_is_built(built_site):
    pages = {p.relative_to(DOCS).with_suffix(".html") for p in DOCS.rglob("*.md") if "_build" not in p.parts}
    pages.discard(Path("README.html"))  # the contributors' note is not a page
    assert pages, "no Markdown pages found"
    missing = sorted(str(p) for p in pages if not (built_site / p).is_file())
    assert not missing, f"pages not in the site: {missing}"


def test_api_reference_has_a_page_per_module_with_rendered_math(built_site):
    modules = [gpytorch_tp.__name__] + [
        info.name
        for info in pkgutil.walk_packages(gpytorch_tp.__path__, prefix=gpytorch_tp.__name__ + ".")
        if not any(part.startswith("_") for part in info.name.split("."))  # private modules have no page
    ]
    generated = built_site / "api" / "generated"
    missing = [name for name in modules if not (generated / f"{name}.html").is_file()]
    assert not missing, f"modules without an API page: {missing}"

    # The kernels' docstrings carry ``.. math::`` blocks and ``:param:`` fields:
    # they must come out as MathJax math and a parameter list, not as raw text.
    page = (generated / "gpytorch_tp.kernels.mlp_kernel.html").read_text()
    assert 'class="math' in page and "mathjax" in page.lower()
    assert 'id="gpytorch_tp.kernels.mlp_kernel.MLPKernel"' in page
    assert ".. math::" not in page and ":param " not in page


def test_tutorial_pages_show_their_figures_and_scripts(built_site):
    tutorials = sorted(p.stem for p in (ROOT / "tutorials").glob("*.py"))
    assert len(tutorials) >= 4
    for name in tutorials:
        page_path = built_site / "tutorials" / f"{name}.html"
        assert page_path.is_file(), f"tutorial {name} has no page in docs/tutorials/"
        page = page_path.read_text()
        images = re.findall(r'<img[^>]+src="([^"]+\.png)"', page)
        assert images, f"the page of tutorial {name} shows no figure"
        for src in images:
            assert (page_path.parent / src).resolve().is_file(), (name, src)
        assert "def main(" in re.sub(r"<[^>]+>", "", page), f"the page of tutorial {name} does not include the script"
