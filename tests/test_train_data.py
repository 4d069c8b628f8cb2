"""Data order (exact resume), padding, UNet presets vs the data, storage and run checks: no Ray."""

from __future__ import annotations

import json

import pytest
import torch

from latentforge.config import ConfigError
from latentforge.models import unet as unet_mod
from latentforge.training import data as tdata
from latentforge.training import run_storage
from tests.harness.latent_shards import write_latent_dataset


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return write_latent_dataset(tmp_path_factory.mktemp("uneven") / "latents", shard_sizes=[23, 3, 11], width=16)


def fake_rows(plan: tdata.DataPlan, rank: int) -> list[dict]:
    """What Ray Data delivers to `rank`: every sample of its shards, in file order."""
    rows = []
    for name, size in zip(plan.shard_names, plan.shard_sizes):
        if name in plan.rank_shards(rank):
            rows += [{"__url__": f"/x/{name}.tar", "pos": off} for off in range(size)]
    offsets = dict(zip(plan.shard_names, plan.offsets))
    for row in rows:
        row["pos"] += offsets[row["__url__"][3:8]]
    return rows


def test_ranks_split_uneven_shards_evenly_and_run_equal_steps(uneven) -> None:
    plan = tdata.plan_data(uneven.manifest, world_size=2, samples_per_step=4, shuffle_buffer=5, seed=3, val_samples=2)
    assert plan.total == 37 and plan.train_total == 35
    assert [plan.rank_range(r) for r in range(2)] == [(0, 17), (17, 35)]
    assert plan.rank_shards(0) == ["00000"] and plan.rank_shards(1) == ["00000", "00001", "00002"]
    assert plan.steps_per_epoch == 4 and plan.samples_per_epoch == 16  # same on both ranks
    seen = []
    for rank in range(2):
        stream = list(tdata.rank_rows(iter(fake_rows(plan, rank)), plan, rank))
        assert [r["pos"] for r in stream] == list(range(*plan.rank_range(rank)))
        epoch0 = [r["pos"] for r in tdata.shuffled_epoch(iter(stream), plan, rank, 0)]
        assert len(epoch0) == 16 and len(set(epoch0)) == 16
        assert epoch0 != sorted(epoch0)  # shuffled
        epoch1 = [r["pos"] for r in tdata.shuffled_epoch(iter(stream), plan, rank, 1)]
        assert epoch1 != epoch0  # a fresh order every epoch
        seen += epoch0
    assert len(set(seen)) == len(seen)  # ranks never share a sample
    assert not set(seen) & set(plan.val_positions())


def test_one_stream_carries_several_epochs(uneven) -> None:
    """The shard list repeated in one Ray Data stream: each epoch consumes exactly its own rows."""
    plan = tdata.plan_data(uneven.manifest, world_size=2, samples_per_step=4, shuffle_buffer=5, seed=3, val_samples=2)
    assert [plan.epochs_per_stream(r, max_shards=8) for r in range(2)] == [8, 2]  # 1 and 3 shards
    for rank in range(2):
        stream = iter(fake_rows(plan, rank) * 3)
        for _ in range(3):
            assert [r["pos"] for r in tdata.rank_rows(stream, plan, rank)] == list(range(*plan.rank_range(rank)))
        assert next(stream, None) is None
    with pytest.raises(tdata.DataPlanError, match="end of the stream"):
        list(tdata.rank_rows(iter(fake_rows(plan, 1)[:-1]), plan, 1))


def test_resume_skips_exactly_the_consumed_samples(uneven) -> None:
    plan = tdata.plan_data(uneven.manifest, world_size=2, samples_per_step=4, shuffle_buffer=5, seed=3)
    stream = list(tdata.rank_rows(iter(fake_rows(plan, 1)), plan, 1))
    full = [r["pos"] for r in tdata.shuffled_epoch(iter(stream), plan, 1, 2)]
    for skip in range(0, plan.samples_per_epoch + 1, 4):
        assert [r["pos"] for r in tdata.shuffled_epoch(iter(stream), plan, 1, 2, skip=skip)] == full[skip:]
    assert plan.position_of(0) == (0, 0)
    assert plan.position_of(plan.steps_per_epoch + 1) == (1, 4)


def test_order_is_checked(uneven) -> None:
    plan = tdata.plan_data(uneven.manifest, world_size=1, samples_per_step=4, shuffle_buffer=5, seed=3)
    rows = fake_rows(plan, 0)
    with pytest.raises(tdata.DataPlanError, match="delivered"):
        list(tdata.rank_rows(iter(rows[:5] + rows[23:]), plan, 0))
    with pytest.raises(tdata.DataPlanError, match="ran out"):
        list(tdata.shuffled_epoch(iter(rows[:10]), plan, 0, 0))
    with pytest.raises(tdata.DataPlanError, match="cannot give"):
        tdata.plan_data(uneven.manifest, world_size=4, samples_per_step=16, shuffle_buffer=5, seed=3)
    saved = plan.to_dict()
    other = tdata.plan_data(uneven.manifest, world_size=2, samples_per_step=4, shuffle_buffer=5, seed=3)
    with pytest.raises(tdata.DataPlanError, match="world_size"):
        tdata.check_same_plan(saved, other)


