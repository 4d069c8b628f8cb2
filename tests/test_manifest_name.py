"""The manifest's file name is spelled once, `latentforge.manifest.MANIFEST_NAME`: code elsewhere
that wrote the literal would silently miss a rename. Docstrings and comments may name the file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from latentforge.manifest import MANIFEST_NAME

ROOT = Path(__file__).resolve().parent.parent
CODE = ("platform", "pipelines", "jobs", "benchmarks")
DEFINED_IN = ROOT / "platform" / "latentforge" / "manifest.py"
LITERAL = re.compile(rf"(?<![\w.]){re.escape(MANIFEST_NAME)}")  # not data_manifest.json, another file


def _docstrings(tree: ast.AST) -> set[int]:
    bodies = (node.body for node in ast.walk(tree) if isinstance(getattr(node, "body", None), list))
    return {id(stmt.value) for body in bodies for stmt in body
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)}


def literals(source: str) -> list[int]:
    """Lines of the string constants (f-string parts included) that spell the manifest's name."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docs and LITERAL.search(node.value)]


def test_the_checker_finds_the_literal_and_passes_docstrings_and_other_names() -> None:
    source = ('"""Writes manifest.json."""\n'
              'def f(d):\n    """Reads d/manifest.json."""\n    return d / "manifest.json"\n'
              'g = lambda d: f"{d}/manifest.json, rerun"  # manifest.json\n'
              'h = "data_manifest.json"\n')
    assert literals(source) == [4, 5]


def test_no_code_outside_manifest_py_spells_the_manifest_name() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}" for top in CODE for path in sorted((ROOT / top).rglob("*.py"))
             if path != DEFINED_IN for line in literals(path.read_text(encoding="utf-8"))]
    assert found == [], f"use latentforge.manifest.MANIFEST_NAME (or manifest_uri) instead of the literal: {found}"
    assert literals(DEFINED_IN.read_text(encoding="utf-8"))  # the one place it is spelled
