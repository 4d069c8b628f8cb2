"""Manifests and storage: atomic writes, validation, refusing mismatched outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from latentforge import storage
from latentforge.manifest import (Manifest, ManifestError, ShardRecord, manifest_digest, read_manifest,
                                  require_same, write_manifest)


def _manifest() -> Manifest:
    return Manifest(stage="ingest", config={"samples_per_shard": 4},
                    shards=[ShardRecord("00001", 3, "b" * 64), ShardRecord("00000", 4, "a" * 64)],
                    counts={"rows": 8, "ok": 7, "http_4xx": 1})


def test_roundtrip_sorts_shards_and_digest_tracks_content(tmp_path) -> None:
    digest = write_manifest(str(tmp_path), _manifest())
    back = read_manifest(str(tmp_path), stage="ingest")
    assert [s.name for s in back.shards] == ["00000", "00001"]
    assert back.total_samples == 7 and back.shard("00001").sha256 == "b" * 64
    assert digest == manifest_digest(str(tmp_path)) == storage.sha256_file(str(tmp_path / "manifest.json"))


def test_wrong_stage_schema_or_missing_manifest_is_refused(tmp_path) -> None:
    with pytest.raises(ManifestError, match="no manifest.json.*run the ingest stage first"):
        read_manifest(str(tmp_path), stage="ingest")
    write_manifest(str(tmp_path), _manifest())
    with pytest.raises(ManifestError, match="holds 'ingest' output, expected 'precompute'"):
        read_manifest(str(tmp_path), stage="precompute")
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="schema version 99"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="malformed"):
        read_manifest(str(tmp_path))


def test_require_same_names_every_difference() -> None:
    require_same({"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 9}, ["a", "b"], "out/")
    with pytest.raises(ManifestError, match=r"a: 1 -> 2; b: 'x' -> 'y'"):
        require_same({"a": 1, "b": "x"}, {"a": 2, "b": "y"}, ["a", "b"], "out/")


def test_atomic_open_leaves_nothing_on_failure(tmp_path) -> None:
    target = str(tmp_path / "x.bin")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("writer died")
    assert os.listdir(tmp_path) == []


def test_killed_writer_never_publishes_and_temps_are_cleaned(tmp_path) -> None:
    # A real SIGKILL mid-write: the final name never appears, only a temp that cleanup removes.
    code = ("import os,sys; from latentforge import storage\n"
            "with storage.atomic_open(sys.argv[1]) as h:\n    h.write(b'x'*1000); h.flush(); os.kill(os.getpid(), 9)\n")
    target = tmp_path / "shard.tar"
    proc = subprocess.run([sys.executable, "-c", code, str(target)])
    assert proc.returncode == -9
    assert not target.exists() and len(os.listdir(tmp_path)) == 1
    assert storage.remove_stale_temps(str(tmp_path)) == 1 and os.listdir(tmp_path) == []


def test_memory_filesystem_uris_work_like_local_paths() -> None:
    uri = "memory://lf-test/out/file.json"
    storage.atomic_write_json(uri, {"k": 1})
    assert storage.read_json(uri) == {"k": 1}
    assert storage.join("s3://bucket/", "a", "/b") == "s3://bucket/a/b"
