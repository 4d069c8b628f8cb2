"""A train export as a diffusers ``StableDiffusionPipeline`` folder.

    model_index.json   unet/  vae/  text_encoder/  tokenizer/  scheduler/   (``save_pretrained``)
    manifest.json      Manifest(stage="export"): source export digest, run id, latents digest; written last

``StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)`` loads it with no custom
code. The scheduler is the training noise schedule as DDIM (or DPM-Solver++), configured the way
``latentforge.diffusion.schedulers.make_scheduler`` samples, so both worlds run the same steps.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from latentforge import storage
from latentforge.conversion.target import (TEXT_STATES_KEY, ExportRefused, Source, atomic_dir, check_out,
                                        check_text_states, text_state_convention)
from latentforge.manifest import MANIFEST_NAME, Manifest, read_manifest, write_manifest

PIPELINE_SAMPLERS = ("ddim", "dpmsolver++")
DIFFUSERS_VAE_TYPES = ("autoencoder_kl", "autoencoder_tiny")


def check_vae(data_manifest: Manifest) -> None:
    """Refuse a VAE the pipeline cannot hold or would decode differently."""
    record = data_manifest.models.get("vae") or {}
    kind = record.get("type")
    if kind not in DIFFUSERS_VAE_TYPES:
        raise ExportRefused(f"diffusers export refused: VAE type {kind!r} is not a diffusers class "
                            f"(need one of {list(DIFFUSERS_VAE_TYPES)}); fix: precompute with a diffusers VAE")
    if float(record.get("shift_factor") or 0.0) != 0.0:
        raise ExportRefused(f"diffusers export refused: VAE shift_factor {record['shift_factor']} is ignored by "
                            "StableDiffusionPipeline; fix: precompute with a VAE without a shift factor")
    local = record.get("id", "")
    if (os.path.isabs(local) or local.startswith(".")) and not os.path.isdir(local):
        raise ExportRefused(f"diffusers export refused: VAE weights {local} are missing; fix: restore them")


def check_text_encoder(data_manifest: Manifest) -> None:
    weights = (data_manifest.models.get("text_encoder") or {}).get("weights")
    if weights and os.path.sep in weights and not os.path.exists(weights):
        raise ExportRefused(f"export refused: text encoder weights {weights} are missing; fix: restore them")


def check_diffusers(data_manifest: Manifest) -> None:
    """Every check a diffusers folder needs, before anything is written (or trained)."""
    check_vae(data_manifest)
    check_text_encoder(data_manifest)
    check_text_states(data_manifest, "diffusers")


def build_pipeline(source: Source, sampler: str = "ddim", encoder: Any = None) -> Any:
    """The in-memory ``StableDiffusionPipeline`` (float32, CPU) for ``source`` (``encoder``: its loaded
    ``TextEncoder``, loaded from the data manifest when None)."""
    from diffusers import StableDiffusionPipeline

    from latentforge.models.vae import load_vae_from_manifest

    check_diffusers(source.data_manifest)
    parts = pipeline_parts(source, sampler, encoder)
    pipe = StableDiffusionPipeline(vae=load_vae_from_manifest(source.data_manifest).model, **parts,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_parts(source: Source, sampler: str, encoder: Any = None,
                   scheduler_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What every exported pipeline holds beside its VAE: unet, text_encoder, tokenizer, scheduler
    (``scheduler_config``, default the training noise schedule, as ``sampler``)."""
    from latentforge.conversion.clip_convert import to_clip_text_model
    from latentforge.diffusion.schedulers import canonical_sampler, make_scheduler
    from latentforge.models.text_encoder import load_text_encoder_from_manifest

    if canonical_sampler(sampler) not in PIPELINE_SAMPLERS:
        raise ExportRefused(f"default sampler {sampler!r}: expected one of {list(PIPELINE_SAMPLERS)}")
    encoder = encoder or load_text_encoder_from_manifest(source.data_manifest)
    return {"unet": source.model.unet, "text_encoder": to_clip_text_model(encoder),
            "tokenizer": clip_tokenizer(encoder),
            "scheduler": make_scheduler(sampler, scheduler_config or source.model.scheduler_config)}


def clip_tokenizer(encoder: Any) -> Any:
    """CLIPTokenizer from files written out of open_clip's vocabulary (the only way transformers builds one)."""
    import tempfile

    from transformers import CLIPTokenizer

    from latentforge.conversion.clip_convert import write_tokenizer_files

    with tempfile.TemporaryDirectory(prefix="lf-tokenizer-") as tmp:
        write_tokenizer_files(encoder, tmp)
        return CLIPTokenizer.from_pretrained(tmp)


def export_manifest(source: Source, fmt: str, **extra: Any) -> Manifest:
    """The manifest every output records: which export, run and latents it was made from."""
    model = source.model
    return Manifest(
        stage="export", config={"format": fmt, **extra},
        inputs=[{"uri": storage.join(model.export_dir, MANIFEST_NAME), "sha256": source.digest, "kind": "export"}],
        models=dict(source.data_manifest.models),
        extra={"mlflow_run_id": model.mlflow_run_id, "step": model.step, "data_sha256": source.data_digest,
               "prediction_type": source.prediction_type, "resolution": source.resolution,
               TEXT_STATES_KEY: text_state_convention(source.data_manifest)})


def folder_source_digest(folder: str) -> str | None:
    """The source digest an existing diffusers export folder records."""
    return read_manifest(folder, stage="export").inputs[0]["sha256"]


def write_diffusers_folder(source: Source, out: str, sampler: str = "ddim") -> Path:
    """Write ``out`` atomically (temp folder, manifest last, rename); returns its path."""
    from latentforge.models.text_encoder import load_text_encoder_from_manifest

    check_out(out, source.digest, folder_source_digest)
    check_diffusers(source.data_manifest)
    encoder = load_text_encoder_from_manifest(source.data_manifest)
    pipe = build_pipeline(source, sampler, encoder)
    return save_pipeline_folder(pipe, encoder, out, export_manifest(source, "diffusers", sampler=sampler))


def save_pipeline_folder(pipe: Any, encoder: Any, out: str, manifest: Manifest) -> Path:
    """``pipe.save_pretrained`` into ``out`` atomically, open_clip's tokenizer files, ``manifest`` last."""
    from latentforge.conversion.clip_convert import write_tokenizer_files

    with atomic_dir(out) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        # vocab.json/merges.txt instead of the saved tokenizer.json: tokenizers' vocabulary drops the
        # pad alias of id 0 (clip_convert.PAD_TOKEN), so a reloaded tokenizer.json would pad with id 49408.
        shutil.rmtree(tmp / "tokenizer")
        write_tokenizer_files(encoder, str(tmp / "tokenizer"))
        write_manifest(str(tmp), manifest)
    return Path(out)
