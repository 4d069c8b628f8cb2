"""Every stage splits a tar member name into (key, suffix) the same way: webdataset's rule.

A tar written with directories whose names hold dots and multi-dot suffixes is read through each
stage's reader (precompute's ingest reader and its retrying reader, train's validation reader,
the eval-set reader) and each must see the samples `ray.data.read_webdataset` would see.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from ray.data._internal.datasource.webdataset_datasource import _base_plus_ext

from latentforge import storage
from latentforge.evaluation.eval_set import EvalSet, iter_samples
from latentforge.manifest import Manifest, ShardRecord
from latentforge.precompute.preprocess import iter_ingest_shard
from latentforge.precompute.shard_input import ShardRead, read_shard
from latentforge.tar_samples import iter_shard
from latentforge.training.data import DataPlan, read_positions

NAMES = [f"run.v1/part.2/0000000{i}.{suffix}" for i in (1, 2) for suffix in ("jpg", "latent.npy", "text.npy", "txt")]


def _write_tar(path: Path) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in NAMES:
            data = name.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _expected() -> list[tuple[str, dict[str, bytes]]]:
    """The samples by Ray's own key rule (the reader the Ray pipelines use)."""
    samples: dict[str, dict[str, bytes]] = {}
    for name in NAMES:
        key, suffix = _base_plus_ext(name)
        samples.setdefault(key, {})[suffix] = name.encode()
    return list(samples.items())


@pytest.fixture
def shard(tmp_path) -> Path:
    _write_tar(tmp_path / "00000.tar")
    return tmp_path / "00000.tar"


def test_keys_keep_dotted_directories_and_multi_dot_suffixes(shard) -> None:
    expected = _expected()
    assert [key for key, _ in expected] == ["run.v1/part.2/00000001", "run.v1/part.2/00000002"]
    assert sorted(expected[0][1]) == ["jpg", "latent.npy", "text.npy", "txt"]
    assert list(iter_shard(str(shard))) == expected


def test_every_stage_reader_splits_names_the_same_way(shard) -> None:
    expected = _expected()
    assert [(s.key, s.members) for s in iter_ingest_shard(str(shard))] == expected
    read = ShardRead(str(shard), storage.sha256_file(str(shard)))
    assert [(s.key, s.members) for s in read_shard(read, retries=0, backoff_s=0.0)] == expected
    assert read.error == ""
    plan = DataPlan(["00000"], [2], world_size=1, samples_per_step=1, shuffle_buffer=1, seed=0, val_samples=2)
    rows = read_positions(str(shard.parent), plan, [0, 1])
    assert [(row.pop("__key__"), row) for row in rows] == [(k, {s: m[s] for s in ("latent.npy", "text.npy")})
                                                            for k, m in expected]
    eval_set = EvalSet(str(shard.parent), Manifest("ingest", {}, shards=[ShardRecord("00000", 2, "")]), "")
    assert [(s.key, s.caption, s.image_bytes) for s in iter_samples(eval_set)] == [
        (k, m["txt"].decode(), m["jpg"]) for k, m in expected]


def test_a_read_error_names_the_tar_not_an_object_address(shard) -> None:
    cut = shard.parent / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:520])  # inside the first member's data (its header is 512 bytes)
    read = ShardRead(str(cut), "")
    assert list(read_shard(read, retries=0, backoff_s=0.0)) == []
    assert read.error.startswith("unreadable tar after 0 sample(s): ReadError")
    assert str(cut) in read.error and " at 0x" not in read.error
