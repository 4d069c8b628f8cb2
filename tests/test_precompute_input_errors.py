"""Precompute input errors and resume cost: no shard is published from an input it could not read
completely, transient read errors are retried to the same bytes, and resuming trusts finished
shards by a stat.

Real parts: ingest-format tars written with webdataset's TarWriter, the tiny patchify VAE and
open_clip checkpoint, the real Ray head; storage faults and read counts come from a local
filesystem registered under an fsspec test protocol (tests/harness/faulty_fs.py), not from hooks
in the product.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import pytest

from jobs import _bootstrap
from latentforge import storage
from latentforge.config import ConfigError, parse_config
from latentforge.manifest import read_manifest, write_manifest
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.preprocess import iter_ingest_shard
from latentforge.precompute.shard_input import ShardRead, read_shard
from latentforge.precompute.stage import plan_run
from tests.harness import faulty_fs
from tests.harness.ingest_shards import write_ingest_shards

faulty_fs.register()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("input_errors")
    info = write_ingest_shards(root / "ingest", shard_sizes=(12, 12))
    return {"root": root, "ingest": info, "clip": save_tiny_clip_checkpoint(root / "clip.safetensors")}


@pytest.fixture(autouse=True)
def _tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")


def _args(data, source: str | Path, out: str | Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--input", str(source), "--output", str(out), "--text-encoder-weights",
            data["clip"], "--dtype", "fp32", "--batch-size", "4", "--no-progress", "--read-backoff-s", "0.01",
            *extra]


def _tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: storage.sha256_file(str(p)) for p in sorted(out.glob("*.tar"))}


def _copy_input(data, dest: Path) -> Path:
    shutil.copytree(data["ingest"].dir, dest)
    return dest


def _members(tar_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(tar_path) as tar:
        return tar.getmembers()


# --- the reader alone (no Ray) -----------------------------------------------------------------

def test_reader_retries_from_where_it_stopped_and_checks_the_hash(data, tmp_path) -> None:
    source = _copy_input(data, tmp_path / "in")
    tar = source / "00000.tar"
    expected = [(s.key, s.members) for s in iter_ingest_shard(str(tar))]
    faulty_fs.fail_reads(source, 3, after_bytes=20_000)  # mid-tar, after some samples were delivered
    read = ShardRead(faulty_fs.uri(tar), storage.sha256_file(str(tar)))
    got = [(s.key, s.members) for s in read_shard(read, retries=3, backoff_s=0.0)]
    assert faulty_fs.faults_left(source) == 0 and read.attempts == 4
    assert got == expected and read.error == ""

    faulty_fs.fail_reads(source, 10)
    read = ShardRead(faulty_fs.uri(tar), storage.sha256_file(str(tar)))
    assert list(read_shard(read, retries=2, backoff_s=0.0)) == []
    assert read.error.startswith("read failed after 3 attempt(s): OSError")

    read = ShardRead(str(tar), "0" * 64)
    assert len(list(read_shard(read, retries=0, backoff_s=0.0))) == 12
    assert "differs from the ingest manifest" in read.error


def test_read_retry_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="read_retries and read_backoff_s must be >= 0"):
        PrecomputeConfig(input="in", output="out", vae_type="patchify", read_backoff_s=-1.0)
    assert PrecomputeConfig().read_retries == 3 and not PrecomputeConfig().allow_partial_shards
    assert not PrecomputeConfig().verify_finished


# --- the job on the Ray head -------------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty_ray(ray_head, ray_session):
    """The test's Ray driver reconnected with a runtime_env whose workers know `lftest://`."""
    ray_session.shutdown()
    ray_session.init(address=ray_head.address, log_to_driver=False, runtime_env=faulty_fs.ray_runtime_env())
    yield ray_session
    ray_session.shutdown()
    ray_session.init(address=ray_head.address, log_to_driver=False)


@pytest.fixture(scope="module")
def reference(data, faulty_ray, tmp_path_factory) -> Path:
    """A clean run; the fault tests compare their tars with it byte for byte."""
    from jobs.precompute_latents import main

    out = tmp_path_factory.mktemp("reference") / "latents"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out.parent}/mlflow.db")
        assert main(_args(data, data["ingest"].dir, out)) == 0
    return out


@pytest.mark.slow
def test_transient_read_errors_are_retried_to_byte_identical_output(data, reference, tmp_path) -> None:
    from jobs.precompute_latents import main

    source = _copy_input(data, tmp_path / "in")
    faulty_fs.fail_reads(source, 3, after_bytes=20_000)
    out = tmp_path / "latents"
    assert main(_args(data, faulty_fs.uri(source), out, "--read-retries", "3")) == 0
    assert faulty_fs.faults_left(source) == 0  # the reads really failed, three times
    assert _tar_hashes(out) == _tar_hashes(reference)
    assert read_manifest(str(out)).counts == read_manifest(str(reference)).counts


