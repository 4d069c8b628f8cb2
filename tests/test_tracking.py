"""Tracking against a real `mlflow server`: stage runs, pipeline grouping, manifest lineage."""

from __future__ import annotations

import json
import urllib.request

import pytest

from latentforge import tracking
from latentforge.manifest import Manifest, ShardRecord, manifest_digest, write_manifest
from latentforge.tracking import PIPELINE_RUN_ENV, PipelineRun, StageRun, upstream_runs

pytestmark = pytest.mark.slow


def _stage_dir(path, stage: str, samples: int) -> tuple[str, str]:
    write_manifest(str(path), Manifest(stage=stage, config={"x": 1},
                                       shards=[ShardRecord("00000", samples, "ab" * 32)]))
    return str(path), manifest_digest(str(path))


def _get_run(server, run_id: str) -> dict:
    with urllib.request.urlopen(f"{server.url}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30) as resp:
        return json.loads(resp.read())["run"]


def test_pipeline_groups_stage_runs_and_manifests_link_them(mlflow_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "tracking-test")
    monkeypatch.delenv(PIPELINE_RUN_ENV, raising=False)
    shards, shards_digest = _stage_dir(tmp_path / "shards", "ingest", 7)
    latents, latents_digest = _stage_dir(tmp_path / "latents", "precompute", 6)

    with PipelineRun("demo-test") as pipeline:
        assert pipeline.run_id and tracking.os.environ[PIPELINE_RUN_ENV] == pipeline.run_id
        with StageRun("ingest", run_name="ingest") as ingest:
            ingest.log_params({"a": {"b": 1}})
            ingest.log_manifest(shards, shards_digest, "output")
        with StageRun("precompute", run_name="precompute") as precompute:
            precompute.log_manifest(shards, shards_digest, "input")
            precompute.log_manifest(latents, latents_digest, "output")
            precompute.log_metrics({"samples": 6.0}, step=1)
        with StageRun("train", run_name="train", experiment="somewhere-else") as train:
            train.log_manifest(latents, latents_digest, "input")
    assert PIPELINE_RUN_ENV not in tracking.os.environ

    runs = {r: _get_run(mlflow_server, r) for r in (pipeline.run_id, ingest.run_id, precompute.run_id, train.run_id)}
    parent_tags = {t["key"]: t["value"] for t in runs[pipeline.run_id]["data"]["tags"]}
    assert "mlflow.parentRunId" not in parent_tags and parent_tags["latentforge.stage"] == "pipeline"
    for child in (ingest, precompute, train):
        info, tags = runs[child.run_id]["info"], {t["key"]: t["value"] for t in runs[child.run_id]["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == pipeline.run_id
        # Children follow their parent's experiment, even when asked for another one.
        assert info["experiment_id"] == runs[pipeline.run_id]["info"]["experiment_id"]
        assert info["status"] == "FINISHED"

    # The REST view the UI reads: dataset name, digest, source URI, context and profile.
    inputs = runs[precompute.run_id]["inputs"]["dataset_inputs"]
    by_context = {next(t["value"] for t in d["tags"] if t["key"] == "mlflow.data.context"): d["dataset"] for d in inputs}
    assert set(by_context) == {"input", "output"}
    assert by_context["input"]["digest"] == shards_digest[:36] and by_context["input"]["name"] == "shards"
    assert json.loads(by_context["output"]["source"])["uri"] == str(tmp_path / "latents" / "manifest.json")
    assert by_context["output"]["source_type"] == "local"
    assert json.loads(by_context["output"]["profile"]) == {"stage": "precompute", "shards": 1, "samples": 6,
                                                            "schema_version": 1}
    tags = {t["key"]: t["value"] for t in runs[precompute.run_id]["data"]["tags"]}
    assert tags["latentforge.output.digest"] == latents_digest

    # Lineage, one hop at a time: train <- precompute <- ingest.
    assert [(u["run_id"], u["stage"]) for u in upstream_runs(train.run_id)] == [(precompute.run_id, "precompute")]
    assert [u["run_id"] for u in upstream_runs(precompute.run_id)] == [ingest.run_id]
    assert upstream_runs(ingest.run_id) == []


def test_stage_run_survives_an_unreachable_server(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    shards, digest = _stage_dir(tmp_path / "s", "ingest", 1)
    with StageRun("ingest") as run:
        run.log_params({"a": 1})
        run.log_manifest(shards, digest, "output")
    assert not run.active
