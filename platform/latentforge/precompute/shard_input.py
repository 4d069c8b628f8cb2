"""Reading one ingest tar completely, or saying why it could not be read.

A shard counts as read only when every byte came through and the bytes hash to the sha256 the
ingest manifest recorded (a tar cut at a member boundary parses cleanly; only the hash shows
what is missing). Transient storage errors (`OSError`, which fsspec's errors are, and fsspec's
timeouts) are retried with exponential backoff: the tar is reopened and read from the start,
and the samples already delivered are skipped, so the consumer sees each sample once and in
order, exactly as from a clean read. Any other error (a truncated or malformed tar) is final.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import IO, Iterator

from fsspec.exceptions import FSTimeoutError

from latentforge import storage, tar_samples
from latentforge.precompute.preprocess import IngestSample

TRANSIENT_ERRORS = (OSError, FSTimeoutError)


class HashingReader:
    """A read-only stream that hashes every byte read through it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data

    def __repr__(self) -> str:
        # webdataset's tar reader appends its stream to a read error's message: name the file, not an address
        return str(getattr(self.handle, "path", "input tar"))

    def drain(self) -> str:
        """Read what the tar parser left (end-of-archive padding, or more); the hex sha256 of all bytes."""
        while self.read(storage.CHUNK):
            pass
        return self.digest.hexdigest()


@dataclass
class ShardRead:
    """One input shard being read; `error` is set when it could not be read completely."""

    uri: str
    sha256: str
    """The ingest manifest's sha256 of the tar ("" = not recorded: no hash check)."""
    delivered: int = 0
    """Samples handed to the consumer so far (a retry skips this many)."""
    attempts: int = 0
    error: str = ""


def read_shard(read: ShardRead, retries: int, backoff_s: float) -> Iterator[IngestSample]:
    """Each sample of the tar once, in tar order; afterwards `read.error` says what is missing, if anything."""
    for attempt in range(retries + 1):
        read.attempts = attempt + 1
        try:
            yield from _read_once(read)
            return
        except TRANSIENT_ERRORS as exc:
            read.error = f"read failed after {read.attempts} attempt(s): {type(exc).__name__}: {exc}"
            if attempt < retries:
                time.sleep(backoff_s * 2 ** attempt)
        except Exception as exc:  # noqa: BLE001 - tarfile/zlib errors of a truncated or malformed tar are final
            read.error = f"unreadable tar after {read.delivered} sample(s): {type(exc).__name__}: {exc}"
            return


def _read_once(read: ShardRead) -> Iterator[IngestSample]:
    fs, path = storage.filesystem(read.uri)
    with fs.open(path, "rb") as handle:
        stream = HashingReader(handle)
        for index, (key, members) in enumerate(tar_samples.iter_tar_samples(stream)):  # type: ignore[arg-type]
            if index >= read.delivered:
                read.delivered += 1
                yield IngestSample(key, members)
        digest = stream.drain()
    read.error = ""
    if read.sha256 and digest != read.sha256:
        read.error = f"sha256 {digest[:12]}... differs from the ingest manifest's {read.sha256[:12]}..."
