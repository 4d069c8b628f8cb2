"""The docs a newcomer follows stay whole: every docs/*.md is linked from the README, every relative
link in the README and the docs opens a file that exists, and every module docs/architecture.md names
exists. Files are only read (nothing is imported), so a renamed module fails here, not in a reader's hands.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted((REPO / "docs").glob("*.md"))
LINKED_FROM = [REPO / "README.md", *DOCS]
ARCHITECTURE = REPO / "docs" / "architecture.md"

# [text](target) in Markdown; the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# Repository paths of code in backticks, and dotted library names: `pipelines/train.py`,
# `platform/latentforge/conversion/`, `latentforge.tracking.default_run_name`.
CODE_PATH = re.compile(r"`((?:platform/latentforge|pipelines|jobs|tests)/[\w/.]*?)`")
DOTTED = re.compile(r"\blatentforge(?:\.\w+)+")

# Dotted names in the page that are MLflow tags, not modules.
TAGS = {"latentforge.stage", "latentforge.export_uri"}


def relative_links(path: Path) -> list[str]:
    """Link targets in `path` that point into the repository (no URL, no bare #anchor)."""
    targets = LINK.findall(path.read_text(encoding="utf-8"))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_every_doc_is_linked_from_the_readme() -> None:
    linked = {(REPO / t.split("#")[0]).resolve() for t in relative_links(REPO / "README.md")}
    assert DOCS, "no docs/*.md found"
    missing = [doc.name for doc in DOCS if doc.resolve() not in linked]
    assert not missing, f"README.md links none of {missing}: add each to its docs list with one line"


@pytest.mark.parametrize("path", LINKED_FROM, ids=[p.relative_to(REPO).as_posix() for p in LINKED_FROM])
def test_relative_links_resolve(path: Path) -> None:
    broken = [t for t in relative_links(path) if not (path.parent / t.split("#")[0]).exists()]
    assert not broken, f"{path.relative_to(REPO)} links files that do not exist: {broken}"


@cache
def top_level_names(module_file: Path) -> frozenset[str]:
    """Names a module defines or imports at its top level (what `module.NAME` can reach)."""
    names: set[str] = set()
    for node in ast.parse(module_file.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return frozenset(names)


def module_file(parts: list[str]) -> Path | None:
    """`["latentforge", "x", "y"]` -> platform/latentforge/x/y.py or .../y/__init__.py, if either exists."""
    base = REPO / "platform" / Path(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def dotted_name_exists(name: str) -> bool:
    """The longest module prefix of `name` exists and defines the next part (deeper parts are attributes)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        found = module_file(parts[:cut])
        if found is not None:
            return cut == len(parts) or parts[cut] in top_level_names(found)
    return False


def path_exists(path: str) -> bool:
    return (REPO / path).exists()


def named_modules() -> list[str]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    return sorted(set(CODE_PATH.findall(text)) | set(DOTTED.findall(text)))


def exists(name: str) -> bool:
    return path_exists(name) if "/" in name else dotted_name_exists(name)


def test_architecture_names_only_modules_that_exist() -> None:
    names = named_modules()
    assert "latentforge.tracking" in names and "pipelines/train.py" in names, "the name patterns found nothing"
    missing = [name for name in names if name not in TAGS and not exists(name)]
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def described_subpackages() -> set[str]:
    """The first column of the subpackage table in docs/architecture.md."""
    section = ARCHITECTURE.read_text(encoding="utf-8").split("### The library's subpackages")[1].split("\n#")[0]
    return set(re.findall(r"^\| `(\w+)` \|", section, flags=re.M))


def test_architecture_describes_every_library_module() -> None:
    library = REPO / "platform" / "latentforge"
    packages = {p.parent.name for p in library.glob("*/__init__.py")}
    undescribed = sorted(packages - described_subpackages())
    assert not undescribed, f"add these subpackages to docs/architecture.md's table: {undescribed}"
    unknown = sorted(name for name in described_subpackages() - packages)
    assert not unknown, f"docs/architecture.md's table describes subpackages that do not exist: {unknown}"
    modules = {f"latentforge.{p.stem}" for p in library.glob("*.py") if p.stem != "__init__"}
    unnamed = sorted(modules - set(named_modules()))
    assert not unnamed, f"docs/architecture.md names none of these top-level modules: {unnamed}"


def test_the_name_checks_can_fail() -> None:
    assert dotted_name_exists("latentforge.tracking.default_run_name")
    assert not dotted_name_exists("latentforge.tracking.no_such_name")
    assert not dotted_name_exists("latentforge.no_such_module")
    assert path_exists("pipelines/train.py") and not path_exists("pipelines/no_such_stage.py")
