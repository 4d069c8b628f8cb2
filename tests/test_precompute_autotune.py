"""Precompute picks its encoder actors itself on CPU-only clusters; explicit flags win; bytes do not change.

The policy is checked directly (pure function of the cluster's resources), then end to end on the
real 2-CPU `ray_head`: a run with no tuning flags records what it chose and writes tars byte-identical
to a run pinned to one 1-CPU actor (the previous default), since batch composition is fixed per shard.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from latentforge import storage
from latentforge.config import ConfigError
from latentforge.manifest import read_manifest
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from tests.harness.tiny_models import save_tiny_autoencoder_kl
from latentforge.precompute.config import EncoderActors, PrecomputeConfig
from tests.harness.ingest_shards import write_ingest_shards


@pytest.mark.parametrize("cpus, count, slot", [(2, 2, 0.5), (16, 16, 0.5), (3, 3, 0.5), (1.5, 1, 0.5), (1, 1, 0.0)])
def test_no_flags_on_cpu_cluster_runs_one_thread_actor_per_cpu(cpus: float, count: int, slot: float) -> None:
    actors = PrecomputeConfig().encoder_actors(cluster_cpus=cpus, cluster_gpus=0)
    assert actors == EncoderActors(count, slot, 0.0, 1, "auto")
    assert count * slot + 1 <= max(cpus, 1), "the actors must leave a whole CPU slot for a shard reader"


@pytest.mark.parametrize("flags, expected", [
    ({"concurrency": 3}, EncoderActors(3, 1.0, 0.0, 1, "flags")),
    ({"num_cpus_per_actor": 2.0}, EncoderActors(1, 2.0, 0.0, 2, "flags")),
    ({"concurrency": 2, "num_cpus_per_actor": 0.5}, EncoderActors(2, 0.5, 0.0, 1, "flags")),
])
def test_explicit_flags_win_over_the_cpu_policy(flags: dict, expected: EncoderActors) -> None:
    assert PrecomputeConfig(**flags).encoder_actors(cluster_cpus=16, cluster_gpus=0) == expected


def test_gpu_clusters_keep_one_actor_per_gpu() -> None:
    actors = PrecomputeConfig().encoder_actors(cluster_cpus=32, cluster_gpus=4)
    assert (actors.count, actors.num_gpus, actors.num_cpus) == (4, 1.0, 1.0)


def test_negative_cpu_slot_is_refused() -> None:
    with pytest.raises(ConfigError, match="num_cpus_per_actor"):
        PrecomputeConfig(num_cpus_per_actor=-1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("autotune")
    return {"root": root, "ingest": write_ingest_shards(root / "ingest", shard_sizes=(12, 10)).dir,
            "kl": save_tiny_autoencoder_kl(root / "kl"), "clip": save_tiny_clip_checkpoint(root / "clip.safetensors")}


def _run_job(data, out: Path, *flags: str) -> int:
    from jobs.precompute_latents import main

    return main(["--preset", "tiny", "--input", str(data["ingest"]), "--output", str(out), "--vae-type",
                 "autoencoder_kl", "--vae", data["kl"], "--text-encoder-weights", data["clip"], "--dtype", "fp32",
                 "--batch-size", "4", "--fidelity-samples", "2", "--no-mlflow", "--no-progress", *flags])


def _tar_hashes(out: Path) -> dict[str, str]:
    return {p.name: storage.sha256_file(str(p)) for p in sorted(out.glob("*.tar"))}


@pytest.mark.slow
def test_no_flags_job_records_its_choice_and_writes_the_same_bytes(data, ray_session, tmp_path, capsys) -> None:
    import ray

    cpus = ray.cluster_resources()["CPU"]
    assert _run_job(data, tmp_path / "auto") == 0
    summary = capsys.readouterr().out
    assert _run_job(data, tmp_path / "flags", "--concurrency", "1", "--num-cpus-per-actor", "1") == 0

    auto = read_manifest(str(tmp_path / "auto")).extra["encoder_actors"]
    assert auto == {"count": int(cpus), "num_cpus": 0.5, "num_gpus": 0.0, "threads": 1, "chosen": "auto"}
    assert f"{int(cpus)} x (0.5 CPU slot, 1 torch thread(s)), auto" in summary
    flags = read_manifest(str(tmp_path / "flags")).extra["encoder_actors"]
    assert (flags["count"], flags["num_cpus"], flags["chosen"]) == (1, 1.0, "flags")
    # Byte-identical by construction, the first promise of docs/architecture.md "Reproducibility": the
    # layouts differ only in which actor encodes which batch, and every encoder batch is the same rows of
    # one shard (pipelines/precompute.read_shards pads each shard to whole batches) encoded by the same
    # code with the same torch thread count, on this machine.
    assert auto["threads"] == flags["threads"] == 1
    assert len(_tar_hashes(tmp_path / "auto")) == 2
    assert _tar_hashes(tmp_path / "auto") == _tar_hashes(tmp_path / "flags")
