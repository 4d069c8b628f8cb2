"""`jobs/demo.py` end to end (smoke sizes) against a real MLflow server: outputs, grouping, lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from latentforge.manifest import read_manifest

# The smoke demo trains for real: ~3 min on an idle 2-core machine, 15 on a loaded one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SMOKE = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs/configs/demo/smoke.yaml").read_text())
# The smoke preset trains long enough to learn colour (measured: 17% untrained -> 62% trained, see the
# preset). The untrained UNet hits the requested colour by chance (about 1/6); the trained one must
# beat it by this margin, 6 of 24 prompts, with 5 prompts to spare for another CPU's rounding.
COLOUR_MARGIN = 0.25


def test_demo_writes_every_stage_and_a_summary(demo_smoke_run) -> None:
    out, summary = demo_smoke_run.out, demo_smoke_run.summary
    rows, broken = 240, summary["broken_urls"]
    assert broken == 6
    shards = read_manifest(str(out / "shards"), stage="ingest")
    assert shards.total_samples == summary["ingested"] == rows - broken
    assert sum(v for k, v in shards.counts.items() if k not in ("ok", "rows")) >= broken or shards.counts
    latents = read_manifest(str(out / "latents"), stage="precompute")
    assert latents.total_samples == summary["latents"] == rows - broken
    assert latents.models["vae"]["type"] == "patchify"
    for name in ("trained", "untrained"):
        samples = out / "samples" / name
        index = [json.loads(line) for line in (samples / "index.jsonl").read_text().splitlines() if line.strip()]
        assert len(index) == SMOKE["prompts"] and (samples / "grid.png").exists()
        assert summary["adherence"][name]["n"] == SMOKE["prompts"]
    before, after = summary["adherence"]["untrained"], summary["adherence"]["trained"]
    assert after["colour"] >= before["colour"] + COLOUR_MARGIN, f"training did not teach colour: {before} -> {after}"
    assert (out / "checkpoints" / "demo-train" / "export" / "unet").is_dir()
    # The printed summary says where everything is and gives the before/after numbers.
    text = demo_smoke_run.log
    for needle in ("LatentForge demo", str(out / "shards"), str(out / "latents"), "adherence: colour",
                   "untrained ->", demo_smoke_run.tracking_uri):
        assert needle in text, needle


def test_demo_stage_runs_are_grouped_and_linked(demo_smoke_run) -> None:
    from mlflow.tracking import MlflowClient

    from latentforge.tracking import upstream_runs

    client = MlflowClient(tracking_uri=demo_smoke_run.tracking_uri)
    summary = demo_smoke_run.summary
    parent = summary["pipeline_run_id"]
    children = client.search_runs([summary["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    stages = sorted(r.data.tags.get("latentforge.stage") for r in children)
    assert stages == ["generate", "generate", "ingest", "precompute", "train"]
    assert all(r.info.status == "FINISHED" for r in children)
    pipeline = client.get_run(parent)
    assert pipeline.data.metrics["adherence_trained_n"] == SMOKE["prompts"]
    assert {"adherence_untrained_colour", "adherence_trained_colour"} <= set(pipeline.data.metrics)

    # Lineage by manifest digests: trained samples <- train <- precompute <- ingest.
    by_stage = {}
    for r in children:
        by_stage.setdefault(r.data.tags["latentforge.stage"], []).append(r.info.run_id)
    train = summary["training_run_id"]
    assert by_stage["train"] == [train]
    env = dict(MLFLOW_TRACKING_URI=demo_smoke_run.tracking_uri)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert [u["run_id"] for u in upstream_runs(train)] == by_stage["precompute"]
        assert [u["run_id"] for u in upstream_runs(by_stage["precompute"][0])] == by_stage["ingest"]
        generated_from = {u["run_id"] for g in by_stage["generate"] for u in upstream_runs(g)}
        assert train in generated_from
    # The adherence numbers are also a chart in the training run: step 0 vs the last step.
    history = client.get_metric_history(train, "adherence_colour")
    assert sorted(m.step for m in history) == [0, SMOKE["steps"]]
