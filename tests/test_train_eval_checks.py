"""In-training eval: refused at config time when it cannot work, its failures counted when it runs.

A misconfigured eval is one clear line and exit 2 before any Ray worker exists (not a warning
in a worker's log after hours of training); an eval that fails during training is counted in
`eval/failures` and in the export summary the train job prints, and leaves no temp files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from latentforge import storage
from latentforge.config import ConfigError
from latentforge.evaluation.in_training import (EvalFailures, EvalResult, InTrainingEvalConfig,
                                                 UnavailableEvaluator, check_can_start)
from latentforge.training.config import TrainConfig
from tests.harness.latent_shards import write_latent_dataset
from tests.harness.ray_head import venv_env

REPO = Path(__file__).resolve().parent.parent
WIDTH = 32


@pytest.mark.parametrize("settings, message", [
    ({"eval_prompts": ["a red circle"], "eval_every": 0}, "needs --eval-every"),
    ({"eval_every": 5, "eval_fid_weights": "inception.pth"}, "need --eval-prompts"),
    ({"eval_every": 5, "eval_clip_model": "ViT-B-32"}, "need --eval-prompts"),
    ({"eval_every": 5, "eval_prompts": ["a", "b"], "eval_sampler": "nonsense"}, "in-training eval: "),
    ({"eval_every": 5, "eval_prompts": ["a", "b"], "eval_seeds": [1]}, "1 seeds for 2 prompts"),
    ({"eval_every": 5, "eval_prompts": ["a", "b"], "eval_num_fid_samples": 1}, "num_fid_samples"),
])
def test_eval_settings_that_cannot_work_are_config_errors(settings, message) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_eval_settings_that_work_pass() -> None:
    assert TrainConfig(eval_every=5, eval_prompts=["a red circle"]).eval_config().sampler == "ddim"
    assert TrainConfig(eval_every=5).eval_prompts == []  # validation loss only


def _dataset(tmp_path: Path, clip_weights: str):
    models = {"vae": {"type": "patchify", "id": "", "patch_size": 2, "scaling_factor": 1.0, "shift_factor": 0.0,
                      "latent_channels": 12, "downsample": 2},
              "text_encoder": {"name": "lf-tiny-clip", "weights": clip_weights, "layer": "last", "context_length": 77,
                               "width": WIDTH, "pooled_dim": WIDTH}}
    return write_latent_dataset(tmp_path / "latents", shard_sizes=[8], latent_channels=12, width=WIDTH,
                                context_length=77, vae_type="patchify", models=models)


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory) -> str:
    from latentforge.models.text_encoder import save_tiny_clip_checkpoint

    return save_tiny_clip_checkpoint(str(tmp_path_factory.mktemp("clip") / "clip.safetensors"))


def test_check_can_start_names_what_is_missing(tmp_path, clip_file) -> None:
    info = _dataset(tmp_path, clip_file)
    data = str(info.dir)
    check_can_start(InTrainingEvalConfig(prompts=["x"]), data, info.manifest)  # everything is there
    wrong_hash = tmp_path / "inception.pth"
    wrong_hash.write_bytes(b"not the inception weights")
    cases = [
        (InTrainingEvalConfig(prompts=["x"], fid_weights=str(tmp_path / "missing.pth")), "not found"),
        (InTrainingEvalConfig(prompts=["x"], fid_weights=str(wrong_hash)), "sha256"),
        (InTrainingEvalConfig(prompts=["x"], fid_weights=str(wrong_hash),
                              fid_weights_sha256=storage.sha256_file(str(wrong_hash))), "state dict"),
        (InTrainingEvalConfig(prompts=["x"], clip_model="no-such-clip"), "knows no model 'no-such-clip'"),
        (InTrainingEvalConfig(prompts=["x"], clip_model="lf-tiny-clip", clip_weights=str(tmp_path / "c.pt")),
         "neither a file here nor a pretrained tag"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_can_start(config, data, info.manifest)
    lost_encoder = _dataset(tmp_path / "lost", str(tmp_path / "gone" / "clip.safetensors"))
    with pytest.raises(ConfigError, match="the data's text encoder"):
        check_can_start(InTrainingEvalConfig(prompts=["x"]), str(lost_encoder.dir), lost_encoder.manifest)


def test_train_job_refuses_an_eval_that_cannot_start_before_ray_starts(tmp_path) -> None:
    info = _dataset(tmp_path, str(tmp_path / "gone" / "clip.safetensors"))
    env = venv_env()
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--preset", "tiny", "--data", str(info.dir),
         "--storage-path", str(tmp_path / "runs"), "--run-name", "r", "--steps", "2", "--batch-size", "4", "--eval-every", "1",
         "--eval-prompts", "a red circle", "--no-mlflow"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train:")]
    assert len(errors) == 1 and "in-training eval cannot start: the data's text encoder" in errors[0], proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # refused before Ray and workers
    assert not (tmp_path / "runs").exists()


class _Trainer:
    """What evaluate_step needs of DiffusionTrainer: EMA weights to evaluate (no validation batches)."""

    ema = None

    def __init__(self, unet) -> None:
        self.unet = unet

    @contextmanager
    def ema_weights(self):
        yield self.unet


class _Run:
    def __init__(self) -> None:
        self.logged: list[tuple[str, bool]] = []

    def log_artifact(self, path: str, artifact_path: str) -> None:
        self.logged.append((artifact_path, os.path.exists(path)))


class _Broken:
    def evaluate(self, unet, step, out_dir):
        Path(out_dir, "half_written.png").write_bytes(b"")
        raise RuntimeError("CUDA out of memory (simulated)")


class _Working:
    def evaluate(self, unet, step, out_dir) -> EvalResult:
        grid = Path(out_dir, f"step_{step:06d}_grid.png")
        grid.write_bytes(b"png")
        return EvalResult(metrics={"eval/clip_score": 20.0}, artifacts=[str(grid)])


def test_eval_failures_are_counted_in_the_metrics_and_leave_no_temp_dir(tmp_path, monkeypatch) -> None:
    from pipelines.train_worker import evaluate_step

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    failures, run, pool = EvalFailures(), _Run(), None
    trainer = _Trainer(unet=object())
    metrics, pool = evaluate_step(trainer, 2, [], _Working(), run, pool, failures)
    assert metrics == {"eval/clip_score": 20.0, "eval/failures": 0.0}
    metrics, pool = evaluate_step(trainer, 4, [], _Broken(), run, pool, failures)
    assert metrics == {"eval/failures": 1.0}
    metrics, pool = evaluate_step(trainer, 6, [], UnavailableEvaluator("MemoryError: "), None, pool, failures)
    assert metrics == {"eval/failures": 2.0}
    assert failures.count == 2 and failures.last.startswith("step 6: RuntimeError: the evaluator could not start")
    metrics, pool = evaluate_step(trainer, 8, [], _Working(), None, pool, failures)  # no MLflow run
    pool.shutdown(wait=True)
    assert run.logged == [("eval/step_000002", True)]  # uploaded first, removed after
    assert os.listdir(scratch) == []


def test_train_summary_shows_eval_failures_and_dropped_metrics() -> None:
    from pipelines.train import _eval_failures_text

    assert _eval_failures_text({"eval_failures": 0, "eval_last_failure": ""}) == "0"
    assert _eval_failures_text({"eval_failures": 3, "eval_last_failure": "step 9: OSError: disk full"}) == \
        "3 (last: step 9: OSError: disk full)"
