"""Ray Data / Ray Train graphs, one module per stage, built on the `latentforge` library.

`ray job submit --working-dir .` ships this repository without installing it; Ray puts the
working dir on every worker's path, which makes `pipelines` importable but not the library
under `platform/`. Adding `platform/` here (only when `latentforge` is not installed) lets the
same command line run with or without `pip install` on the cluster.
"""

import importlib.util as _importlib_util
import sys as _sys
from pathlib import Path as _Path

if _importlib_util.find_spec("latentforge") is None:
    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent / "platform"))
