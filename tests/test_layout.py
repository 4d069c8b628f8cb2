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


IMPORT_PROBE = """
import importlib, os, pkgutil, sys, threading
import latentforge
before_env, before_threads = dict(os.environ), threading.active_count()
names = [m.name for m in pkgutil.walk_packages(latentforge.__path__, "latentforge.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
changed = sorted(k for k in set(before_env) | set(os.environ) if before_env.get(k) != os.environ.get(k))
print(len(names), threading.active_count() - before_threads, changed, "ray" in sys.modules)
"""


def test_importing_the_library_has_no_side_effects() -> None:
    # Thread pools, SSL contexts and environment changes are made on first use, never at import
    # (a Ray worker or a test that only imports a module must not pay for or inherit them).
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=300,
                         cwd=REPO, check=True).stdout.split(maxsplit=1)
    count, rest = int(out[0]), out[1].strip()
    assert count > 40, "the probe imported too few modules to mean anything"
    assert rest == "0 [] False", f"new threads, changed environment variables, ray imported: {rest}"
