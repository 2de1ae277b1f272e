"""Rules the product code keeps, read from its source: small functions, no swallowed errors, one atomic write.

- No function in runner/ or cluster/ is longer than 60 lines (argparse builders, named
  ``*_parser``, aside): the orchestration stays readable piece by piece.
- No handler catches every exception and does nothing (``except Exception: pass`` and alike).
- Files are replaced in one place (tasks/files.py): at most two ``os.replace`` calls.
- User errors are caught by their class (``tasks.errors.UserError``), not looked up by name.
"""
from __future__ import annotations

import ast

from conftest import REPO

PRODUCT = ("runner", "cluster", "tasks")
MAX_LINES = 60


def sources(*folders: str) -> dict[str, ast.Module]:
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(), str(p))
            for folder in folders for p in sorted((REPO / folder).rglob("*.py"))}


def test_no_function_in_runner_or_cluster_is_over_60_lines():
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in sources("runner", "cluster").items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.endswith("_parser")
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, long


def _swallows_everything(handler: ast.ExceptHandler) -> bool:
    catches_all = handler.type is None or (isinstance(handler.type, ast.Name)
                                           and handler.type.id in ("Exception", "BaseException"))
    return catches_all and all(isinstance(statement, ast.Pass) for statement in handler.body)


def test_no_handler_swallows_every_exception():
    found = [f"{path}:{node.lineno}" for path, tree in sources(*PRODUCT).items() for node in ast.walk(tree)
             if isinstance(node, ast.ExceptHandler) and _swallows_everything(node)]
    assert not found, found


def test_files_are_replaced_in_one_place():
    calls = [f"{path}:{node.lineno}" for path, tree in sources(*PRODUCT).items() for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "replace"
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "os"]
    assert len(calls) <= 2 and all(c.startswith("tasks/files.py:") for c in calls), calls


def test_user_errors_are_caught_by_class():
    main = (REPO / "runner" / "__main__.py").read_text()
    assert "sys.modules" not in main and "except UserError" in main


def test_the_rules_can_fail():
    bad = ast.parse("try:\n    x()\nexcept Exception:\n    pass\n")
    assert any(_swallows_everything(n) for n in ast.walk(bad) if isinstance(n, ast.ExceptHandler))
    fine = ast.parse("try:\n    x()\nexcept OSError:\n    pass\n")
    assert not any(_swallows_everything(n) for n in ast.walk(fine) if isinstance(n, ast.ExceptHandler))