def test_real_rows_decode_pad_and_mask(uneven) -> None:
    plan = tdata.plan_data(uneven.manifest, world_size=1, samples_per_step=4, shuffle_buffer=5, seed=3)
    rows = tdata.read_positions(str(uneven.dir), plan, [0, 24, 30])
    assert [r["__key__"] for r in rows] == [uneven.keys[i] for i in (0, 24, 30)]
    samples = [tdata.decode_row(r, "fp32") for r in rows]
    batch = tdata.collate(samples, min_length=2)
    lengths = [s["text"].shape[0] for s in samples]
    assert batch["text"].shape == (3, max(lengths), 16) and batch["latents"].shape == (3, 4, 8, 8)
    assert batch["mask"].sum(dim=1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert torch.equal(batch["text"][i, :n], samples[i]["text"])
        assert not batch["text"][i, n:].any()
    empty = tdata.read_empty_caption(str(uneven.dir), uneven.manifest)
    assert empty.shape == (1, 16)


def test_unet_presets_and_data_checks(tmp_path) -> None:
    tiny = unet_mod.build_unet("tiny", 4, 64)
    assert 0.6e6 < unet_mod.count_parameters(tiny) < 1.0e6
    assert unet_mod.resolve_unet_config("tiny", 12, 32)["in_channels"] == 12  # adapts (patchify latents)
    assert unet_mod.resolve_unet_config("sd2-base", 4, 1024)["cross_attention_dim"] == 1024
    with pytest.raises(unet_mod.UNetConfigError, match="cross_attention_dim 768 but the text states are 1024"):
        unet_mod.resolve_unet_config("sd15", 4, 1024)
    with pytest.raises(unet_mod.UNetConfigError, match="12 channels"):
        unet_mod.resolve_unet_config("sd2-base", 12, 1024)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **unet_mod.PRESETS["tiny"],
                                "in_channels": 4, "out_channels": 4, "cross_attention_dim": 48}))
    assert unet_mod.resolve_unet_config(str(path), 4, 48)["cross_attention_dim"] == 48
    with pytest.raises(unet_mod.UNetConfigError, match="48"):
        unet_mod.resolve_unet_config(str(path), 4, 32)
    with pytest.raises(unet_mod.UNetConfigError, match="unknown UNet preset"):
        unet_mod.resolve_unet_config("sd9", 4, 32)
    with pytest.raises(unet_mod.UNetConfigError, match="divisible"):
        unet_mod.check_latent_size(unet_mod.PRESETS["sd15"], 36, 36)


def test_job_refuses_a_unet_that_does_not_fit_the_data(uneven, tmp_path, capsys) -> None:
    from jobs.train import main

    code = main(["--preset", "sd15", "--data", str(uneven.dir), "--storage-path", str(tmp_path), "--no-use-gpu",
                 "--mixed-precision", "no"])
    assert code == 2
    assert "cross_attention_dim 768 but the text states are 16" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was started or written
    assert main(["--data", str(tmp_path / "missing")]) == 2


def test_multi_node_run_with_node_local_storage_is_refused() -> None:
    run_storage.check_storage("/tmp/runs", ["10.0.0.1"], False)
    run_storage.check_storage("/tmp/runs", ["127.0.0.1", "127.0.0.1"], False)  # ray.cluster_utils nodes: one machine
    run_storage.check_storage("s3://bucket/runs", ["10.0.0.1", "10.0.0.2"], False)
    run_storage.check_storage("/mnt/nfs/runs", ["10.0.0.1", "10.0.0.2"], True)
    with pytest.raises(ConfigError, match="local path but the cluster spans 2 machines"):
        run_storage.check_storage("/tmp/runs", ["10.0.0.1", "10.0.0.2"], False)
    with pytest.raises(ConfigError):
        run_storage.check_storage("file:///tmp/runs", ["10.0.0.1", "10.0.0.2"], False)


def test_resume_on_other_data_is_refused(tmp_path) -> None:
    run_storage.write_run_state(str(tmp_path), "r",
                                {"mlflow_run_id": "abc", "data_dir": "/a", "data_manifest_sha256": "1" * 64})
    state = run_storage.read_run_state(str(tmp_path), "r")
    run_storage.check_resume(state, "/a", "1" * 64, "r")
    with pytest.raises(ConfigError, match="same latents"):
        run_storage.check_resume(state, "/b", "2" * 64, "r")
    assert run_storage.read_run_state(str(tmp_path), "other") is None