@pytest.mark.slow
def test_truncated_tar_is_not_published_and_a_rerun_redoes_exactly_it(data, reference, tmp_path, capsys) -> None:
    from jobs.precompute_latents import main

    source = _copy_input(data, tmp_path / "in")
    original = (source / "00001.tar").read_bytes()
    image = max(_members(source / "00001.tar")[:12], key=lambda m: m.size)
    (source / "00001.tar").write_bytes(original[: image.offset_data + image.size // 2])  # mid-image
    out = tmp_path / "latents"
    assert main(_args(data, source, out)) == 1
    err = capsys.readouterr().err
    assert "shard 00001 not published: unreadable tar" in err
    assert [s.name for s in read_manifest(str(out)).shards] == ["00000"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
    assert read_manifest(str(out)).extra["complete"] is False
    kept_mtime = (out / "00000.tar").stat().st_mtime_ns

    (source / "00001.tar").write_bytes(original)  # the input is repaired
    assert main(_args(data, source, out)) == 0
    assert "2 (1 kept from an earlier run)" in capsys.readouterr().out
    assert (out / "00000.tar").stat().st_mtime_ns == kept_mtime
    assert _tar_hashes(out) == _tar_hashes(reference)


@pytest.mark.slow
def test_tar_cut_at_a_member_boundary_fails_its_hash_or_is_published_partial(data, reference, tmp_path,
                                                                          capsys) -> None:
    """A tar cut between members parses cleanly; only the manifest's sha256 shows samples are missing."""
    from jobs.precompute_latents import main

    source = _copy_input(data, tmp_path / "in")
    tar = source / "00000.tar"
    tar.write_bytes(tar.read_bytes()[: _members(tar)[15].offset] + b"\0" * 1024)  # 5 whole samples
    out = tmp_path / "latents"
    assert main(_args(data, source, out, "--fidelity-samples", "0")) == 1
    assert "shard 00000 not published: sha256" in capsys.readouterr().err
    assert not (out / "00000.tar").exists()

    assert main(_args(data, source, out, "--fidelity-samples", "0", "--allow-partial-shards")) == 0
    assert "PARTIAL shards" in capsys.readouterr().out
    manifest = read_manifest(str(out))
    partial = manifest.shard("00000").stats["partial"]
    assert "differs from the ingest manifest" in partial["reason"] and partial["lost_samples"] == 7
    assert manifest.counts["partial_shards"] == 1 and manifest.counts["lost_samples"] == 7
    assert manifest.counts["samples"] == 5 + 12 and manifest.extra["complete"] is False
    assert _tar_hashes(out)["00001.tar"] == _tar_hashes(reference)["00001.tar"]


# --- resume cost ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_reads_no_tar_bytes_and_verify_finished_catches_same_size_corruption(data, reference,
                                                                                    tmp_path, capsys) -> None:
    from jobs.precompute_latents import main

    out = tmp_path / "latents"
    shutil.copytree(reference, out)
    assert main(_args(data, data["ingest"].dir, faulty_fs.uri(out), "--fidelity-samples", "0")) == 0
    assert "2 (2 kept from an earlier run)" in capsys.readouterr().out
    assert faulty_fs.tar_bytes_read(out) == 0

    tar = out / "00001.tar"
    corrupted = bytearray(tar.read_bytes())
    corrupted[len(corrupted) // 2] ^= 0xFF  # same size, different bytes
    tar.write_bytes(bytes(corrupted))
    config = parse_config(PrecomputeConfig, _args(data, data["ingest"].dir, faulty_fs.uri(out)),
                          preset_dir=_bootstrap.PRESETS / "precompute")
    assert sorted(plan_run(config).done) == ["00000", "00001"]  # a stat cannot see it ...
    assert faulty_fs.tar_bytes_read(out) == 0
    config.verify_finished = True
    plan = plan_run(config)
    assert sorted(plan.done) == ["00000"] and [s.name for s in plan.pending] == ["00001"]  # ... a re-hash does
    assert faulty_fs.tar_bytes_read(out) == sum(p.stat().st_size for p in out.glob("*.tar"))


@pytest.mark.slow
def test_shards_an_older_version_published_incomplete_are_redone(data, reference, tmp_path) -> None:
    """Older versions published a broken-off input as complete (skip reason corrupt_shard_tail) and wrote no
    sizes: a resume re-hashes the others and redoes that one."""
    out = tmp_path / "latents"
    shutil.copytree(reference, out)
    manifest = read_manifest(str(out))
    for record in manifest.shards:
        record.size = None
    manifest.shard("00001").stats["skipped"]["corrupt_shard_tail"] = 1
    write_manifest(str(out), manifest)
    config = parse_config(PrecomputeConfig, _args(data, data["ingest"].dir, faulty_fs.uri(out)),
                          preset_dir=_bootstrap.PRESETS / "precompute")
    plan = plan_run(config)
    assert sorted(plan.done) == ["00000"] and [s.name for s in plan.pending] == ["00001"]
    assert faulty_fs.tar_bytes_read(out) == (out / "00000.tar").stat().st_size  # no size recorded: re-hashed


def test_manifest_without_sizes_is_resumed_by_hash(data, tmp_path) -> None:
    """Manifests written before `size` was recorded still resume: their shards are re-hashed."""
    manifest = read_manifest(str(data["ingest"].dir))
    out = tmp_path / "latents"
    out.mkdir()
    tar = out / "00000.tar"
    tar.write_bytes(b"x" * 1024)
    record = manifest.shard("00000")
    assert record.size is None
    assert storage.matches_record(str(tar), storage.sha256_file(str(tar)), None, rehash=False)
    assert not storage.matches_record(str(tar), record.sha256, None, rehash=False)
    assert storage.matches_record(str(tar), "anything", 1024, rehash=False)
    assert not storage.matches_record(str(tar), storage.sha256_file(str(tar)), 1023, rehash=False)
    assert not storage.matches_record(str(out / "missing.tar"), "", 1, rehash=False)
    write_manifest(str(out), manifest)  # round trip: size stays None
    assert read_manifest(str(out)).shard("00000").size is None
