"""Layout rules from DEVELOPERS.md that, broken, break torch/ray in confusing ways."""

import ast
import functools
from pathlib import Path

from tests.harness.import_graph import Graph, cycle_edges, cycles, private_imports, upward_imports

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


# -- The import graph: layers, circles, private names (tests/harness/import_graph.py) --------------

PACKAGE_ROOTS = {"platform/latentforge": "latentforge", "pipelines": "pipelines", "jobs": "jobs",
                 "benchmarks": "benchmarks"}

LAYERS: list[tuple[str, ...]] = [
    # Low to high: a module imports from its own layer or below, never above.
    ("latentforge", "latentforge.config", "latentforge.storage", "latentforge.manifest", "latentforge.formats",
     "latentforge.pixels", "latentforge.reporting", "latentforge.tracking", "latentforge.tar_samples"),
    ("latentforge.models", "latentforge.diffusion"),
    ("latentforge.conditioning",),
    # The Sampler a loaded model hands out (ExportedModel.sampler): below trained_model, though the rest
    # of generation (batch runs, output files) is above it.
    ("latentforge.generation.sampler",),
    ("latentforge.trained_model",),
    ("latentforge.generation", "latentforge.upscaler", "latentforge.ingest"),
    ("latentforge.precompute",),
    ("latentforge.evaluation",),
    ("latentforge.training",),
    ("latentforge.autoencoder", "latentforge.conversion", "latentforge.demo"),
    ("pipelines",),
    ("jobs", "benchmarks"),
]



@functools.cache
def _graph() -> Graph:
    return Graph(REPO, PACKAGE_ROOTS)


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    problems = upward_imports(_graph(), LAYERS)
    assert not problems, "imports that point up (or modules in no layer):\n" + "\n".join(problems)


def test_no_import_circles() -> None:
    graph = _graph()
    found = cycles(graph)
    report = "\n".join(f"{' <-> '.join(c)}:\n  " + "\n  ".join(cycle_edges(graph, c)) for c in found)
    assert not found, f"import circles (module-level and in-function imports both count):\n{report}"


def test_no_module_imports_another_modules_private_names() -> None:
    found = [where for _source, _name, where in private_imports(_graph())]
    assert not found, "private names used from another module:\n" + "\n".join(found)


def _tree(root: Path, files: dict[str, str]) -> Graph:
    """A small project under ``root`` (``lib`` low, ``app`` above it) with the given module sources."""
    for rel, text in {"lib/__init__.py": "", "lib/core/__init__.py": "", "app/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return Graph(root, {"lib": "lib", "app": "app"})


SYNTHETIC_LAYERS = [("lib", "lib.base"), ("lib.core",), ("app",)]


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    graph = _tree(tmp_path, {"lib/base.py": "import os\n\n\ndef f():\n    from lib.core.model import Model\n",
                             "lib/core/model.py": "from lib.base import f\nModel = 1\n",
                             "app/run.py": "from lib.core import model\n"})
    assert upward_imports(graph, SYNTHETIC_LAYERS) == [
        "lib/base.py:5: from lib.core.model import Model  (lib.base in layer 0 imports lib.core.model in layer 1)"]
    assert upward_imports(graph, [("lib",), ("app",)]) == [], "the same imports inside one layer are fine"
    assert sorted(upward_imports(graph, [("lib",)])) == ["app/__init__.py: app is in no layer; add it to LAYERS",
                                                         "app/run.py: app.run is in no layer; add it to LAYERS"]


def test_the_cycle_check_catches_a_circle_through_a_function_level_import(tmp_path: Path) -> None:
    graph = _tree(tmp_path, {"app/a.py": "from app.b import g\n",
                             "app/b.py": "def g():\n    import app.c\n",
                             "app/c.py": "from . import a\n",
                             "app/d.py": "from app import a, b\n"})
    assert cycles(graph) == [["app.a", "app.b", "app.c"]]
    assert cycle_edges(graph, ["app.a", "app.b", "app.c"]) == [
        "app/a.py:1: from app.b import g", "app/b.py:2: import app.c", "app/c.py:1: from . import a"]
    (tmp_path / "app/c.py").write_text("import lib\n")
    assert cycles(Graph(tmp_path, {"lib": "lib", "app": "app"})) == []


def test_the_private_check_catches_names_attributes_and_modules_from_elsewhere(tmp_path: Path) -> None:
    graph = _tree(tmp_path, {"lib/core/_impl.py": "def _helper():\n    pass\n\n\ndef public():\n    _helper()\n",
                             "lib/core/api.py": "from lib.core import _impl\nfrom lib.core._impl import public\n",
                             "app/a.py": "from lib.core._impl import _helper, public\n",
                             "app/b.py": "import lib.core.api as api\n\n\ndef f():\n    return api._x, api.__name__\n",
                             "app/c.py": "import lib.core.api\n\nlib.core.api._y = lib.core.api.public\n"})
    assert sorted(where for _, _, where in private_imports(graph)) == [
        "app/a.py:1: from lib.core._impl import _helper, public  (private module lib.core._impl used outside its package)",
        "app/a.py:1: from lib.core._impl import _helper, public  (private name '_helper' of lib.core._impl)",
        "app/b.py:5: lib.core.api._x  (private name '_x' of lib.core.api, used in app.b)",
        "app/c.py:3: lib.core.api._y  (private name '_y' of lib.core.api, used in app.c)"]
