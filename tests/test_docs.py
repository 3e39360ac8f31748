"""The API reference names every public symbol; the docs' result files exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import segdistill

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.skipif(not DOCS.is_dir(), reason="run from a source checkout")
def test_every_public_name_is_in_the_api_reference():
    text = (DOCS / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. (?:autoclass|autofunction|py:data):: segdistill\.(\w+)",
                                text, flags=re.MULTILINE))
    # a public submodule (segdistill.presets) is documented by an automodule directive
    modules = set(re.findall(r"^\.\. automodule:: segdistill\.(\w+)$", text, flags=re.MULTILINE))
    documented |= modules & set(segdistill.__all__)
    missing = sorted(set(segdistill.__all__) - documented)
    assert not missing, f"add to docs/api.rst: {missing}"
    unknown = sorted(documented - set(segdistill.__all__))
    assert not unknown, f"documented but not public: {unknown}"


@pytest.mark.skipif(not DOCS.is_dir(), reason="run from a source checkout")
def test_included_result_files_exist():
    for page in DOCS.rglob("*.rst"):
        for target in re.findall(r"^\.\. (?:include|image):: (\S+)", page.read_text(),
                                 flags=re.MULTILINE):
            assert (page.parent / target).is_file(), f"{page.name} includes missing {target}"


@pytest.mark.slow
@pytest.mark.skipif(not DOCS.is_dir(), reason="run from a source checkout")
def test_the_built_docs_load_nothing_from_another_host(tmp_path):
    """Every <script src> and <link href> of the HTML points inside the build, so the docs
    (formulas included: MathJax is bundled) work offline. CI passes its build in
    SEGDISTILL_DOCS_HTML; otherwise the docs are built here."""
    import os
    from html.parser import HTMLParser

    built = os.environ.get("SEGDISTILL_DOCS_HTML")
    if built:
        html = Path(built)
    else:
        sphinx = pytest.importorskip("sphinx.cmd.build")
        pytest.importorskip("furo")
        html = tmp_path / "html"
        assert sphinx.build_main(["-q", "-b", "html", str(DOCS), str(html)]) == 0

    class Loads(HTMLParser):
        def __init__(self):
            super().__init__()
            self.urls = []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "script" and attrs.get("src"):
                self.urls.append(attrs["src"])
            if tag == "link" and attrs.get("href") and attrs.get("rel") in (
                    "stylesheet", "preload", "modulepreload", "icon"):
                self.urls.append(attrs["href"])

    pages = sorted(html.rglob("*.html"))
    assert len(pages) > 5
    mathjax = False
    for page in pages:
        parser = Loads()
        parser.feed(page.read_text(encoding="utf-8"))
        for url in parser.urls:
            assert not re.match(r"^([a-z]+:)?//", url, flags=re.IGNORECASE), (page.name, url)
            target = (page.parent / url.split("?")[0].split("#")[0]).resolve()
            assert target.is_file(), (page.name, url)
            mathjax |= "mathjax" in url
    assert mathjax, "no page loads the bundled MathJax"


@pytest.mark.skipif(not DOCS.is_dir(), reason="run from a source checkout")
def test_the_readmes_method_table_is_the_committed_ablations():
    """Each mean ± std of the README's every-method table is a row of
    docs/ablation/methods/summary.md (written by the ablation script), in its order."""
    readme = (DOCS.parent / "README.md").read_text()
    start = readme.index("Every method at its preset's reference weights")
    table = readme[start:readme.index("\n\n", readme.index("| method |", start))]
    shown = re.findall(r"\| (\d+\.\d\d ± \d+\.\d\d) \|", table)
    summary = (DOCS / "ablation" / "methods" / "summary.md").read_text()
    measured = re.findall(r"^\| \S+ \| 3 \| (\d+\.\d\d ± \d+\.\d\d) \|", summary,
                          flags=re.MULTILINE)
    assert len(shown) == 12 and shown == measured
