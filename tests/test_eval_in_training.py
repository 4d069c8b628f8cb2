"""In-training evaluation (the interface the train stage calls) and jobs/evaluate.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.harness.latent_shards import write_latent_dataset
from tests.harness.tiny_export import build_tiny_export

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.harness.tiny_models import save_random_inception_weights

    root = tmp_path_factory.mktemp("eval_assets")
    inception = str(root / "inception_random.pth")
    sha = save_random_inception_weights(inception, seed=1)
    latents = write_latent_dataset(root / "latents", shard_sizes=[3, 3], latent_channels=12, latent_size=8,
                                   width=32, context_length=77, vae_type="patchify")
    return {"root": root, "inception": inception, "sha": sha, "latents": latents}


def test_training_evaluator_interface(assets, tmp_path) -> None:
    from latentforge.evaluation.in_training import EvalResult, InTrainingEvalConfig, TrainingEvaluator
    from latentforge.generation import load_export

    export = build_tiny_export(tmp_path / "run", vae="patchify", resolution=16)
    model = load_export(str(export.dir))
    data_manifest = json.loads((export.dir / "data_manifest.json").read_text())
    config = InTrainingEvalConfig(prompts=["a red circle", "a blue square", "a green star"], seeds=[1, 2, 3],
                                  sampler="dpmsolver++", steps=4, guidance=3.0, fid_weights=assets["inception"],
                                  fid_weights_sha256=assets["sha"], clip_model="lf-tiny-clip",
                                  clip_weights=export.clip_path, eval_set=str(assets["latents"].dir),
                                  num_fid_samples=3, cache_dir=str(tmp_path / "cache"))
    evaluator = TrainingEvaluator(config, str(assets["latents"].dir), data_manifest, "cpu",
                                  scheduler_config=model.scheduler_config)
    model.unet.train()
    first = evaluator.evaluate(model.unet, 10, str(tmp_path / "eval"))
    assert isinstance(first, EvalResult) and model.unet.training  # mode restored
    assert set(first.metrics) == {"eval/fid", "eval/fid_num_samples", "eval/clip_score"}
    assert first.metrics["eval/fid_num_samples"] == 3 and np.isfinite(first.metrics["eval/fid"])
    assert 0 <= first.metrics["eval/clip_score"] <= 100
    (grid,) = first.artifacts
    assert grid.endswith("step_000010_grid.png") and os.path.exists(grid)
    assert first.info["fid_reference_cache_hit"] is False
    second = evaluator.evaluate(model.unet, 20, str(tmp_path / "eval"))
    assert second.info["fid_reference_cache_hit"] is True  # reference stats computed once
    assert second.metrics == first.metrics  # same weights, fixed prompts and seeds
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(second.artifacts[0])))
    # Without metric weights: only the grid.
    plain = TrainingEvaluator(InTrainingEvalConfig(prompts=["x"], steps=2), None, data_manifest, "cpu",
                              scheduler_config=model.scheduler_config)
    result = plain.evaluate(model.unet, 1, str(tmp_path / "plain"))
    assert result.metrics == {} and len(result.artifacts) == 1


def test_evaluate_job_logs_into_the_training_run(assets, tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=db)
    exp = client.create_experiment("latentforge", artifact_location=(tmp_path / "artifacts").as_uri())
    train_run = client.create_run(exp, run_name="train-tiny")
    client.set_terminated(train_run.info.run_id)
    export = build_tiny_export(tmp_path / "run", vae="patchify", resolution=16,
                               mlflow_run_id=train_run.info.run_id)
    client.set_tag(train_run.info.run_id, "latentforge.export_uri", str(export.dir))
    env = dict(os.environ, MLFLOW_TRACKING_URI=db)
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "jobs" / "evaluate.py"), "--model", train_run.info.run_id,
           "--eval-set", str(assets["latents"].dir), "--num-samples", "4", "--steps", "3", "--batch-size", "4",
           "--fid-weights", assets["inception"], "--fid-weights-sha256", assets["sha"],
           "--clip-model", "lf-tiny-clip", "--clip-weights", export.clip_path, "--cache-dir", str(tmp_path / "cache"),
           "--out", str(tmp_path / "eval_out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FID" in proc.stdout and "(N=4)" in proc.stdout and train_run.info.run_id in proc.stdout
    history = {k: client.get_metric_history(train_run.info.run_id, k) for k in ("eval/fid", "eval/clip_score")}
    assert all(len(h) == 1 and h[0].step == 7 for h in history.values())  # the export's step
    metrics = json.loads((tmp_path / "eval_out" / "metrics.json").read_text())
    assert metrics["metrics"]["fid"] == pytest.approx(history["eval/fid"][0].value)
    assert metrics["info"]["fid_weights_sha256"] == assets["sha"] and metrics["info"]["clip_score_formula"]
    arts = [a.path for a in client.list_artifacts(train_run.info.run_id, "eval/step_000007")]
    assert "eval/step_000007/grid.png" in arts
    # The real file's hash is the default: random weights without their hash are refused (exit 1).
    bad = [c for c in cmd if c not in ("--fid-weights-sha256", assets["sha"])]
    proc = subprocess.run(bad, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "no fallback" in proc.stderr


def test_image_shard_eval_set_is_read_in_order(tmp_path) -> None:
    import io
    import tarfile

    from PIL import Image

    from latentforge import storage
    from latentforge.evaluation.eval_set import iter_samples, open_eval_set, real_image_batches
    from latentforge.manifest import Manifest, ShardRecord, write_manifest

    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
            buf = io.BytesIO()
            Image.new("RGB", (40, 20), colour).save(buf, format="PNG")
            for name, data in ((f"0000000{i}.png", buf.getvalue()), (f"0000000{i}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    write_manifest(str(tmp_path), Manifest(stage="ingest", config={}, shards=[
        ShardRecord(name="00000", samples=2, sha256=storage.sha256_file(str(tar_path)))]))
    eval_set = open_eval_set(str(tmp_path))
    samples = list(iter_samples(eval_set))
    assert [s.caption for s in samples] == ["caption 0", "caption 1"] and eval_set.kind == "images"
    (batch,) = list(real_image_batches(eval_set, samples, size=16, batch_size=4))
    assert batch.shape == (2, 3, 16, 16)
    assert batch[0, 0].mean() > 0.99 and batch[1, 2].mean() > 0.99 and batch[0, 2].mean() < -0.99
