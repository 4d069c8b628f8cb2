"""Where `jobs/demo.py` puts everything (`DemoPaths`) and the summary it prints at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentforge.demo.adherence import format_share
from latentforge.demo.config import DemoConfig
from latentforge.reporting import summary_table

AUTOENCODER_RUN = "demo-autoencoder"
TRAIN_RUN = "demo-train"
UPSCALER_RUN = "demo-upscaler"


class DemoPaths:
    """The demo's directory layout under `out` (absolute, so printed paths work from anywhere)."""

    def __init__(self, out: str) -> None:
        root = Path(out).resolve()
        self.root = root
        self.scenes = root / "scenes"
        self.urls = root / "urls.parquet"
        self.models = root / "models"
        self.shards = root / "shards"
        # Outside the per-run outputs: a finished autoencoder of the same scenes is reused by the next run.
        self.autoencoder = root / "autoencoder"
        self.autoencoder_export = self.autoencoder / AUTOENCODER_RUN / "export"
        self.latents = root / "latents"
        self.checkpoints = root / "checkpoints"
        self.export = self.checkpoints / TRAIN_RUN / "export"
        self.diffusers = self.checkpoints / TRAIN_RUN / "diffusers"  # training's --export-formats diffusers
        self.samples = root / "samples"
        # Held-out scenes (their own seed), ingested on their own: the upscaler's PSNR against bicubic.
        self.heldout_scenes = root / "heldout" / "scenes"
        self.heldout_urls = root / "heldout" / "urls.parquet"
        self.heldout_shards = root / "heldout" / "shards"
        self.upscaler_export = self.checkpoints / UPSCALER_RUN / "export"
        self.sr_fidelity = root / "sr_fidelity"
        self.prompts = root / "adherence_prompts.txt"
        self.summary = root / "summary.json"


def diffusers_snippet(folder: str) -> str:
    """The one line that loads the demo's model in diffusers, no network and no LatentForge code."""
    return (f"from diffusers import StableDiffusionPipeline; "
            f"pipe = StableDiffusionPipeline.from_pretrained({str(folder)!r}, local_files_only=True)")


def _mlflow_rows(config: DemoConfig, result: dict[str, Any]) -> list[tuple[str, str]]:
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
    return [("MLflow", open_cmd), ("MLflow pipeline run", run_url), ("MLflow training run", train_url)]


def _autoencoder_row(config: DemoConfig, result: dict[str, Any]) -> tuple[str, str]:
    autoencoder = result.get("autoencoder")
    if autoencoder is None:
        return ("autoencoder", config.vae or "patchify (weight-free pixel_unshuffle)")
    how = "reused from an earlier run" if autoencoder["reused"] else f"trained {autoencoder['step']} steps"
    return ("autoencoder", f"{autoencoder['export']}  (held-out PSNR {autoencoder['psnr']:.1f} dB, "
                           f"SSIM {autoencoder['ssim']:.3f}; {how})")


def _adherence_rows(config: DemoConfig, result: dict[str, Any]) -> list[tuple[str, str]]:
    """untrained -> trained base (resolution) [-> cascade (upscale_to), the final resolution's number], each
    share with its 95 % Wilson interval."""
    adherence = result["adherence"]
    stages = [("untrained", "untrained"), ("trained", f"trained {config.resolution} px")]
    if "cascade" in adherence:
        stages.append(("cascade", f"cascade {config.upscale_to} px"))

    def row(what: str) -> str:
        return " -> ".join(f"{format_share(adherence[name][what], adherence[name]['n'])} {label}"
                           for name, label in stages)

    chance = f" (chance {adherence['trained']['chance_colour']:.0%})"
    return [("adherence: colour", row("colour") + chance), ("adherence: position", row("position")),
            ("adherence: both", row("both"))]


def _upscaler_rows(config: DemoConfig, result: dict[str, Any]) -> list[tuple[str, str]]:
    upscaler = result.get("upscaler")
    if not upscaler:
        return []
    m = upscaler["metrics"]
    return [("upscaler (super-resolution)", f"{upscaler['export']}  ({config.resolution} -> {config.upscale_to} px)"),
            ("upscaler vs bicubic", f"PSNR {m['sr_psnr']:.2f} dB vs {m['bicubic_psnr']:.2f} dB: "
                                    f"{m['sr_psnr_gain_db']:+.2f} dB gain; SSIM {m['sr_ssim']:.3f} vs "
                                    f"{m['bicubic_ssim']:.3f} on {int(m['sr_num_pairs'])} held-out scenes "
                                    f"({upscaler['out']})")]


def summary_text(config: DemoConfig, paths: DemoPaths, result: dict[str, Any]) -> str:
    """The table of where everything is and what was measured, the verdict, and the diffusers snippet."""
    diffusers = result.get("diffusers")
    rows = [
        ("scenes + URL list", f"{paths.scenes}  ({config.rows} rows, {result['broken_urls']} broken URLs)"),
        ("shards (ingest)", f"{paths.shards}  ({result['ingested']} images)"),
        _autoencoder_row(config, result),
        ("latents (precompute)", f"{paths.latents}  ({result['latents']} samples, text states {config.text_states})"),
        ("checkpoint + export", str(result["export"])),
        ("diffusers pipeline", diffusers or "not exported (patchify VAE or real_tokens text states)"),
        *_upscaler_rows(config, result),
        ("samples (trained)", f"{paths.samples / 'trained'}  (grid.png, index.jsonl)"),
        *([("samples (cascade)", f"{paths.samples / 'cascade'}")] if result.get("upscaler") else []),
        ("samples (untrained)", f"{paths.samples / 'untrained'}"),
        *_mlflow_rows(config, result),
        *_adherence_rows(config, result),
        ("wall time", f"{result['seconds']:.0f} s  ({', '.join(f'{k} {v:.0f} s' for k, v in result['timings'].items())})"),
    ]
    before, after = result["adherence"]["untrained"], result["adherence"]["trained"]
    verdict = ("The trained model follows its prompts measurably better than the untrained one."
               if after["colour"] > before["colour"] else
               "The trained model did NOT beat the untrained one on colour adherence; train longer (--steps).")
    lines = [summary_table("LatentForge demo", rows), verdict,
             f"Adherence: share of {after['n']} generated images whose requested colour dominates (and sits "
             f"where the caption says), measured with latentforge.demo.adherence; [low, high]: its 95 % "
             f"Wilson score interval."]
    if result.get("upscaler"):
        gain = result["upscaler"]["metrics"]["sr_psnr_gain_db"]
        lines.append(f"The upscaler {'beats' if gain > 0 else 'does NOT beat'} bicubic upsampling of the same "
                     f"low-res input on held-out scenes ({gain:+.2f} dB PSNR).")
    if diffusers:
        lines += ["Load the trained model in diffusers (no network, no LatentForge code):",
                  f"  {diffusers_snippet(diffusers)}"]
    return "\n".join(lines)
