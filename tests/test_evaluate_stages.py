"""Evaluation per stage: an upscaler's SR fidelity against bicubic on held-out pairs, and a cascade's
FID / CLIP score at every stage's resolution (tiny untrained models: the numbers are checked against
direct torchmetrics / reference computations, not for quality)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from latentforge import storage
from latentforge.config import ConfigError
from latentforge.evaluation.eval_set import EvalSet, iter_samples, open_eval_set
from latentforge.evaluation.sr_fidelity import (FidelityMeter, comparison_picture, fidelity_table, held_out_images,
                                                sr_fidelity)
from latentforge.generation.outputs import read_png_meta
from latentforge.generation.sampler import SampleParams
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.training.config import TrainConfig
from latentforge.upscaler.degradation import Degradation, bicubic_upsample
from tests.harness.sr_scenes import export, make_trainer, write_scene_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Untrained tiny exports (a 16 px base, a 16 -> 32 px upscaler), held-out 32 px scenes with pixels,
    16 px scenes, random Inception weights and the tiny CLIP."""
    from tests.harness.tiny_models import save_random_inception_weights

    root = tmp_path_factory.mktemp("stages")
    clip = str(save_tiny_clip_checkpoint(root / "clip.safetensors"))
    low = write_scene_latents(root / "lat16", clip, count=4, resolution=16, shard_size=4)
    high = write_scene_latents(root / "lat32", clip, count=4, resolution=32, shard_size=4)
    held = write_scene_latents(root / "held32", clip, count=5, resolution=32, seed=99, shard_size=5)
    upscaler = TrainConfig(data=str(high.dir), stage="upscaler", lowres_factor=2, max_noise_level=100, ema_decay=0,
                           batch_size=4)
    inception = str(root / "inception.pth")
    return {"base": export(make_trainer(low, TrainConfig(data=str(low.dir), ema_decay=0)), low, root / "base"),
            "sr": export(make_trainer(high, upscaler), high, root / "sr"), "held": str(held.dir),
            "low": str(low.dir), "clip": clip, "inception": inception,
            "inception_sha": save_random_inception_weights(inception, seed=1)}


def evaluate_job():
    from jobs.demo import load_job  # loads jobs/evaluate.py as `python jobs/evaluate.py` would

    return load_job("evaluate")


def _unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def test_sr_and_bicubic_scores_equal_direct_torchmetrics_calls(stages) -> None:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from latentforge.trained_model import load_export
    from latentforge.upscaler.sampling import Upscaler

    upscaler = Upscaler(load_export(stages["sr"]))
    held = held_out_images(open_eval_set(stages["held"]), 32, limit=5)
    params = SampleParams(sampler="ddim", steps=2, guidance=1.0)
    result = sr_fidelity(upscaler, held, params, noise_level=10, seed=3, batch_size=2, degradation_seed=7)
    # By hand, in one batch: the recorded degradation (factor 2, seed 7, epoch 0), PIL bicubic, the same seeds.
    low = np.stack([Degradation(2, seed=7).apply(im, key, 0) for im, key in zip(held.images, held.keys)])
    bicubic = bicubic_upsample(low, 32)
    made = upscaler.upscale(low, held.captions, [3 + i for i in range(5)], SampleParams(steps=2, guidance=1.0,
                            height=32, width=32), 10)
    sr = np.stack([m.to_uint8() for m in made])
    m = result.metrics
    for name, images in (("bicubic", bicubic), ("sr", sr)):
        preds, target = _unit(images), _unit(held.images)
        assert m[f"{name}_psnr"] == pytest.approx(float(peak_signal_noise_ratio(preds, target, data_range=1.0)),
                                                  abs=1e-3)
        assert m[f"{name}_ssim"] == pytest.approx(float(structural_similarity_index_measure(
            preds, target, data_range=1.0, kernel_size=11)), abs=1e-4)
    assert m["sr_psnr_gain_db"] == pytest.approx(m["sr_psnr"] - m["bicubic_psnr"]) and m["sr_num_pairs"] == 5
    assert 15 < m["bicubic_psnr"] < 60 and m["bicubic_psnr"] != pytest.approx(m["sr_psnr"], abs=0.5)
    assert (result.lowres_size, result.resolution) == (16, 32) and held.images.shape == (5, 32, 32, 3)
    # The picture: one row per pair, low-res | bicubic | SR | real, each enlarged 4x (nearest) with 2 px gutters.
    sheet = comparison_picture(result)
    assert sheet.shape == (5 * 128 + 6 * 2, 4 * 128 + 5 * 2, 3)
    assert np.array_equal(sheet[2:130:4, 2 + 3 * 130:130 + 3 * 130:4], held.images[0])
    assert np.array_equal(sheet[2:130:8, 2:130:8], low[0])
    lines = fidelity_table(result).splitlines()
    assert "5 held-out pairs, 16 px -> 32 px" in lines[0]
    assert lines[2].split() == ["SR", "bicubic", "SR", "-", "bicubic"]
    assert lines[3].split()[2:] == [f"{m['sr_psnr']:.2f}", f"{m['bicubic_psnr']:.2f}", f"{m['sr_psnr_gain_db']:+.2f}"]


