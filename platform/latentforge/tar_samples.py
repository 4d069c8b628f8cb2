"""The one reader of WebDataset tars outside Ray: (key, {suffix: bytes}) per sample, in tar order.

Every stage reads tars through `iter_tar_samples` (Ray pipelines use ``ray.data.read_webdataset``,
which splits names by the same rule), so a member name means the same sample everywhere.
Grouping is webdataset's own: ``dir/KEY.ext.more`` -> key ``dir/KEY`` (the directory kept, split
at the FIRST dot of the basename), suffix ``ext.more``; members sharing a key must be adjacent,
a suffix repeated within a sample is an error, and ``__*__`` metadata members are skipped.
Suffix case is kept, as ``ray.data.read_webdataset`` keeps it.
"""

from __future__ import annotations

from typing import IO, Iterator

from webdataset.tariterators import group_by_keys, tar_file_iterator

from latentforge import storage

Sample = tuple[str, dict[str, bytes]]


def iter_tar_samples(stream: IO[bytes]) -> Iterator[Sample]:
    """Stream (mode ``r|*``) the samples of a WebDataset tar from an open binary stream.

    Read errors propagate unchanged in type, so callers can tell transient storage errors
    (``OSError``) from a malformed tar (``tarfile.TarError``).
    """
    # group_by_keys reads each file's "__url__"; the stream has none to give, and no caller needs it.
    files = ({**member, "__url__": ""} for member in tar_file_iterator(stream))
    for sample in group_by_keys(files, lcase=False):
        key = sample.pop("__key__")
        del sample["__url__"]
        yield key, sample


def iter_shard(uri: str) -> Iterator[Sample]:
    """`iter_tar_samples` of the tar at `uri` (any fsspec storage)."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as handle:
        yield from iter_tar_samples(handle)
