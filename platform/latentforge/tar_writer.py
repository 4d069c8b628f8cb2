"""The one writer of WebDataset tars: ingest's image shards and precompute's latent shards.

`SampleTarWriter` is webdataset's own `TarWriter` (the library of record for the format) over a
file that hashes and counts the bytes as they pass, so the sha256 and size a manifest records
come for free instead of from reading the finished tar back. The tar goes to a temp name
through `storage.atomic_open` and is renamed onto its URI only by `close()`: a reader or a
resumed run never sees a partial shard.

Tars are byte-reproducible: every member header has the same mtime, owner and mode, and members
come in write order (a sample's members sorted by suffix, as `TarWriter` writes them), so the same
samples give the same file hash whether a run was interrupted or not.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Any

from latentforge import storage
from latentforge.light_imports import tar_writer_class

# Fixed member headers, so the same samples give byte-identical tars. mtime an int: with a
# float, tarfile writes an extra pax header (1 KiB) before every member to keep the fraction.
TAR_MTIME = 0
TAR_OWNER = ""
TAR_MODE = 0o644


class HashingFile:
    """A write-only file wrapper that hashes (sha256) and counts what passes through."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


@dataclass(frozen=True)
class TarDigest:
    """What a manifest records of a published tar."""

    sha256: str
    size: int


class TarAborted(Exception):
    """Thrown into the temp file's context to drop it (never escapes `SampleTarWriter.abort`)."""


class SampleTarWriter:
    """Writes samples (``{"__key__": key, suffix: bytes, ...}``) into the tar at `uri`.

    `close()` publishes it and returns its digest; `abort()` (or leaving a ``with`` block by an
    exception) removes the temp file and publishes nothing.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.digest: TarDigest | None = None
        writer_class = tar_writer_class()  # before the temp file exists: an import error leaves none
        self._temp = storage.atomic_open(uri, "wb")
        self._file = HashingFile(self._temp.__enter__())
        self._tar = writer_class(self._file, encoder=False, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER,
                                 mode=TAR_MODE)
        self._writing = True

    def write(self, sample: dict[str, Any]) -> None:
        """One sample's members, named ``KEY.SUFFIX`` in suffix order; values are bytes (nothing is encoded)."""
        self._tar.write(sample)

    def close(self) -> TarDigest:
        """End the tar, make it durable and rename it onto `uri`; its sha256 and size."""
        if self._writing:
            self._writing = False
            try:
                self._tar.close()
            except BaseException as exc:
                self._temp.__exit__(type(exc), exc, exc.__traceback__)
                raise
            self._temp.__exit__(None, None, None)
            self.digest = TarDigest(self._file.sha.hexdigest(), self._file.size)
        if self.digest is None:
            raise ValueError(f"{self.uri}: aborted, nothing published")
        return self.digest

    def abort(self) -> None:
        """Drop the temp file; nothing is published. Safe to call more than once."""
        if not self._writing:
            return
        self._writing = False
        with contextlib.suppress(Exception):  # the tar's end is thrown away with its file
            self._tar.close()
        self._temp.__exit__(TarAborted, TarAborted(), None)

    def __enter__(self) -> SampleTarWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()
