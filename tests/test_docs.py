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