def test_identity_and_known_offset_give_the_textbook_numbers() -> None:
    rng = np.random.default_rng(0)
    real = rng.integers(20, 236, size=(3, 16, 16, 3), dtype=np.uint8)
    same = FidelityMeter(16)
    same.update(real, real)
    psnr, ssim = same.compute()
    assert psnr == float("inf") and ssim == pytest.approx(1.0, abs=1e-6)
    shifted = FidelityMeter(16)
    for start in (0, 2):  # accumulated over two batches = one call on all pairs
        shifted.update(real[start:start + 2] + 10, real[start:start + 2])
    psnr, ssim = shifted.compute()
    assert psnr == pytest.approx(20 * np.log10(255 / 10), abs=1e-3) and ssim < 1.0  # MSE = (10/255)^2


def test_held_out_data_that_cannot_give_real_high_res_images_is_refused(stages, tmp_path, capsys) -> None:
    main = evaluate_job()

    eval_set = open_eval_set(stages["held"])
    no_pixels = copy.deepcopy(eval_set.manifest)
    no_pixels.extra.pop("pixels")
    with pytest.raises(ConfigError, match="latents without pixels.*--store-pixels"):
        held_out_images(EvalSet(eval_set.uri, no_pixels, eval_set.manifest_sha256), 32, 4)
    code = main(["--upscaler", stages["sr"], "--eval-set", stages["low"], "--out", str(tmp_path / "out"),
                 "--no-mlflow"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("evaluate:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "stores 16x16 px images but the upscaler makes 32x32 px" in errors[0]
    assert not (tmp_path / "out").exists()  # refused before any model loaded or file was written


def test_ingest_shards_give_held_out_images_unless_smaller_than_the_resolution(tmp_path) -> None:
    from latentforge.precompute.preprocess import preprocess_image
    from tests.harness.ingest_shards import write_ingest_shards

    shards = write_ingest_shards(tmp_path / "ingest", shard_sizes=(5,), bad=False)  # shorter sides 40, 40, 32, 36, 37
    eval_set = open_eval_set(str(shards.dir))
    held = held_out_images(eval_set, 32, limit=5)
    assert held.images.shape == (5, 32, 32, 3) and held.keys == shards.keys
    (first,) = [s for s in iter_samples(eval_set, 1)]
    assert np.array_equal(held.images[0], preprocess_image(first.image_bytes, 32)[0])
    with pytest.raises(ConfigError, match=rf"image {shards.keys[2]} is 32x32 px, smaller than the upscaler's 40 px"):
        held_out_images(eval_set, 40, limit=5)


def _with_training_run(export_dir: str, client, experiment: str, name: str) -> str:
    """Point the export at a (finished) training run, as a real training export does."""
    run = client.create_run(experiment, run_name=name)
    client.set_terminated(run.info.run_id)
    path = str(Path(export_dir) / "manifest.json")
    manifest = storage.read_json(path)
    manifest["extra"]["mlflow_run_id"] = run.info.run_id
    storage.atomic_write_json(path, manifest)
    return run.info.run_id


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """One real sqlite MLflow store for the module (creating one costs seconds)."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    db = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=db)
    experiment = client.create_experiment("latentforge", artifact_location=(root / "artifacts").as_uri())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", db)
        yield client, experiment


def _evaluate_run(client, experiment: str, out: str):
    """The evaluate run that wrote to `out` (its logged params name the out dir)."""
    (run,) = [r for r in client.search_runs([experiment]) if r.data.params.get("out") == out]
    return run


def _pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _latest(client, run_id: str) -> dict[str, float]:
    return client.get_run(run_id).data.metrics


def test_sr_job_prints_the_table_and_logs_into_both_runs(stages, tmp_path, mlflow_store, capsys) -> None:
    main = evaluate_job()

    client, experiment = mlflow_store
    sr = str(tmp_path / "sr")
    shutil.copytree(stages["sr"], sr)
    train_run = _with_training_run(sr, client, experiment, "train-sr")
    code = main(["--upscaler", sr, "--eval-set", stages["held"], "--num-samples", "3", "--steps", "2",
                 "--noise-level", "0", "--batch-size", "2", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    names = {"sr_psnr", "sr_ssim", "bicubic_psnr", "bicubic_ssim", "sr_psnr_gain_db"}
    assert names <= set(written) and f"{written['sr_psnr_gain_db']:+.2f}" in out and "3 held-out pairs" in out
    assert f"{written['bicubic_psnr']:.2f}" in out and train_run in out
    source = _latest(client, train_run)
    assert all(source[f"eval/{n}"] == pytest.approx(written[n]) for n in names)
    evaluate = _evaluate_run(client, experiment, str(tmp_path / "out"))
    assert all(evaluate.data.metrics[n] == pytest.approx(written[n]) for n in names)
    arts = [a.path for a in client.list_artifacts(train_run, "eval/step_000000")]
    assert "eval/step_000000/comparison.png" in arts
    assert "comparison.png" in [a.path for a in client.list_artifacts(evaluate.info.run_id)]


def test_the_evaluate_run_is_open_while_scoring_and_a_refusal_starts_none(stages, tmp_path, mlflow_store) -> None:
    """A scoring that fails leaves a FAILED evaluate run (params and inputs logged); a refusal, none."""
    main = evaluate_job()
    client, experiment = mlflow_store
    broken = tmp_path / "broken"
    shutil.copytree(stages["sr"], broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()  # the manifests are fine: only loading the model fails
    args = ["--upscaler", str(broken), "--eval-set", stages["held"], "--num-samples", "2", "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "failed")]) == 1  # the bootstrap's "evaluate: failed: ..."
    run = _evaluate_run(client, experiment, str(tmp_path / "failed"))
    assert run.info.status == "FAILED" and run.data.params["upscaler"]
    refused_out = str(tmp_path / "refused")
    assert main([*args, "--noise-level", "101", "--out", refused_out]) == 2
    assert not [r for r in client.search_runs([experiment]) if r.data.params.get("out") == refused_out]


def test_cascade_scores_every_stage_at_its_resolution(stages, tmp_path, mlflow_store, capsys) -> None:
    from latentforge.evaluation.fid import FeatureStats, InceptionFeatures, reference_cache_key
    from latentforge.pixels import to_pixels, to_uint8

    main = evaluate_job()
    client, experiment = mlflow_store
    base, sr = str(tmp_path / "base"), str(tmp_path / "sr")
    for source, target in ((stages["base"], base), (stages["sr"], sr)):
        shutil.copytree(source, target)
    runs = {name: _with_training_run(d, client, experiment, name) for name, d in (("base", base), ("sr", sr))}
    common = ["--eval-set", stages["held"], "--num-samples", "2", "--steps", "2", "--batch-size", "2",
              "--cache-dir", str(tmp_path / "cache"), "--noise-level", "5", "--clip-model", "lf-tiny-clip",
              "--clip-weights", stages["clip"]]
    fid = ["--fid-weights", stages["inception"], "--fid-weights-sha256", stages["inception_sha"]]
    assert main(["--model", base, "--upscaler", sr, "--out", str(tmp_path / "cascade"), "--upscaler-steps", "3",
                 *common, *fid]) == 0
    assert main(["--model", base, "--out", str(tmp_path / "alone"), *common]) == 0  # no FID: a costly Fréchet
    cascade_info = json.loads((tmp_path / "cascade" / "metrics.json").read_text())["info"]
    assert (cascade_info["steps"], cascade_info["upscaler_steps"]) == (2, 3)
    cascade = json.loads((tmp_path / "cascade" / "metrics.json").read_text())["metrics"]
    alone = json.loads((tmp_path / "alone" / "metrics.json").read_text())["metrics"]
    assert {"fid_16px", "fid_32px", "clip_score_16px", "clip_score_32px"} <= set(cascade)
    assert all(0 <= cascade[f"clip_score_{size}px"] <= 100 for size in (16, 32))
    # The base stage of the cascade is the base evaluated alone (same captions and seeds): same images. Two
    # callers reach txt2img here (score_cascade, score_sampler), so what holds is the per-seed promise of
    # docs/architecture.md "Reproducibility": within one uint8 level (1/255) per pixel, not bit for bit.
    assert cascade["clip_score_16px"] == pytest.approx(alone["clip_score"], abs=1e-4)
    grid_16px, grid_alone = (_pixels(tmp_path / d / name).astype(int) for d, name in (("cascade", "grid_16px.png"),
                                                                                     ("alone", "grid.png")))
    assert grid_16px.shape == grid_alone.shape and np.abs(grid_16px - grid_alone).max() <= 1
    # Both grids show their tiles at 128 px: the 16 px samples enlarged x8, the 32 px ones x4.
    scales = {name: read_png_meta(str(tmp_path / "cascade" / name))["display_scale"] for name in ("grid_16px.png",
                                                                                                 "grid_32px.png")}
    assert scales == {"grid_16px.png": 8, "grid_32px.png": 4}
    # Each training run gets its own stage's numbers.
    assert _latest(client, runs["base"])["eval/fid_16px"] == pytest.approx(cascade["fid_16px"])
    assert _latest(client, runs["sr"])["eval/clip_score_32px"] == pytest.approx(cascade["clip_score_32px"])
    assert "eval/fid_16px" not in _latest(client, runs["sr"])
    out = capsys.readouterr().out
    assert "FID at 32px" in out and "CLIP score at 16px" in out
    # FID references: the held-out pixels PIL-resized to each stage's size.
    inception = InceptionFeatures(stages["inception"], stages["inception_sha"])
    pixels = held_out_images(open_eval_set(stages["held"]), 32, limit=2).images
    for size in (16, 32):
        (cached,) = [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("fid_ref_*.json")
                     if json.loads(p.read_text())["resolution"] == size]
        stats = FeatureStats.load(str(tmp_path / "cache" / f"fid_ref_{reference_cache_key(cached)[:24]}.npz"))
        resized = pixels if size == 32 else bicubic_upsample(pixels, size)
        direct = inception.accumulate([to_uint8(to_pixels(resized))])
        assert stats.n == 2 and np.allclose(stats.mean, direct.mean, atol=1e-5)
