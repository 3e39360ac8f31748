"""Sphinx configuration for segdistill's documentation."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

import segdistill  # noqa: E402
from _torch_inventory import write_inventory  # noqa: E402

project = "segdistill"
author = "segdistill developers"
copyright = "2026, segdistill developers"
release = segdistill.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax bundled into _static/: formulas render offline
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "**/summary.md", "ablation/README.md", "ablation/main_job/*", "benchmarks/*.md"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = ["Shape"]

# The build machine has no network: torch's inventory is written from the installed
# torch (its public names, linked to the pages pytorch.org generates for them).
intersphinx_mapping = {
    "torch": ("https://docs.pytorch.org/docs/stable/", str(write_inventory(HERE / "_build"))),
}

html_theme = "furo"
html_static_path: list[str] = []
html_title = f"segdistill {release}"
