"""The installed package: public names, version, typing marker."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import segdistill


def test_all_names_exist_and_are_documented():
    for name in segdistill.__all__:
        obj = getattr(segdistill, name)
        if name != "__version__":
            assert obj.__doc__ and len(obj.__doc__.strip()) > 20, name


def test_version_matches_metadata():
    assert importlib.metadata.version("segdistill") == segdistill.__version__


def test_py_typed_is_shipped():
    assert (Path(segdistill.__file__).parent / "py.typed").is_file()


def test_tests_run_against_the_installed_package():
    """CI sets SEGDISTILL_EXPECT_INSTALLED: the wheel, not the source tree, is under test."""
    import os

    import pytest

    if not os.environ.get("SEGDISTILL_EXPECT_INSTALLED"):
        pytest.skip("set SEGDISTILL_EXPECT_INSTALLED=1 to check the install (CI does)")
    assert "site-packages" in Path(segdistill.__file__).parts, segdistill.__file__


def test_the_library_imports_no_pipeline_numpy_or_matplotlib():
    """The package is the library: the training pipeline, numpy and matplotlib stay out."""
    import ast

    banned = {"numpy", "matplotlib", "examples", "torchvision", "torchmetrics", "torchdata"}
    root = Path(segdistill.__file__).parent
    for source in root.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in banned, f"{source.name} imports {name}"


def test_the_library_needs_only_torch():
    requires = importlib.metadata.requires("segdistill") or []
    core = [r for r in requires if "extra ==" not in r]
    assert [r.split(">")[0].split("=")[0].strip() for r in core] == ["torch"]
    extras = importlib.metadata.metadata("segdistill").get_all("Provides-Extra")
    assert {"examples", "test", "docs", "lint"} <= set(extras)
