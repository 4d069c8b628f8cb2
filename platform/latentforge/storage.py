"""fsspec paths: every stage reads and writes through these, so local dirs and s3:// behave alike.

Writes are atomic: data goes to a hidden temp name beside the target and is renamed only
when complete, so a reader (or a resumed run) never sees a half-written file. On object
stores a rename is a copy+delete, but the temp object is still never listed as finished
because readers only trust names recorded in a manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from typing import IO, Any, Iterator

import fsspec
from fsspec.core import split_protocol, url_to_fs
from fsspec.registry import get_filesystem_class

from latentforge.config import ConfigError

CHUNK = 1 << 20
# The pip extra (pyproject's optional-dependencies) that installs each optional object-store backend;
# s3fs (s3://, and MinIO / R2 through AWS_ENDPOINT_URL) is a dependency of the package itself.
BACKEND_EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "adl": "azure"}


class StorageBackendMissing(ConfigError):
    """A URI's scheme needs an fsspec backend that is not installed (a usage error: the jobs exit 2)."""


def check_backend(uri: str) -> None:
    """Refuse a URI whose scheme has no installed backend, in one line that names what to install."""
    protocol = split_protocol(uri)[0]
    if protocol is None:
        return
    try:
        get_filesystem_class(protocol)
    except ImportError as exc:
        extra = BACKEND_EXTRAS.get(protocol)
        fix = f"pip install 'latentforge[{extra}]'" if extra else " ".join(str(exc).split())
        raise StorageBackendMissing(f"{uri}: {protocol}:// needs a storage backend that is not installed: "
                                    f"{fix}") from None
    except ValueError:
        raise ConfigError(f"{uri}: unknown storage scheme {protocol}://") from None


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for a local path or URI."""
    check_backend(uri)
    return url_to_fs(uri)


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI without mangling the scheme."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def temp_name(uri: str) -> str:
    """A sibling name that never matches a finished file's pattern (see .gitignore: *.tmp-*)."""
    head, _, tail = uri.rpartition("/")
    return f"{head}/.{tail}.tmp-{uuid.uuid4().hex[:12]}" if head else f".{tail}.tmp-{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_open(uri: str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file for writing; on clean exit fsync it and rename it onto `uri`."""
    fs, path = filesystem(uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = temp_name(path)
    try:
        with fs.open(tmp, mode) as handle:
            yield handle
            _fsync(handle)
        fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def _fsync(handle: IO[Any]) -> None:
    # Local files: make the bytes durable before the rename publishes them (kill -9 safety).
    with contextlib.suppress(AttributeError, OSError, ValueError):
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(uri: str, data: bytes) -> None:
    with atomic_open(uri, "wb") as handle:
        handle.write(data)


def atomic_write_json(uri: str, obj: Any) -> None:
    atomic_write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as handle:
        return json.loads(handle.read().decode())


def sha256_file(uri: str) -> str:
    """Hex sha256 of a file, streamed in 1 MiB chunks."""
    fs, path = filesystem(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def size(uri: str) -> int:
    """Bytes of a file (one stat; FileNotFoundError when it is missing)."""
    fs, path = filesystem(uri)
    return int(fs.size(path))


def matches_record(uri: str, sha256: str, size_bytes: int | None, rehash: bool) -> bool:
    """Whether the file at `uri` is still the one a manifest recorded.

    By default one stat: it exists and has the recorded size, so resuming over many finished
    shards reads none of their bytes. `rehash` (or a record without a size) reads the file and
    compares its sha256, which also catches a same-size corruption.
    """
    try:
        actual = size(uri)
    except FileNotFoundError:
        return False
    if rehash or size_bytes is None:
        return sha256_file(uri) == sha256
    return actual == size_bytes


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def remove_stale_temps(dir_uri: str) -> int:
    """Delete temp files left by a killed writer; returns how many were removed."""
    fs, path = filesystem(dir_uri)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.ls(path, detail=False) if ".tmp-" in p.rsplit("/", 1)[-1]]
    for p in stale:
        fs.rm(p)
    return len(stale)
