"""Ingest resume cost: finished shards are trusted by a stat (size vs the manifest record), so a
resume reads none of their tar bytes; `--verify-finished` re-hashes and catches a same-size
corruption. Reads are counted by a local filesystem under an fsspec test protocol
(tests/harness/faulty_fs.py); the shards come from a real in-process ingest run.
"""

from __future__ import annotations

import dataclasses

import pytest

from latentforge.ingest.config import IngestConfig
from latentforge.manifest import read_manifest
from tests.harness import faulty_fs
from tests.harness.http_server import realistic_jpeg_pool
from tests.harness.url_lists import pool_rows, write_rows

faulty_fs.register()


def _reopen(config: IngestConfig) -> list[str]:
    """What a resume of `config` would redo: the listed shards it drops."""
    from latentforge.ingest.inputs import input_plan
    from latentforge.ingest.state import open_state

    return open_state(config, input_plan(config)).dropped


@pytest.mark.slow
def test_resume_reads_no_tar_bytes_and_verify_finished_rehashes(ray_session, tmp_path, http_server,
                                                               monkeypatch) -> None:
    from pipelines import ingest

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    http_server.set_pool(realistic_jpeg_pool(4))
    write_rows(tmp_path / "in.parquet", pool_rows(http_server, 12))
    out = tmp_path / "out"
    config = IngestConfig(input=str(tmp_path / "in.parquet"), output=str(out), samples_per_shard=4,
                          allow_networks=["127.0.0.1/32"], image_size=32, progress=False)
    assert ingest.run(config).counts["ok"] == 12
    records = read_manifest(str(out)).shards
    assert [(r.name, r.size) for r in records] == [(p.stem, p.stat().st_size) for p in sorted(out.glob("*.tar"))]

    watched = dataclasses.replace(config, output=faulty_fs.uri(out))
    assert _reopen(watched) == [] and faulty_fs.tar_bytes_read(out) == 0

    tar = out / "00001.tar"
    corrupted = bytearray(tar.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF  # same size, different bytes
    tar.write_bytes(bytes(corrupted))
    assert _reopen(watched) == [] and faulty_fs.tar_bytes_read(out) == 0  # a stat cannot see it ...
    assert _reopen(dataclasses.replace(watched, verify_finished=True)) == ["00001"]  # ... a re-hash does
    assert faulty_fs.tar_bytes_read(out) == sum(p.stat().st_size for p in out.glob("*.tar"))
