"""`--no-mlflow` on every stage: one shared config field, and a run with it makes no MLflow call.

"No MLflow call" is checked where a call would show: without MLFLOW_TRACKING_URI the first one
creates ./mlruns, so each stage runs in a fresh working directory that must stay without it.
The whole pipeline with the flag (ingest, precompute, train with its in-training eval, generate,
on Ray) runs in tests/test_temp_files.py; the cheap stages run here, in-process.
"""

from __future__ import annotations

import os

import pytest
import yaml

from latentforge import tracking
from latentforge.tracking import PipelineRun, StageRun
from tests.harness.latent_shards import write_latent_dataset
from tests.harness.tiny_export import build_tiny_export

JOBS = ("download_images", "train_autoencoder", "precompute_latents", "train", "generate", "evaluate", "demo")


@pytest.fixture
def no_store(tmp_path, monkeypatch):
    """A fresh working directory and no tracking server: any MLflow call would create ./mlruns here."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PIPELINE_RUN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _job_main(name: str):
    from jobs.demo import load_job  # loads jobs/<name>.py as `python jobs/<name>.py` would

    return load_job(name)


def _printed_config(name: str, argv: list[str], capsys) -> dict:
    try:
        code = _job_main(name)([*argv, "--print-config"])
    except SystemExit as exc:  # most jobs leave through argparse's exit; precompute returns it
        code = exc.code
    assert code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("job", JOBS)
def test_every_job_takes_no_mlflow(job, capsys) -> None:
    assert _printed_config(job, [], capsys)["mlflow"] is True
    assert _printed_config(job, ["--no-mlflow"], capsys)["mlflow"] is False


def test_disabled_runs_make_no_call_even_when_resuming(no_store, monkeypatch) -> None:
    with PipelineRun("demo", enabled=False) as pipeline:
        assert pipeline.run_id is None and tracking.PIPELINE_RUN_ENV not in os.environ
        with StageRun("train", run_id="0" * 32, enabled=False) as run:  # a run state naming a run
            run.log_params({"a": 1})
            run.log_metrics({"loss": 1.0}, step=1)
            run.set_tags({"t": "v"})
            run.log_manifest(str(no_store), "ab" * 32, "input")
        assert run.run_id is None and not run.active
    assert not (no_store / "mlruns").exists()


def test_generate_and_evaluate_with_no_mlflow_leave_no_store(no_store) -> None:
    # The export names its training run: evaluate would log into it (log_to_source_run) unless told not to.
    export = build_tiny_export(no_store / "run", vae="patchify", resolution=16, mlflow_run_id="0" * 32)
    prompts = no_store / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert _job_main("generate")(["--model", str(export.dir), "--prompts", str(prompts), "--out", str(no_store / "gen"),
                                  "--steps", "2", "--no-progress", "--no-mlflow"]) == 0
    latents = write_latent_dataset(no_store / "latents", shard_sizes=[3], latent_channels=12, latent_size=8,
                                   width=32, context_length=77, vae_type="patchify")
    assert _job_main("evaluate")(["--model", str(export.dir), "--eval-set", str(latents.dir), "--num-samples", "2",
                                  "--steps", "2", "--out", str(no_store / "eval"), "--no-mlflow"]) == 0
    assert (no_store / "eval" / "metrics.json").exists()
    assert not (no_store / "mlruns").exists()
