"""The drivers stay short: no function or method in pipelines/ or jobs/ is over MAX_LINES lines (its `def`
line to the last line of its body), so each stage's `run` reads as a list of named steps."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def _functions() -> list[tuple[str, int, int]]:
    """("path:name", def line, length in lines) of every function and method under pipelines/ and jobs/."""
    found = []
    for folder in ("pipelines", "jobs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            name = path.relative_to(ROOT).as_posix()
            found += [(f"{name}:{node.name}", node.lineno, node.end_lineno - node.lineno + 1)
                      for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def test_the_scan_sees_the_drivers() -> None:
    names = {key for key, _, _ in _functions()}
    assert {"pipelines/generate.py:run", "pipelines/upscale.py:run", "jobs/generate.py:main"} <= names


def test_no_function_in_pipelines_or_jobs_is_over_the_limit() -> None:
    offenders = [f"{key.split(':')[0]}:{line} {key.split(':')[1]} is {length} lines"
                 for key, line, length in _functions() if length > MAX_LINES]
    assert not offenders, f"over {MAX_LINES} lines (split into named steps):\n" + "\n".join(offenders)

