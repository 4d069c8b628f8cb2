"""`make demo`: the whole LatentForge pipeline on generated scenes, on an embedded local Ray.

    python jobs/demo.py                       # jobs/configs/demo/default.yaml
    python jobs/demo.py --preset smoke        # a tiny run (tests)
    python jobs/demo.py --vae-type autoencoder_kl --vae stabilityai/sd-vae-ft-mse \
        --text-encoder ViT-B-32 --text-encoder-weights laion2b_s34b_b79k --resolution 64   # real models

1. builds captioned scenes ("a red circle on the left", ...) and serves them from a loopback
   HTTP server, with a few broken URLs mixed in;
2. runs ingest -> precompute -> train -> generate through the same `main(argv)` entry points a
   user submits with `ray job submit`, all on one embedded Ray, all runs grouped under one MLflow
   pipeline run (LATENTFORGE_PIPELINE_RUN_ID);
3. measures prompt adherence (does the requested colour dominate, and sit where the caption
   says?) of the trained model against the same architecture at initialisation (step 0), and
   prints where everything is.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

try:
    import _bootstrap  # noqa: F401  (python jobs/demo.py)
except ImportError:  # imported as jobs.demo (tests)
    from jobs import _bootstrap  # noqa: F401

import pipelines  # noqa: F401  (platform/ on sys.path when latentforge is not installed)
from latentforge.config import ConfigError, config_to_dict, parse_config
from latentforge.demo.config import DemoConfig

JOBS_DIR = Path(__file__).resolve().parent
log = logging.getLogger("demo")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int) -> None:
        super().__init__(f"{stage} exited with code {code}")
        self.stage, self.code = stage, code


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
    print(f"\n=== {name}: python jobs/{name}.py {' '.join(argv)}", flush=True)
    started = time.monotonic()
    try:
        code = load_job(name)(argv)
    except SystemExit as exc:  # a job's argparse error (2) or an explicit sys.exit
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    timings[name] = timings.get(name, 0.0) + time.monotonic() - started
    if code != 0:
        raise StageFailed(name, code)


class Paths:
    def __init__(self, out: str) -> None:
        root = Path(out).resolve()
        self.root = root
        self.scenes = root / "scenes"
        self.urls = root / "urls.parquet"
        self.models = root / "models"
        self.shards = root / "shards"
        self.latents = root / "latents"
        self.checkpoints = root / "checkpoints"
        self.samples = root / "samples"
        self.prompts = root / "adherence_prompts.txt"
        self.summary = root / "summary.json"


def prepare_data(config: DemoConfig, paths: Paths) -> list[Any]:
    from latentforge.demo.scenes import build_scene_set

    started = time.monotonic()
    scenes = build_scene_set(paths.scenes, rows=config.rows, seed=config.seed, image_size=config.image_size)
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


def stage_argv(config: DemoConfig, paths: Paths, clip_weights: str | None) -> dict[str, list[str]]:
    """The command line of every stage: exactly what a user would type (see README)."""
    from latentforge.demo.scenes import eval_prompts

    ingest = ["--input", str(paths.urls), "--output", str(paths.shards), "--url-col", "url",
              "--caption-col", "caption", "--samples-per-shard", str(config.samples_per_shard),
              "--image-size", str(config.image_size), "--resize-mode", "no", "--encode-format", "png",
              "--encode-quality", "1",
              "--retries", "0", "--timeout-s", "10", "--allow-private-network", "--no-progress",
              "--run-name", "demo-ingest"]
    vae = (["--vae-type", "patchify"] if config.vae_type == "patchify"
           else ["--vae-type", config.vae_type, "--vae", config.vae])
    precompute = ["--preset", "tiny", "--input", str(paths.shards), "--output", str(paths.latents), *vae,
                  "--text-encoder", config.text_encoder, "--text-layer", config.text_layer,
                  "--resolution", str(config.resolution), "--no-progress", "--run-name", "demo-precompute"]
    if clip_weights:
        precompute += ["--text-encoder-weights", clip_weights]
    every_pair = eval_prompts(24)  # colour i % 6, position (i // 6) % 4
    eval_set = [every_pair[i] for i in (0, 7, 14, 21, 4, 11)]  # 6 colours, every position
    train = ["--preset", "tiny", "--data", str(paths.latents), "--unet", config.unet_preset, "--steps", str(config.steps),
             "--batch-size", str(config.batch_size), "--lr", str(config.lr), "--num-workers", str(config.num_workers),
             "--storage-path", str(paths.checkpoints), "--run-name", "demo-train", "--seed", str(config.seed),
             "--checkpoint-every", str(config.checkpoint_every), "--eval-every", str(config.eval_every),
             "--eval-prompts", ",".join(eval_set), "--eval-steps", "20", "--val-samples", "64"]
    return {stage: args + tracking_flags(config)
            for stage, args in (("download_images", ingest), ("precompute_latents", precompute), ("train", train))}


def tracking_flags(config: DemoConfig) -> list[str]:
    return [] if config.mlflow else ["--no-mlflow"]


def generate_argv(config: DemoConfig, model: str, prompts: Path, out: Path, run_name: str) -> list[str]:
    return ["--model", model, "--prompts", str(prompts), "--out", str(out),
            "--sampler", config.sampler, "--steps", str(config.sample_steps), "--guidance", str(config.guidance),
            "--seed", str(config.seed), "--batch-size", "16", "--no-progress", "--run-name", run_name,
            *tracking_flags(config)]


def write_untrained_export(trained_export: Path, out: Path, preset: str, seed: int) -> Path:
    """The same architecture at initialisation (step 0), in the export layout `generate` loads.

    Scheduler and data manifest are copied from the trained export; the UNet is `build_unet`'s
    freshly initialised one, so the two models differ only by training.
    """
    import torch

    from latentforge import storage
    from latentforge.models.unet import build_unet

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for item in ("scheduler", "data_manifest.json", "manifest.json"):
        src = trained_export / item
        if src.is_dir():
            shutil.copytree(src, out / item)
        elif src.exists():
            shutil.copy2(src, out / item)
    data = json.loads((trained_export / "data_manifest.json").read_text())
    latent_channels = int(data["models"]["vae"]["latent_channels"])
    width = int(data["models"]["text_encoder"]["width"])
    torch.manual_seed(seed)
    build_unet(preset, latent_channels, width).save_pretrained(out / "unet")
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        extra = manifest.setdefault("extra", {})
        extra.update(step=0, mlflow_run_id=None, untrained=True)
        storage.atomic_write_json(str(manifest_path), manifest)
    return out


def measure_adherence(samples_dir: Path) -> Any:
    from PIL import Image

    from latentforge.demo.adherence import score_images

    rows = [json.loads(line) for line in (samples_dir / "index.jsonl").read_text().splitlines() if line.strip()]

    def pairs():
        for row in rows:
            with Image.open(samples_dir / row.get("file", f"{int(row['index']):06d}.png")) as image:
                yield image.convert("RGB"), row["prompt"]

    return score_images(pairs())


def find_export(paths: Paths, run_name: str) -> Path:
    export = paths.checkpoints / run_name / "export"
    if not (export / "unet").is_dir():
        raise FileNotFoundError(f"training finished but left no export in {export}")
    return export


def training_run_id(export: Path) -> str | None:
    try:
        return json.loads((export / "manifest.json").read_text()).get("extra", {}).get("mlflow_run_id")
    except (OSError, ValueError):
        return None


def trained_step(export: Path, default: int) -> int:
    try:
        return int(json.loads((export / "manifest.json").read_text()).get("extra", {}).get("step", default))
    except (OSError, ValueError, TypeError):
        return default


def summary_text(config: DemoConfig, paths: Paths, result: dict[str, Any]) -> str:
    from latentforge.reporting import summary_table

    before, after = result["adherence"]["untrained"], result["adherence"]["trained"]
    tracking = result["tracking_uri"]
    if tracking is None:
        open_cmd, url = "off (--no-mlflow)", "-"
    elif tracking.startswith("sqlite:///"):
        open_cmd = f"make mlflow   (or: mlflow server --host 127.0.0.1 --port {config.ui_port} " \
                   f"--backend-store-uri {tracking})"
        url = f"http://127.0.0.1:{config.ui_port}"
    else:
        open_cmd, url = "(the server you configured with MLFLOW_TRACKING_URI)", tracking
    run_url = train_url = url
    if result.get("experiment_id") and result.get("pipeline_run_id"):
        run_url = f"{url}/#/experiments/{result['experiment_id']}/runs/{result['pipeline_run_id']}"
        if result.get("training_run_id"):
            train_url = f"{url}/#/experiments/{result['experiment_id']}/runs/{result['training_run_id']}/model-metrics"
    rows = [
        ("scenes + URL list", f"{paths.scenes}  ({config.rows} rows, {result['broken_urls']} broken URLs)"),
        ("shards (ingest)", f"{paths.shards}  ({result['ingested']} images)"),
        ("latents (precompute)", f"{paths.latents}  ({result['latents']} samples)"),
        ("checkpoint + export", str(result["export"])),
        ("samples (trained)", f"{paths.samples / 'trained'}  (grid.png, index.jsonl)"),
        ("samples (untrained)", f"{paths.samples / 'untrained'}"),
        ("MLflow", open_cmd),
        ("MLflow pipeline run", run_url),
        ("MLflow training run", train_url),
        ("adherence: colour", f"{before['colour']:.0%} untrained -> {after['colour']:.0%} trained "
                              f"(chance {after['chance_colour']:.0%})"),
        ("adherence: position", f"{before['position']:.0%} untrained -> {after['position']:.0%} trained"),
        ("adherence: both", f"{before['both']:.0%} untrained -> {after['both']:.0%} trained"),
        ("wall time", f"{result['seconds']:.0f} s  ({', '.join(f'{k} {v:.0f} s' for k, v in result['timings'].items())})"),
    ]
    text = summary_table("LatentForge demo", rows)
    verdict = ("The trained model follows its prompts measurably better than the untrained one."
               if after["colour"] > before["colour"] else
               "The trained model did NOT beat the untrained one on colour adherence; train longer (--steps).")
    return (f"{text}\n{verdict}\nAdherence: share of {after['n']} generated images whose requested colour "
            f"dominates (and sits where the caption says), measured with latentforge.demo.adherence.")


def demo_paths(config: DemoConfig) -> Paths:
    """The demo's directory, emptied of earlier stage outputs when `fresh` is set."""
    paths = Paths(config.out)
    if config.fresh:
        for stale in (paths.shards, paths.latents, paths.checkpoints, paths.samples):
            shutil.rmtree(stale, ignore_errors=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    return paths


def sample_and_score(config: DemoConfig, paths: Paths, pipeline: Any, models: dict[str, Path],
                     timings: dict[str, float]) -> dict[str, Any]:
    """Generate the eval prompts with each model; log its adherence and grid to the pipeline run."""
    adherence = {}
    for name, model in models.items():
        out = paths.samples / name
        run_stage("generate", generate_argv(config, str(model), paths.prompts, out, f"demo-generate-{name}"), timings)
        adherence[name] = measure_adherence(out)
        pipeline.stage_run.log_metrics(adherence[name].as_metrics(f"adherence_{name}"))
        if (out / "grid.png").exists():
            pipeline.stage_run.log_artifact(str(out / "grid.png"), f"samples/{name}")
    return adherence


def chart_in_training_run(train_run: str, export: Path, adherence: dict[str, Any], config: DemoConfig,
                          paths: Paths) -> None:
    """The same numbers as a chart in the training run: step 0 (untrained) vs the last step."""
    from latentforge import tracking

    for name, step in (("untrained", 0), ("trained", trained_step(export, config.steps))):
        tracking.log_metrics_to_run(train_run, adherence[name].as_metrics("adherence"), step)
        grid = paths.samples / name / "grid.png"
        if grid.exists():
            tracking.log_artifact_to_run(train_run, str(grid), f"adherence/{name}")


def run(config: DemoConfig) -> dict[str, Any]:
    from latentforge import tracking
    from latentforge.demo.server import DemoImageServer, url_rows, write_url_list
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

    with DemoImageServer(paths.scenes) as server:
        rows = url_rows(server, scenes, config.broken_every)
        write_url_list(rows, paths.urls)
        broken = sum("/broken/" in r["url"] for r in rows)
        print(f"demo: serving {len(rows)} URLs ({broken} broken) from {server.base_url}", flush=True)
        uri = tracking.tracking_uri() if config.mlflow else None  # tracking_uri() may create ./mlruns
        with tracking.PipelineRun("demo", tags={"latentforge.demo.rows": str(config.rows)},
                                  enabled=config.mlflow) as pipeline:
            pipeline.stage_run.log_params(config_to_dict(config))
            # One embedded Ray for every stage, started after the pipeline run id is in the
            # environment so Ray workers (the training loop) inherit it.
            where = init_ray(num_cpus=config.num_cpus)
            print(f"demo: stages run on {where}; MLflow: {uri or 'off (--no-mlflow)'}", flush=True)
            argv = stage_argv(config, paths, clip_weights)
            for stage in ("download_images", "precompute_latents", "train"):
                run_stage(stage, argv[stage], timings)
            export = find_export(paths, "demo-train")
            untrained = write_untrained_export(export, paths.checkpoints / "untrained" / "export",
                                               config.unet_preset, config.seed)
            adherence = sample_and_score(config, paths, pipeline, {"untrained": untrained, "trained": export},
                                         timings)
            train_run = training_run_id(export)
            if train_run:
                chart_in_training_run(train_run, export, adherence, config, paths)
            result = {
                "pipeline_run_id": pipeline.run_id,
                "experiment_id": _experiment_id(pipeline),
                "training_run_id": train_run,
                "tracking_uri": uri,
                "broken_urls": broken,
                "ingested": read_manifest(str(paths.shards)).total_samples,
                "latents": read_manifest(str(paths.latents)).total_samples,
                "export": str(export),
                "untrained_export": str(untrained),
                "adherence": {k: vars(v) for k, v in adherence.items()},
                "timings": timings,
                "seconds": time.monotonic() - started,
            }
            pipeline.stage_run.log_metrics({"demo_seconds": result["seconds"]})
    paths.summary.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


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
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except ConfigError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    try:
        result = run(config)
    except StageFailed as exc:
        print(f"demo: stage {exc.stage} failed (exit {exc.code}); its message is above. "
              f"Rerun `make demo` after fixing it.", file=sys.stderr)
        return 1 if exc.code not in (130, 143) else exc.code
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - set-up failures (Ray start, disk): one clear line, exit 1
        logging.getLogger("demo").debug("failure", exc_info=True)
        print(f"demo: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("\n" + summary_text(config, Paths(config.out), result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
