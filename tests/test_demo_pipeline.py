"""`jobs/demo.py` end to end (smoke sizes) against a real MLflow server: outputs, grouping, lineage, and
the trained model loading in diffusers from the folder the summary's snippet names."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from latentforge.ingest.config import FAILURE_REASONS
from latentforge.demo.adherence import format_share
from latentforge.manifest import read_manifest

# The smoke demo trains for real (an autoencoder, then the UNet): minutes on an idle 2-core machine,
# 20-40 on a loaded one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2700)]

SMOKE = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs/configs/demo/smoke.yaml").read_text())
# The smoke preset trains long enough to learn colour (measured: 17% untrained -> 67% trained, see the
# preset). The untrained UNet hits the requested colour by chance (about 1/6); the trained one must
# beat it by this margin, 6 of 24 prompts, with 6 prompts to spare for another CPU's rounding.
COLOUR_MARGIN = 0.25
# The smoke preset's broken URLs: rows 7, 7 + N, 7 + 2N, ... (N = broken_every) cycle through a 404, an HTML
# page and a PNG cut in half (latentforge.demo.server), which ingest must count as these statuses.
BROKEN_STATUSES = dict(collections.Counter(
    ("http_4xx", "not_image", "decode_error")[(i // SMOKE["broken_every"]) % 3]
    for i in range(SMOKE["rows"]) if i % SMOKE["broken_every"] == 7))


def test_demo_writes_every_stage_and_a_summary(demo_smoke_run) -> None:
    out, summary = demo_smoke_run.out, demo_smoke_run.summary
    rows, broken = SMOKE["rows"], summary["broken_urls"]
    assert broken == sum(1 for i in range(rows) if i % SMOKE["broken_every"] == 7)  # latentforge.demo.server
    shards = read_manifest(str(out / "shards"), stage="ingest")
    assert shards.total_samples == summary["ingested"] == rows - broken
    # Each broken URL is counted under the status its kind must get, every other row is ok.
    failed = {k: v for k, v in shards.counts.items() if k in FAILURE_REASONS}
    assert failed == BROKEN_STATUSES and shards.counts["ok"] == rows - broken, shards.counts
    # One precompute pass wrote the base's 16 px and the upscaler's 32 px datasets (same samples).
    latents = read_manifest(str(out / "latents" / f"{SMOKE['resolution']}px"), stage="precompute")
    upscaler_data = read_manifest(str(out / "latents" / f"{SMOKE['upscale_to']}px"), stage="precompute")
    assert latents.total_samples == upscaler_data.total_samples == summary["latents"] == rows - broken
    # The demo's own autoencoder, trained on the ingest shards, made the latents (diffusers' text-state convention).
    autoencoder = read_manifest(summary["autoencoder"]["export"], stage="autoencoder")
    assert autoencoder.extra["step"] == summary["autoencoder"]["step"] == SMOKE["autoencoder_steps"]
    assert latents.models["vae"]["type"] == "autoencoder_kl"
    assert latents.models["vae"]["scaling_factor"] == pytest.approx(autoencoder.models["vae"]["scaling_factor"])
    assert latents.config["vae"] == summary["autoencoder"]["export"] and latents.config["text_states"] == "full"
    # Loosely at smoke size (the default's 1,000 steps on 4,000 scenes reach >= 30 dB, see README).
    assert summary["autoencoder"]["psnr"] > 20
    for name, side in (("trained", SMOKE["resolution"]), ("untrained", SMOKE["resolution"]),
                       ("cascade", SMOKE["upscale_to"])):
        samples = out / "samples" / name
        index = [json.loads(line) for line in (samples / "index.jsonl").read_text().splitlines() if line.strip()]
        assert len(index) == SMOKE["prompts"] and (samples / "grid.png").exists()
        assert summary["adherence"][name]["n"] == SMOKE["prompts"]
        with Image.open(samples / "000000.png") as first:
            assert first.size == (side, side), name
    before, after = summary["adherence"]["untrained"], summary["adherence"]["trained"]
    assert after["colour"] >= before["colour"] + COLOUR_MARGIN, f"training did not teach colour: {before} -> {after}"
    assert (out / "checkpoints" / "demo-train" / "export" / "unet").is_dir()
    # The upscaler against bicubic on held-out scenes, through the evaluate job.
    upscaler = read_manifest(summary["upscaler"]["export"])
    assert upscaler.extra["upscaler"]["lowres_size"] == SMOKE["resolution"]
    metrics = summary["upscaler"]["metrics"]
    assert metrics["sr_num_pairs"] == SMOKE["heldout"] and math.isfinite(metrics["sr_psnr"])
    assert metrics["sr_psnr_gain_db"] == pytest.approx(metrics["sr_psnr"] - metrics["bicubic_psnr"])
    assert (out / "sr_fidelity" / "comparison.png").is_file()
    # Ray Train's placement-group cleaner finds no State API in the embedded Ray: muted, not a warning a second.
    assert "State API may be temporarily unavailable" not in (out.parent / "demo.log").read_text()
    # The printed summary says where everything is and gives the before/after numbers.
    text = demo_smoke_run.log
    for needle in ("LatentForge demo", str(out / "shards"), str(out / "latents"), "adherence: colour",
                   "untrained ->", demo_smoke_run.tracking_uri, "upscaler vs bicubic", "bicubic upsampling of the same"):
        assert needle in text, needle
    assert f"{format_share(after['both'], after['n'])} trained" in text  # each figure with its 95 % interval


def test_demo_stage_runs_are_grouped_and_linked(demo_smoke_run) -> None:
    from mlflow.tracking import MlflowClient

    from latentforge.tracking import upstream_runs

    client = MlflowClient(tracking_uri=demo_smoke_run.tracking_uri)
    summary = demo_smoke_run.summary
    parent = summary["pipeline_run_id"]
    children = client.search_runs([summary["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    stages = sorted(r.data.tags.get("latentforge.stage") for r in children)
    assert stages == ["autoencoder", "evaluate", "generate", "generate", "generate", "ingest", "ingest", "precompute",
                      "train", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    pipeline = client.get_run(parent)
    assert pipeline.data.metrics["adherence_trained_n"] == SMOKE["prompts"]
    assert {"adherence_untrained_colour", "adherence_trained_colour"} <= set(pipeline.data.metrics)

    # Lineage by manifest digests: trained samples <- train <- precompute <- ingest.
    by_stage, by_name = {}, {r.info.run_name: r.info.run_id for r in children}
    for r in children:
        by_stage.setdefault(r.data.tags["latentforge.stage"], []).append(r.info.run_id)
    by_stage["ingest"] = [by_name["demo-ingest"]]  # the training scenes' (the other is the held-out set's)
    train = summary["training_run_id"]
    assert train == by_name["demo-train"] and by_name["demo-upscaler"] in by_stage["train"]
    env = dict(MLFLOW_TRACKING_URI=demo_smoke_run.tracking_uri)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert [u["run_id"] for u in upstream_runs(train)] == by_stage["precompute"]
        # The shards' producer. Precompute and the autoencoder both read the shards' manifest, and
        # upstream_runs' search also returns the other reader (it has an output dataset of its own).
        readers = {"precompute": "autoencoder", "autoencoder": "precompute"}
        for stage, other in readers.items():
            producers = {u["run_id"] for u in upstream_runs(by_stage[stage][0])}
            assert producers - set(by_stage[other]) == set(by_stage["ingest"]), stage
        generated_from = {u["run_id"] for g in by_stage["generate"] for u in upstream_runs(g)}
        assert {train, by_name["demo-upscaler"]} <= generated_from  # the cascade samples both
    # The adherence numbers are also a chart in the training run: step 0 vs the last step.
    history = client.get_metric_history(train, "adherence_colour")
    assert sorted(m.step for m in history) == [0, SMOKE["steps"]]


def test_the_printed_snippet_loads_the_demo_model_in_diffusers(demo_smoke_run) -> None:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from latentforge.demo.report import diffusers_snippet

    folder = demo_smoke_run.summary["diffusers"]
    assert folder == str(demo_smoke_run.out.resolve() / "checkpoints" / "demo-train" / "diffusers")
    assert diffusers_snippet(folder) in demo_smoke_run.log  # the printed line names that folder, absolute
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    # Its VAE is the demo's own autoencoder, weights and scaling factor.
    trained = AutoencoderKL.from_pretrained(demo_smoke_run.summary["autoencoder"]["export"])
    assert pipe.vae.config.scaling_factor == pytest.approx(trained.config.scaling_factor)
    # The folder holds a copy of the stored weights (no arithmetic), so equality is exact on any CPU.
    vae_weights = pipe.vae.state_dict()
    assert all(torch.equal(vae_weights[name], tensor) for name, tensor in trained.state_dict().items())
    image = pipe("a red circle on the left", num_inference_steps=2, height=16, width=16,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (16, 16, 3)
