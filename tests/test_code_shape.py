"""The shape of the code: no function in the library or the pipeline longer than 80 lines
of code (docstrings, comments and blank lines aside), so each does one job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 80


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef, source: list[str]) -> int:
    """Lines of code in a function, without its docstring, comments and blank lines."""
    skipped: set[int] = set()
    first = node.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        skipped = set(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    end = node.end_lineno or node.lineno
    return sum(1 for number in range(node.lineno, end + 1)
               if number not in skipped and source[number - 1].strip()
               and not source[number - 1].strip().startswith("#"))


def long_functions(folder: Path, limit: int = LIMIT, root: Path = ROOT) -> list[str]:
    """``'path:line name (N lines)'`` for every function of ``folder`` over ``limit``."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        text = path.read_text()
        source = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                count = code_lines(node, source)
                if count > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} "
                                 f"({count} lines)")
    return found


@pytest.mark.parametrize("folder", ["segdistill", "examples"])
def test_no_function_over_the_limit(folder):
    assert long_functions(ROOT / folder) == []


def test_the_counter_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}  # a comment\n" for i in range(LIMIT + 1))
    (tmp_path / "long.py").write_text(f'def f():\n    """Doc.\n\n    More.\n    """\n{body}')
    (tmp_path / "short.py").write_text('def g():\n    """Doc."""\n    # only a comment\n\n'
                                       "    return 1\n")
    assert long_functions(tmp_path, root=tmp_path) == [f"long.py:1 f ({LIMIT + 2} lines)"]
