"""Layout rules from DEVELOPERS.md that, broken, break torch/ray in confusing ways."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_no_python_directly_in_platform() -> None:
    # A `platform` package would shadow the stdlib module under pytest and Ray's working_dir.
    offenders = sorted(p.name for p in (REPO / "platform").iterdir() if p.suffix == ".py")
    assert offenders == [], f"move these into platform/latentforge/: {offenders}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_imports_point_one_way() -> None:
    # jobs -> pipelines -> latentforge: the library never imports ray, pipelines or jobs.
    for path in (REPO / "platform" / "latentforge").rglob("*.py"):
        bad = _imports(path) & {"ray", "pipelines", "jobs"}
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    for path in (REPO / "pipelines").rglob("*.py"):
        assert "jobs" not in _imports(path), f"{path.relative_to(REPO)} imports jobs"
