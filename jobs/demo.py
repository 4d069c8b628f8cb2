"""`make demo`: the whole LatentForge pipeline on generated scenes, on an embedded local Ray.

    python jobs/demo.py                       # jobs/configs/demo/default.yaml
    python jobs/demo.py --preset smoke        # a tiny run (tests)
    python jobs/demo.py --vae-type patchify   # the weight-free pixel_unshuffle VAE instead of training one
    python jobs/demo.py --vae-type autoencoder_kl --vae stabilityai/sd-vae-ft-mse \
        --text-encoder ViT-B-32 --text-encoder-weights laion2b_s34b_b79k --resolution 64 \
        --upscale-to 128 --image-size 128   # real models

1. builds captioned scenes ("a red circle on the left", ...) and serves them from a loopback
   HTTP server, with a few broken URLs mixed in, and a held-out set of other scenes;
2. runs ingest -> train_autoencoder -> precompute (16 and 32 px in one pass) -> train (the base,
   + its diffusers export) -> train --stage upscaler (16 -> 32 px) -> generate (base, and the
   base -> upscaler cascade) -> evaluate (the upscaler against bicubic on the held-out scenes)
   through the same `main(argv)` entry points a user submits with `ray job submit`, all on one
   embedded Ray, all runs grouped under one MLflow pipeline run (LATENTFORGE_PIPELINE_RUN_ID);
   the autoencoder of an earlier run on the same scenes and settings is reused;
3. measures prompt adherence (does the requested colour dominate, and sit where the caption
   says?) of the untrained model, the trained base and the cascade at the final resolution, and
   prints where everything is, the autoencoder's held-out PSNR, the upscaler's PSNR gain over
   bicubic and the line that loads the model in diffusers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

try:
    import _bootstrap  # noqa: F401  (python jobs/demo.py)
except ImportError:  # imported as jobs.demo (tests)
    from jobs import _bootstrap  # noqa: F401

import pipelines  # noqa: F401  (platform/ on sys.path when latentforge is not installed)
from latentforge.config import ConfigError, config_to_dict, parse_config
from latentforge.demo.config import DemoConfig
from latentforge.demo.commands import autoencoder_settings, generate_argv, job_of, sr_fidelity_argv, stage_argv
from latentforge.demo.report import summary_text
from latentforge.demo.report import DemoPaths as Paths
from latentforge.manifest import MANIFEST_NAME

JOBS_DIR = Path(__file__).resolve().parent
SETTINGS_NAME = "demo_settings.json"  # beside the demo autoencoder's run: what it was trained from
log = logging.getLogger("demo")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int) -> None:
        super().__init__(f"stage {stage} exited with code {code}; its message is above. "
                         f"Rerun `make demo` after fixing it.")
        self.stage, self.code = stage, code


@dataclass
class DemoResult:
    values: dict[str, Any]
    summary: str


def load_job(name: str) -> Callable[[list[str]], int]:
    """The `main` of jobs/<name>.py: the very entry point `ray job submit ... python jobs/<name>.py` runs."""
    if str(JOBS_DIR) not in sys.path:
        sys.path.insert(0, str(JOBS_DIR))  # the jobs' own `import _bootstrap`
    module_name = f"latentforge_job_{name}"
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, JOBS_DIR / f"{name}.py")
        if spec is None or spec.loader is None:
            raise FileNotFoundError(f"jobs/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return module.main


def run_stage(name: str, argv: list[str], timings: dict[str, float]) -> None:
    print(f"\n=== {name}: python jobs/{job_of(name)}.py {' '.join(argv)}", flush=True)
    started = time.monotonic()
    try:
        code = load_job(job_of(name))(argv)
    except SystemExit as exc:  # a job's argparse error (2) or an explicit sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    timings[name] = timings.get(name, 0.0) + time.monotonic() - started
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # the stage was stopped: so is the demo
        raise KeyboardInterrupt(code - 128)
    if code != 0:
        raise StageFailed(name, code)


def prepare_data(config: DemoConfig, paths: Paths) -> list[Any]:
    from latentforge.demo.scenes import build_scene_set

    started = time.monotonic()
    scenes = build_scene_set(paths.scenes, rows=config.rows, seed=config.seed, image_size=config.image_size)
    if config.upscale_to:  # another seed: scenes the models never train on
        build_scene_set(paths.heldout_scenes, rows=config.heldout, seed=config.seed + 1, image_size=config.image_size)
    print(f"demo: {len(scenes)} scenes in {paths.scenes} ({time.monotonic() - started:.1f} s)", flush=True)
    return scenes


def text_encoder_weights(config: DemoConfig, paths: Paths) -> str | None:
    from latentforge.models.text_encoder import TINY_CLIP_NAME, save_tiny_clip_checkpoint

    if config.text_encoder == TINY_CLIP_NAME and not config.text_encoder_weights:
        path = paths.models / "lf-tiny-clip.safetensors"
        if not path.exists():
            save_tiny_clip_checkpoint(path, seed=config.seed)
        return str(path)
    return config.text_encoder_weights


def measure_adherence(samples_dir: Path) -> Any:
    from PIL import Image

    from latentforge.demo.adherence import score_images

    rows = [json.loads(line) for line in (samples_dir / "index.jsonl").read_text().splitlines() if line.strip()]

    def pairs():
        for row in rows:
            with Image.open(samples_dir / row.get("file", f"{int(row['index']):06d}.png")) as image:
                yield image.convert("RGB"), row["prompt"]

    return score_images(pairs())


def find_export(paths: Paths) -> Path:
    if not (paths.export / "unet").is_dir():
        raise FileNotFoundError(f"training finished but left no export in {paths.export}")
    return paths.export


def _finished_with(paths: Paths, settings: dict[str, Any]) -> bool:
    from latentforge.manifest import ManifestError, read_manifest

    try:
        read_manifest(str(paths.autoencoder_export), stage="autoencoder")  # written last: the export is whole
        return json.loads((paths.autoencoder / SETTINGS_NAME).read_text()) == settings
    except (OSError, ValueError, ManifestError):
        return False


def train_or_reuse_autoencoder(config: DemoConfig, paths: Paths, argv: list[str],
                               timings: dict[str, float]) -> dict[str, Any]:
    """Run the autoencoder stage, unless an earlier demo left a finished one of the same scenes and settings."""
    from latentforge import storage
    from latentforge.manifest import read_manifest

    settings = autoencoder_settings(config, argv)
    reused = _finished_with(paths, settings)
    if reused:
        print(f"demo: reusing the autoencoder in {paths.autoencoder_export} (same scenes and settings)", flush=True)
    else:
        shutil.rmtree(paths.autoencoder, ignore_errors=True)  # another run's state would be resumed or refused
        run_stage("train_autoencoder", argv, timings)
        storage.atomic_write_json(str(paths.autoencoder / SETTINGS_NAME), settings)
    export = read_manifest(str(paths.autoencoder_export), stage="autoencoder")
    metrics = export.extra.get("metrics", {})
    return {"export": str(paths.autoencoder_export), "psnr": float(metrics.get("psnr", float("nan"))),
            "ssim": float(metrics.get("ssim", float("nan"))), "step": int(export.extra["step"]), "reused": reused}


def training_run_id(export: Path) -> str | None:
    try:
        return json.loads((export / MANIFEST_NAME).read_text()).get("extra", {}).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


def trained_step(export: Path, default: int) -> int:
    try:
        return int(json.loads((export / MANIFEST_NAME).read_text()).get("extra", {}).get("step", default))
    except (OSError, ValueError, TypeError):
        return default


def demo_paths(config: DemoConfig) -> Paths:
    """The demo's directory, emptied of earlier stage outputs when `fresh` is set."""
    paths = Paths(config.out)
    if config.fresh:
        for stale in (paths.shards, paths.heldout_shards, paths.latents, paths.checkpoints, paths.samples,
                      paths.sr_fidelity):
            shutil.rmtree(stale, ignore_errors=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    return paths


def sample_and_score(config: DemoConfig, paths: Paths, pipeline: Any, models: dict[str, tuple[Path, Path | None]],
                     timings: dict[str, float]) -> dict[str, Any]:
    """Generate the eval prompts with each (model, upscaler or None); log adherence and grid to the pipeline run."""
    adherence = {}
    for name, (model, upscaler) in models.items():
        out = paths.samples / name
        argv = generate_argv(config, str(model), paths.prompts, out, f"demo-generate-{name}",
                             str(upscaler) if upscaler else None)
        run_stage("generate", argv, timings)
        adherence[name] = measure_adherence(out)
        pipeline.stage_run.log_metrics(adherence[name].as_metrics(f"adherence_{name}"))
        if (out / "grid.png").exists():
            pipeline.stage_run.log_artifact(str(out / "grid.png"), f"samples/{name}")
    return adherence


def measure_sr_fidelity(config: DemoConfig, paths: Paths, timings: dict[str, float]) -> dict[str, Any]:
    """The upscaler against bicubic on the held-out scenes, through the evaluate job (its metrics.json)."""
    upscaler = str(paths.upscaler_export)
    run_stage("evaluate", sr_fidelity_argv(config, paths, upscaler), timings)
    metrics = json.loads((paths.sr_fidelity / "metrics.json").read_text())
    return {"export": upscaler, "metrics": metrics.get("metrics", metrics), "out": str(paths.sr_fidelity)}


def chart_in_training_run(train_run: str, export: Path, adherence: dict[str, Any], config: DemoConfig,
                          paths: Paths) -> None:
    """The same numbers as a chart in the training run: step 0 (untrained) vs the last step."""
    from latentforge import tracking

    for name, step in (("untrained", 0), ("trained", trained_step(export, config.steps))):
        tracking.log_metrics_to_run(train_run, adherence[name].as_metrics("adherence"), step)
        grid = paths.samples / name / "grid.png"
        if grid.exists():
            tracking.log_artifact_to_run(train_run, str(grid), f"adherence/{name}")


def run_stages(config: DemoConfig, paths: Paths, clip_weights: str | None,
               timings: dict[str, float]) -> dict[str, Any] | None:
    """ingest -> (the demo's autoencoder) -> precompute -> train; returns the autoencoder's record."""
    argv = stage_argv(config, paths, clip_weights)
    autoencoder = None
    for stage, stage_args in argv.items():
        if stage == "train_autoencoder":
            autoencoder = train_or_reuse_autoencoder(config, paths, stage_args, timings)
        else:
            run_stage(stage, stage_args, timings)
    return autoencoder


def serve_url_lists(stack: contextlib.ExitStack, config: DemoConfig, paths: Paths, scenes: list[Any]) -> int:
    """Serve the scenes (and the held-out scenes) on loopback and write the ingest URL lists; broken URLs."""
    from latentforge.demo.scenes import load_scenes
    from latentforge.demo.server import DemoImageServer, url_rows, write_url_list

    server = stack.enter_context(DemoImageServer(paths.scenes))
    rows = url_rows(server, scenes, config.broken_every)
    write_url_list(rows, paths.urls)
    broken = sum("/broken/" in r["url"] for r in rows)
    print(f"demo: serving {len(rows)} URLs ({broken} broken) from {server.base_url}", flush=True)
    if config.upscale_to:
        heldout = stack.enter_context(DemoImageServer(paths.heldout_scenes))
        write_url_list(url_rows(heldout, load_scenes(paths.heldout_scenes), 0), paths.heldout_urls)
    return broken


def run_pipeline(config: DemoConfig, paths: Paths, pipeline: Any, clip_weights: str | None,
                 timings: dict[str, float]) -> dict[str, Any]:
    """Every stage, the adherence samples (untrained, trained, cascade) and the upscaler's held-out PSNR."""
    from latentforge.demo.untrained import write_untrained_export

    autoencoder = run_stages(config, paths, clip_weights, timings)
    export = find_export(paths)
    untrained = write_untrained_export(export, paths.checkpoints / "untrained" / "export", config.unet_preset,
                                       config.seed)
    models = {"untrained": (untrained, None), "trained": (export, None)}
    if config.upscale_to:
        models["cascade"] = (export, paths.upscaler_export)
    adherence = sample_and_score(config, paths, pipeline, models, timings)
    train_run = training_run_id(export)
    if train_run:
        chart_in_training_run(train_run, export, adherence, config, paths)
    return {"training_run_id": train_run, "autoencoder": autoencoder, "export": str(export),
            "diffusers": str(paths.diffusers) if (paths.diffusers / "model_index.json").is_file() else None,
            "untrained_export": str(untrained), "adherence": {k: vars(v) for k, v in adherence.items()},
            "upscaler": measure_sr_fidelity(config, paths, timings) if config.upscale_to else None}


def run(config: DemoConfig) -> DemoResult:
    from latentforge import tracking
    from latentforge.demo.commands import latent_dir
    from latentforge.demo.scenes import eval_prompts
    from latentforge.manifest import read_manifest
    from pipelines.runtime import init_ray

    started = time.monotonic()
    paths = demo_paths(config)
    timings: dict[str, float] = {}
    scenes = prepare_data(config, paths)
    clip_weights = text_encoder_weights(config, paths)
    paths.prompts.write_text("\n".join(eval_prompts(config.prompts)) + "\n")
    timings["data"] = time.monotonic() - started
    os.environ.setdefault(tracking.EXPERIMENT_ENV, config.experiment)

    with contextlib.ExitStack() as stack:
        broken = serve_url_lists(stack, config, paths, scenes)
        uri = tracking.tracking_uri() if config.mlflow else None  # tracking_uri() may create ./mlruns
        pipeline = stack.enter_context(tracking.PipelineRun("demo", tags={"latentforge.demo.rows": str(config.rows)},
                                                            enabled=config.mlflow))
        pipeline.stage_run.log_params(config_to_dict(config))
        # One embedded Ray for every stage, started after the pipeline run id is in the
        # environment so Ray workers (the training loop) inherit it.
        where = init_ray(num_cpus=config.num_cpus, trains=True)  # the demo trains too
        print(f"demo: stages run on {where}; MLflow: {uri or 'off (--no-mlflow)'}", flush=True)
        stages = run_pipeline(config, paths, pipeline, clip_weights, timings)
        result = {"pipeline_run_id": pipeline.run_id, "experiment_id": _experiment_id(pipeline), "tracking_uri": uri,
                  "broken_urls": broken, "ingested": read_manifest(str(paths.shards)).total_samples,
                  "latents": read_manifest(str(latent_dir(config, paths, config.resolution))).total_samples,
                  **stages, "timings": timings, "seconds": time.monotonic() - started}
        pipeline.stage_run.log_metrics({"demo_seconds": result["seconds"]})
    paths.summary.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return DemoResult(result, "\n" + summary_text(config, paths, result))


def _experiment_id(pipeline: Any) -> str | None:
    run = pipeline.stage_run
    if not run.active:
        return None
    try:
        return run.client.get_run(run.run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - only used for the printed URL
        return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = parse_config(DemoConfig, argv, preset_dir=_bootstrap.PRESETS / "demo")
        config.check_required()  # not in validate(): --print-config (in parse_config) shows an incomplete config
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    # The jobs' one exit-code contract: 0, 1 (a stage or the set-up failed), 2, 128+signal; a stage
    # stopped by SIGINT/SIGTERM stops the demo with the same code (run_stage).
    return _bootstrap.run_job("demo", lambda: run(config), usage_errors=(ConfigError,),
                              interrupted="interrupted; the next `make demo` starts afresh")


if __name__ == "__main__":
    sys.exit(main())
