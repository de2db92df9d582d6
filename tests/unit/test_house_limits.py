"""House limits: a function in rlhf/ fits in 80 lines, one in recipes/ in 120 (a recipe's loop may
be longer than a library function, never a drawer of branches)."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("folder", "limit"), [("rlhf", 80), ("recipes", 120)])
def test_functions_fit_the_house_limit(folder, limit):
    too_long = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, f"over {limit} lines:\n" + "\n".join(too_long)
