"""The two third-party modules a shard worker needs, without their packages' heavy `__init__`.

A shard task uses img2dataset's `resizer.py` and webdataset's `writer.py`, two small modules.
Importing them the usual way runs their packages' `__init__` first, which costs a fresh worker
far more than the modules do: img2dataset's imports its CLI and downloader (whose logger imports
wandb, and wandb leaves temp dirs behind in processes that never exit cleanly, as Ray workers),
webdataset's imports its whole pipeline API and with it torch (1-2 CPU-seconds per worker, paid
on every run's critical path: each new worker does it before its first shard). Neither module
needs what its `__init__` adds.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

_LOCK = threading.Lock()  # sys.modules holds a stand-in package while a module loads


def submodule_alone(package: str, name: str, *, register: bool) -> ModuleType:
    """`package.name`, executed without running `package/__init__.py`.

    When the package is already imported, its own submodule is returned. Otherwise a bare
    package object (its `__init__` not run) stands in while the module loads, so that relative
    imports of sibling modules resolve, and is removed afterwards: a later `import package` runs
    the real `__init__`. `register=True` keeps `package.name` in sys.modules, so that later import
    reuses this very module; with False the module and the siblings it loaded are dropped from
    sys.modules as well (a private copy: the process's imports are as they were).
    """
    full = f"{package}.{name}"
    with _LOCK:
        if package in sys.modules or full in sys.modules:
            return importlib.import_module(full)
        spec = importlib.util.find_spec(package)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(f"{package} is not installed")
        loaded_before = set(sys.modules)
        sys.modules[package] = importlib.util.module_from_spec(spec)  # the package object, __init__ not run
        try:
            return importlib.import_module(full)
        finally:
            for key in set(sys.modules) - loaded_before:
                if key == package or (key.startswith(f"{package}.") and not (register and key == full)):
                    del sys.modules[key]


@functools.cache
def resizer_class() -> type:
    """img2dataset's `Resizer`, registered as `img2dataset.resizer` (resizer.py imports no other
    img2dataset module), so a later import of img2dataset and its downloader gets this very one."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # resizer.py imports albumentations, which phones home
    return submodule_alone("img2dataset", "resizer", register=True).Resizer


@functools.cache
def tar_writer_class() -> type:
    """webdataset's `TarWriter`, from a private copy of `webdataset.writer` when webdataset itself
    is not imported yet (a later `import webdataset` then loads its package as usual)."""
    return submodule_alone("webdataset", "writer", register=False).TarWriter
