"""A real local filesystem under the fsspec protocol `lftest://` that counts and can fail tar reads.

Paths are ordinary local paths (`lftest:///tmp/x/00000.tar` is `/tmp/x/00000.tar`); only reads
of `.tar` files are watched, through a wrapper around fsspec's own local file object:
- every read appends `name bytes` to `<dir>/.lftest-reads.log`, so a test can assert how many
  tar bytes a step read (`tar_bytes_read`);
- `fail_reads(dir, n, after_bytes)` makes the next `n` reads that start at or past `after_bytes`
  of an open tar in `dir` raise `OSError(EIO)`, as a flaky object store would.

The state lives in files beside the data, so Ray worker processes share it with the test:
`ray_runtime_env()` registers the protocol in every worker of a job, no hook in product code.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "lftest"
FAULTS = ".lftest-faults.json"
READS = ".lftest-reads.log"
REPO = Path(__file__).resolve().parent.parent.parent


def register() -> None:
    """Make `lftest://` known to fsspec in this process (also Ray's worker setup hook)."""
    fsspec.register_implementation(PROTOCOL, WatchedFileSystem, clobber=True)


def ray_runtime_env() -> dict[str, Any]:
    """A Ray job runtime_env whose workers know `lftest://`."""
    return {"env_vars": {"PYTHONPATH": str(REPO)}, "worker_process_setup_hook": f"{__name__}.register"}


def uri(path: str | os.PathLike) -> str:
    return f"{PROTOCOL}://{Path(path).resolve()}"


def fail_reads(directory: str | os.PathLike, n: int, after_bytes: int = 0) -> None:
    Path(directory, FAULTS).write_text(json.dumps({"fail_reads": n, "after_bytes": after_bytes}))


def faults_left(directory: str | os.PathLike) -> int:
    return int(json.loads(Path(directory, FAULTS).read_text())["fail_reads"])


def tar_bytes_read(directory: str | os.PathLike) -> int:
    log = Path(directory, READS)
    return sum(int(line.split()[1]) for line in log.read_text().splitlines()) if log.exists() else 0


def _take_fault(directory: str, position: int) -> bool:
    """Consume one planned failure for a read at `position`, atomically across processes."""
    control = os.path.join(directory, FAULTS)
    if not os.path.exists(control):
        return False
    with open(control, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        plan = json.load(handle)
        if plan["fail_reads"] <= 0 or position < plan["after_bytes"]:
            return False
        plan["fail_reads"] -= 1
        handle.seek(0)
        handle.truncate()
        json.dump(plan, handle)
        return True


class WatchedTar:
    """fsspec's local file object for a tar opened for reading, with counted and failable reads."""

    def __init__(self, handle: Any, path: str) -> None:
        self.handle, self.path, self.position = handle, path, 0
        self.directory, self.name = os.path.split(path)

    def read(self, size: int = -1) -> bytes:
        if _take_fault(self.directory, self.position):
            raise OSError(errno.EIO, f"lftest: injected read error at byte {self.position}", self.path)
        data = self.handle.read(size)
        self.position += len(data)
        if data:
            with open(os.path.join(self.directory, READS), "a") as log:
                log.write(f"{self.name} {len(data)}\n")
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)

    def __enter__(self) -> "WatchedTar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()


class WatchedFileSystem(LocalFileSystem):
    protocol = (PROTOCOL,)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        handle = super()._open(path, mode, block_size, **kwargs)
        return WatchedTar(handle, self._strip_protocol(path)) if "r" in mode and path.endswith(".tar") else handle
