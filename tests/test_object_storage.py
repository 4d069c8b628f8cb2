"""Object storage out of the box: S3 through the standard AWS variables, other schemes named clearly.

Real parts: `moto_server` on 127.0.0.1 (tests/harness/s3_server.py) reached through s3fs and
AWS_ENDPOINT_URL only, the jobs run as a user runs them, and a real Ray cluster for precompute.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from latentforge import storage
from latentforge.manifest import read_manifest
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from tests.harness.ingest_shards import write_ingest_shards
from tests.harness.tiny_models import save_tiny_autoencoder_kl

REPO = Path(__file__).resolve().parent.parent


def test_s3_writes_reach_the_server_named_by_aws_endpoint_url(s3_server) -> None:
    import boto3

    bucket = s3_server.make_bucket("lf-roundtrip")
    storage.atomic_write_bytes(f"{bucket}/dir/blob.bin", b"latent bytes")
    # Another client that knows only the standard variables sees the object, and only it (no temp left).
    listing = boto3.client("s3").list_objects_v2(Bucket="lf-roundtrip")
    assert [item["Key"] for item in listing["Contents"]] == ["dir/blob.bin"]
    assert storage.sha256_file(f"{bucket}/dir/blob.bin") == storage.sha256_bytes(b"latent bytes")


@pytest.mark.parametrize("uri, extra", [("gs://bucket/shards", "gcs"), ("az://container/shards", "azure")])
def test_a_scheme_without_its_backend_exits_2_naming_the_extra(uri: str, extra: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "jobs/precompute_latents.py", "--preset", "tiny", "--input", uri,
                             "--output", str(tmp_path / "out"), "--no-mlflow"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"pip install 'latentforge[{extra}]'" in lines[0] and uri in lines[0], lines


def test_check_backend_passes_local_paths_and_s3() -> None:
    for uri in ("relative/dir", "/abs/dir", "file:///abs/dir", "s3://bucket/key", "memory://x"):
        storage.check_backend(uri)
    with pytest.raises(storage.StorageBackendMissing, match=r"latentforge\[gcs\]"):
        storage.filesystem("gs://bucket/key")


@pytest.mark.slow
def test_precompute_reads_and_writes_s3_with_the_local_shard_digests(s3_server, ray_session, tmp_path,
                                                                    monkeypatch) -> None:
    from jobs.precompute_latents import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    ingest = write_ingest_shards(tmp_path / "ingest", shard_sizes=(6, 6))
    bucket = s3_server.make_bucket("lf-precompute")
    fs, _ = storage.filesystem(bucket)
    fs.put(str(ingest.dir), "lf-precompute/ingest", recursive=True)
    models = ["--vae-type", "autoencoder_kl", "--vae", save_tiny_autoencoder_kl(tmp_path / "kl"),
              "--text-encoder-weights", save_tiny_clip_checkpoint(tmp_path / "clip.safetensors"),
              "--text-layer", "penultimate", "--latent", "mean_std", "--dtype", "fp32", "--batch-size", "4",
              "--no-progress", "--preset", "tiny"]
    outputs = {"local": str(tmp_path / "latents"), "s3": f"{bucket}/latents"}
    inputs = {"local": str(ingest.dir), "s3": f"{bucket}/ingest"}
    for where in ("local", "s3"):
        assert main(["--input", inputs[where], "--output", outputs[where], *models]) == 0
    local, remote = (read_manifest(outputs[w], stage="precompute") for w in ("local", "s3"))
    assert [(s.name, s.sha256, s.samples) for s in remote.shards] == [(s.name, s.sha256, s.samples) for s in local.shards]
    for shard in remote.shards:  # the recorded digest is that of the object's bytes on the server
        assert storage.sha256_file(storage.join(outputs["s3"], f"{shard.name}.tar")) == shard.sha256
