"""An upscaler export as a diffusers ``StableDiffusionUpscalePipeline`` folder.

    model_index.json   unet/ vae/ text_encoder/ tokenizer/ scheduler/ low_res_scheduler/, max_noise_level
    manifest.json      as the base folder's, plus extra.upscaler and both VAE scaling factors; written last

``StableDiffusionUpscalePipeline.from_pretrained(folder, local_files_only=True)`` loads it with no
custom code. The pipeline feeds the low-res image, at its own size, beside latents of that same size,
the noise level as the UNet's class label, and decodes the sampled latents as they are; so an
upscaler exports only when its shape is that one: an AutoencoderKL, low-res size == latent size
(``--lowres-factor`` == the VAE's downsample, a multiple of it), a UNet with latent channels + 3
inputs and ``num_class_embeds`` for the levels, no residual over the bicubic upsample's latent (an
export recording ``residual_scale``), and text states the pipeline's ``CLIPTextModel`` reproduces.
Its VAE, text encoder and scheduler config are those of the `Sampler` our `Upscaler` runs.

The VAE scaling factor: the pipeline's constructor resets any ``vae.config.scaling_factor`` other
than 0.08333 (SD x4's) to 0.08333 (a deprecation path for SD x4 checkpoints), so ours (``s``) would be
silently replaced. The folder's ``vae/`` is therefore the same autoencoder with its latent space
rescaled by ``r = s / 0.08333``: ``quant_conv`` gives means times ``r`` (log-variances + 2 ln r) and
``post_quant_conv`` divides by ``r`` again, so ``decode(latents / 0.08333)`` is our ``decode(latents / s)``
and encode -> decode is unchanged. ``manifest.json`` records both factors.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch

from latentforge.conversion.diffusers_folder import (check_text_encoder, check_vae, export_manifest,
                                                 folder_source_digest, pipeline_parts, save_pipeline_folder)
from latentforge.conversion.target import ExportRefused, Source, check_out, check_text_states
from latentforge.manifest import Manifest
from latentforge.upscaler.conditioning import IMAGE_CHANNELS

UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
PIPELINE_SCALING_FACTOR = 0.08333
"""The only ``vae.config.scaling_factor`` StableDiffusionUpscalePipeline keeps."""
REFUSED = f"diffusers export refused: {UPSCALE_PIPELINE}"


def check_upscale(data_manifest: Manifest, record: dict[str, Any]) -> None:
    """Refuse an upscaler the pipeline cannot run as trained (checked from the manifests alone)."""
    vae = data_manifest.models.get("vae") or {}
    if vae.get("type") != "autoencoder_kl":
        raise ExportRefused(f"{REFUSED} decodes with an AutoencoderKL but this upscaler's VAE type is "
                            f"{vae.get('type')!r}; fix: precompute the upscaler's data with an AutoencoderKL")
    check_vae(data_manifest)
    if record.get("residual_scale"):
        raise ExportRefused(f"{REFUSED} decodes the sampled latents as they are, but this upscaler samples the "
                            f"residual over the latent of the bicubic upsample (residual_scale "
                            f"{record['residual_scale']}), which the pipeline cannot add back; fix: upsample with "
                            "jobs/generate.py --upscaler, or train with --no-residual")
    check_sizes(record, int(vae["downsample"]))
    check_text_encoder(data_manifest)
    check_text_states(data_manifest, "diffusers")


def check_sizes(record: dict[str, Any], down: int) -> None:
    """The low-res image goes in at its own size, next to latents of that size (``down``: the VAE's)."""
    lowres, latent = int(record["lowres_size"]), int(record["latent_size"])
    if lowres != latent:
        raise ExportRefused(
            f"{REFUSED} feeds the low-res image at its own size beside latents of that size, but this upscaler takes "
            f"{lowres}x{lowres} px low-res images beside {latent}x{latent} latents (lowres factor "
            f"{record['lowres_factor']} != the VAE's downsample {down}); fix: train with --lowres-factor {down}")
    if lowres % down:
        raise ExportRefused(f"{REFUSED} rounds the low-res size down to a multiple of the VAE's downsample {down}, "
                            f"and this upscaler's {lowres} px is not one; fix: a resolution divisible by {down * down}")


def check_unet(unet_config: Any, record: dict[str, Any]) -> None:
    """The pipeline concatenates latents + 3 image channels and passes the level as ``class_labels``."""
    channels, top = int(record["latent_channels"]) + IMAGE_CHANNELS, int(record["noise_level_range"][1])
    if unet_config.in_channels != channels:
        raise ExportRefused(f"{REFUSED} feeds the UNet {channels} channels (latents + image) but it takes "
                            f"{unet_config.in_channels}; fix: retrain with jobs/train.py --stage upscaler")
    if unet_config.class_embed_type is not None or (unet_config.num_class_embeds or 0) <= top:
        raise ExportRefused(f"{REFUSED} passes the noise level (up to {top}) as class label but the UNet has "
                            f"num_class_embeds {unet_config.num_class_embeds}, class_embed_type "
                            f"{unet_config.class_embed_type}; fix: retrain with jobs/train.py --stage upscaler")


def pipeline_vae(model: Any, scaling_factor: float) -> Any:
    """A copy of the AutoencoderKL ``model`` whose latents are ours times ``scaling_factor / 0.08333``
    (the module docstring says why), configured with the pipeline's scaling factor."""
    ratio = scaling_factor / PIPELINE_SCALING_FACTOR
    if ratio == 1.0:
        return model
    if model.quant_conv is None or model.post_quant_conv is None:
        raise ExportRefused(f"{REFUSED} forces vae scaling_factor {PIPELINE_SCALING_FACTOR} and this VAE "
                            f"({scaling_factor}) has no quant_conv / post_quant_conv to absorb the difference")
    vae = copy.deepcopy(model)
    channels = int(vae.config.latent_channels)
    with torch.no_grad():
        vae.quant_conv.weight[:channels] *= ratio  # (2C, 2C, 1, 1): rows [0, C) make the means
        vae.quant_conv.bias[:channels] *= ratio
        vae.quant_conv.bias[channels:] += 2 * math.log(ratio)  # log-variances: std scales with the means
        vae.post_quant_conv.weight /= ratio  # (C, C, 1, 1): back to the latents the decoder was trained on
    vae.register_to_config(scaling_factor=PIPELINE_SCALING_FACTOR)
    return vae


def our_sampler(source: Source) -> Any:
    """The `Sampler` jobs/generate.py --upscaler runs on ``source``: the folder takes its VAE, text
    encoder and scheduler config (with whatever step spacing sampling sets), so both worlds step alike."""
    from latentforge.upscaler.sampling import Upscaler

    return Upscaler(source.model).sampler


def build_upscale_pipeline(source: Source, sampler: str = "ddim", ours: Any = None) -> Any:
    """The in-memory ``StableDiffusionUpscalePipeline`` (float32, CPU) for the upscaler ``source``
    (``ours``: its `our_sampler`, made when None)."""
    from diffusers import StableDiffusionUpscalePipeline

    from latentforge.upscaler.conditioning import make_low_res_scheduler

    record = source.upscaler or {}
    check_upscale(source.data_manifest, record)
    check_unet(source.model.unet.config, record)
    ours = ours or our_sampler(source)
    pipe = StableDiffusionUpscalePipeline(
        vae=pipeline_vae(ours.vae.model, ours.vae.scaling_factor),
        **pipeline_parts(source, sampler, ours.text_encoder, ours.scheduler_config),
        low_res_scheduler=make_low_res_scheduler(record.get("low_res_scheduler")),
        max_noise_level=int(record["noise_level_range"][1]))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_upscale_folder(source: Source, out: str, sampler: str = "ddim") -> Path:
    """Write ``out`` atomically (temp folder, manifest last, rename); returns its path."""
    check_out(out, source.digest, folder_source_digest)
    check_upscale(source.data_manifest, source.upscaler or {})
    ours = our_sampler(source)
    pipe = build_upscale_pipeline(source, sampler, ours)
    manifest = export_manifest(source, "diffusers", sampler=sampler, pipeline=UPSCALE_PIPELINE)
    manifest.extra.update(upscaler=source.upscaler, pipeline_vae_scaling_factor=PIPELINE_SCALING_FACTOR,
                          vae_scaling_factor=float(source.data_manifest.models["vae"]["scaling_factor"]))
    return save_pipeline_folder(pipe, ours.text_encoder, out, manifest)
