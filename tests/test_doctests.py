"""Run the docstring examples of every module of the installed package."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import segdistill

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(segdistill.__path__, prefix="segdistill.")
    if not info.name.endswith("__main__")  # importing it runs the program
)


def test_every_module_is_collected():
    assert {"segdistill.losses.affinity", "segdistill.translator"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output: list[str] = []
    for test in finder.find(module, name, globs={"torch": torch, **vars(module)}):
        runner.run(test, out=output.append)
    failed, _ = runner.summarize(verbose=False)
    assert failed == 0, "".join(output)
