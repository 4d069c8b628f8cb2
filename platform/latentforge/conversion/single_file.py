"""A train export as one ``.safetensors`` in the original LDM key layout, with ModelSpec metadata.

    model.diffusion_model.*   the UNet      (diffusers -> LDM ``openaimodel`` names)
    first_stage_model.*       the AutoencoderKL (diffusers -> LDM ``autoencoder`` names)
    cond_stage_model.model.*  the open_clip text tower as open_clip holds it (SD 2's layout), all blocks

The key mapping is the inverse of diffusers' own ``single_file_utils.convert_ldm_*_checkpoint`` and is
checked against it before anything is written: the file is refused unless diffusers' conversion gives
back every UNet and VAE tensor under its own name. Block counts come from the UNet/VAE configs, so
any depth works, not only SD's four levels.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import tempfile
from typing import Any

import torch

from latentforge.conversion.clip_convert import ConversionError
from latentforge.conversion.target import ExportRefused, Source, check_out

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
UNET_RESNET = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
               ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
VAE_ATTENTION = (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out."))
SOURCE_KEY = "latentforge.source_sha256"


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    for new, old in table:
        if rest.startswith(new):
            return old + rest[len(new):]
    return rest


def unet_key(key: str, config: Any) -> str:
    """A diffusers ``UNet2DConditionModel`` key -> its LDM name (config: the UNet's)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    per = int(config.layers_per_block) + 1  # LDM numbers resnets and the down/upsampler in one sequence
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, block, kind, j, rest = m.groups()
        index = int(block) * per + int(j) + (1 if side == "down" else 0)
        part = f"0.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"1.{rest}"
        return f"{'input' if side == 'down' else 'output'}_blocks.{index}.{part}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        has_attention = "CrossAttn" in config.up_block_types[int(m[1])]
        return f"output_blocks.{int(m[1]) * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, j, rest = m.groups()
        return f"middle_block.{2 * int(j)}.{_rename(rest, UNET_RESNET)}" if kind == "resnets" else f"middle_block.1.{rest}"
    raise ConversionError(f"UNet key {key} has no LDM name (only SD-style UNets convert)")


def vae_key(key: str, config: Any) -> str:
    """A diffusers ``AutoencoderKL`` key -> its LDM name."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    if key in top:
        return top[key]
    last = len(config.up_block_types) - 1  # LDM numbers decoder levels from the bottom
    if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key):
        part, side, block, kind, j, rest = m.groups()
        level = int(block) if side == "down" else last - int(block)
        if kind == "resnets":
            return f"{part}.{side}.{level}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{side}.{level}.{kind[:-2]}.{rest}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename(m[2], VAE_ATTENTION)}"
    raise ConversionError(f"VAE key {key} has no LDM name")


def _vae_tensor(ldm_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """LDM's VAE attention q/k/v/proj_out are 1x1 convs; diffusers' are linears."""
    if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.dim() == 2:
        return tensor[:, :, None, None]
    return tensor


def ldm_state_dict(pipe: Any, text_tower: Any) -> dict[str, torch.Tensor]:
    """The whole checkpoint: UNet + VAE from the pipeline, the open_clip tower as open_clip holds it."""
    unet_config, vae_config = pipe.unet.config, pipe.vae.config
    out = {UNET_PREFIX + unet_key(k, unet_config): v for k, v in pipe.unet.state_dict().items()}
    for key, value in pipe.vae.state_dict().items():
        name = vae_key(key, vae_config)
        out[VAE_PREFIX + name] = _vae_tensor(name, value)
    out.update({TEXT_PREFIX + k: v for k, v in text_tower.state_dict().items() if k != "attn_mask"})
    return {k: v.detach().contiguous() for k, v in out.items()}


def check_round_trip(state: dict[str, torch.Tensor], pipe: Any) -> None:
    """diffusers' own single-file conversion must give back every UNet and VAE tensor."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    for name, module, back in (("UNet", pipe.unet, convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))),
                               ("VAE", pipe.vae, convert_ldm_vae_checkpoint(state, dict(pipe.vae.config)))):
        ours = module.state_dict()
        wrong = sorted(set(ours) ^ set(back)) or [k for k in ours if not torch.equal(ours[k], back[k])]
        if wrong:
            raise ConversionError(f"{name}: diffusers' single-file conversion does not give back {wrong[:3]}")


def modelspec(source: Source, title: str) -> dict[str, str]:
    """ModelSpec 1.0 metadata (Stability AI's ``modelspec.*`` keys) plus where the model came from."""
    v_prediction = source.prediction_type == "v_prediction"
    resolution = source.resolution
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512",
        "modelspec.implementation": "https://github.com/Stability-AI/stablediffusion",
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.date": _dt.date.today().isoformat(),
        "latentforge.mlflow_run_id": str(source.model.mlflow_run_id or ""),
        "latentforge.data_sha256": str(source.data_digest or ""),
        SOURCE_KEY: source.digest,
    }


def check_single_file(data_manifest: Any) -> None:
    """Every check a single file needs: the diffusers folder's, and an AutoencoderKL."""
    from latentforge.conversion.diffusers_folder import check_diffusers

    if (data_manifest.models.get("vae") or {}).get("type") != "autoencoder_kl":
        raise ExportRefused("single-file export refused: the LDM layout holds an AutoencoderKL only; fix: use "
                            "--format diffusers, or precompute with an AutoencoderKL")
    check_diffusers(data_manifest)


def file_source_digest(path: str) -> str | None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return (handle.metadata() or {}).get(SOURCE_KEY)


def write_single_file(source: Source, out: str, title: str | None = None, dtype: str = "fp32") -> str:
    """Write ``out`` (.safetensors) atomically; the UNet/VAE/text tensors equal the diffusers folder's."""
    from safetensors.torch import save_file

    from latentforge.conversion.diffusers_folder import build_pipeline
    from latentforge.models.text_encoder import load_text_encoder_from_manifest

    if not out.endswith(".safetensors"):
        raise ExportRefused(f"--out {out}: a single-file checkpoint is a .safetensors file")
    check_single_file(source.data_manifest)
    check_out(out, source.digest, file_source_digest)
    encoder = load_text_encoder_from_manifest(source.data_manifest)
    pipe = build_pipeline(source, encoder=encoder)
    state = ldm_state_dict(pipe, encoder.tower)
    check_round_trip(state, pipe)
    if dtype == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    title = title or os.path.basename(os.path.dirname(source.model.export_dir.rstrip("/"))) or "latentforge"
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(out)}.tmp-", dir=directory)
    os.close(fd)
    try:
        save_file(state, tmp, metadata=modelspec(source, title))
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
