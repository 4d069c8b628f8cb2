"""Image autoencoders behind one interface: encode pixels in [-1, 1] to scaled latents and back.

Three types, all loaded with their library's own loader:

- ``autoencoder_kl``   diffusers ``AutoencoderKL.from_pretrained`` (SD 1.x/2.x/XL/3-style VAEs),
  a local directory or a hub id; a hub id may carry a subfolder as a third path part
  (``stabilityai/stable-diffusion-2-1-base/vae``).
- ``autoencoder_tiny`` diffusers ``AutoencoderTiny.from_pretrained`` (TAESD-style), deterministic.
- ``patchify``         weight-free ``pixel_unshuffle`` by ``patch_size`` (the demo's VAE, since no
  pretrained VAE can be downloaded everywhere): ``latent_channels = 3 * patch_size**2``.

The model's own ``scaling_factor`` and ``shift_factor`` (None -> 0) are applied exactly once,
in ``encode``/``encode_posterior``'s callers: ``z = (raw - shift) * scale``; ``decode`` inverts it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F

from latentforge.config import ConfigError

VAE_TYPES = ("autoencoder_kl", "autoencoder_tiny", "patchify")


class ModelNotFoundError(ConfigError, FileNotFoundError):
    """A local model file or directory named by the config is not there: a usage error (exit 2)."""


def require_local_model(path: str, what: str) -> None:
    """One clear line when a local model path is missing where the job runs.

    The usual cause: `ray job submit --working-dir .` runs the job from Ray's copy of the
    working dir, which holds neither the caller's other directories nor gitignored files.
    """
    if not os.path.exists(path):
        raise ModelNotFoundError(
            f"{what} not found: {path} (the job runs in {os.getcwd()}; a job submitted with --working-dir "
            "gets a copy of it without gitignored files such as demo_output/: give an absolute path or a URI)")


def _is_local_path(model_id: str) -> bool:
    # Hub ids look like org/repo[/subfolder]; a local path is absolute, ./ or ../ relative, or ~.
    return os.path.isabs(model_id) or model_id.startswith((".", "~"))
VaeType = Literal["autoencoder_kl", "autoencoder_tiny", "patchify"]


@dataclass(frozen=True)
class VaeSpec:
    """Which autoencoder: its type, where its weights are (dir or hub id) and the patch size (patchify)."""

    type: str
    id: str = ""
    patch_size: int = 2

    def __post_init__(self) -> None:
        if self.type not in VAE_TYPES:
            raise ValueError(f"unknown VAE type {self.type!r}; expected one of {list(VAE_TYPES)}")
        if self.type != "patchify" and not self.id:
            raise ValueError(f"VAE type {self.type!r} needs an id (a local directory or a hub id)")
        if self.patch_size < 1:
            raise ValueError("patch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_hub_id(model_id: str) -> tuple[str, str | None]:
    """``org/repo/sub/folder`` -> (``org/repo``, ``sub/folder``); local paths and 2-part ids unchanged."""
    if os.path.exists(model_id) or model_id.count("/") < 2 or "://" in model_id:
        return model_id, None
    parts = model_id.split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


class LatentVAE:
    """A loaded autoencoder with the interface every stage uses.

    Attributes: ``spec``, ``scaling_factor``, ``shift_factor``, ``latent_channels``, ``downsample``,
    ``device``, ``dtype``, ``model`` (the diffusers module, None for patchify).
    """

    def __init__(self, spec: VaeSpec, model: Any, scaling_factor: float, shift_factor: float,
                 latent_channels: int, downsample: int, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.model = model
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.latent_channels = int(latent_channels)
        self.downsample = int(downsample)
        self.device = device
        self.dtype = dtype

    # -- encoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (unscaled) posterior mean and std for pixels (B, 3, H, W) in [-1, 1].

        Deterministic encoders (tiny, patchify) return std = 0.
        """
        x = pixels.to(self.device, self.dtype)
        if self.spec.type == "patchify":
            mean = F.pixel_unshuffle(x, self.spec.patch_size)
            return mean, torch.zeros_like(mean)
        if self.spec.type == "autoencoder_tiny":
            mean = self.model.encode(x).latents
            return mean, torch.zeros_like(mean)
        dist = self.model.encode(x).latent_dist
        return dist.mean, dist.std

    def scale(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the scaled latents training uses: (raw - shift) * scale."""
        return (raw - self.shift_factor) * self.scaling_factor

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.scaling_factor + self.shift_factor

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, mode: str = "mean",
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents (B, C, h, w); ``mode="sample"`` draws mean + std * eps from ``generator``."""
        mean, std = self.encode_posterior(pixels)
        if mode == "mean":
            raw = mean
        elif mode == "sample":
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32,
                              device=generator.device if generator is not None else "cpu")
            raw = mean + std * eps.to(mean.device, mean.dtype)
        else:
            raise ValueError(f"unknown encode mode {mode!r}; expected 'mean' or 'sample'")
        return self.scale(raw)

    # -- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> pixels (B, 3, H, W) in [-1, 1]."""
        raw = self.unscale(latents.to(self.device, self.dtype))
        if self.spec.type == "patchify":
            return F.pixel_shuffle(raw, self.spec.patch_size).clamp(-1, 1)
        return self.model.decode(raw).sample.clamp(-1, 1)

    def describe(self) -> dict[str, Any]:
        """The manifest's ``models.vae`` record."""
        return {
            "type": self.spec.type,
            "id": self.spec.id,
            "patch_size": self.spec.patch_size,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }


def _from_pretrained(cls: Any, model_id: str, dtype: torch.dtype) -> Any:
    if _is_local_path(model_id):
        require_local_model(os.path.expanduser(model_id), "VAE directory")
    repo, subfolder = split_hub_id(model_id)
    # safetensors only: a hub repo or directory with nothing but pickled .bin weights is refused.
    kwargs: dict[str, Any] = {"torch_dtype": dtype, "use_safetensors": True}
    if subfolder:
        kwargs["subfolder"] = subfolder
    return cls.from_pretrained(repo, **kwargs)


def load_vae(spec: VaeSpec, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LatentVAE:
    """Load the autoencoder ``spec`` names, in eval mode on ``device`` in ``dtype``."""
    device = torch.device(device)
    if spec.type == "patchify":
        return LatentVAE(spec, None, 1.0, 0.0, 3 * spec.patch_size ** 2, spec.patch_size, device, dtype)
    if spec.type == "autoencoder_kl":
        from diffusers import AutoencoderKL

        model = _from_pretrained(AutoencoderKL, spec.id, dtype)
        downsample = 2 ** (len(model.config.block_out_channels) - 1)
    else:
        from diffusers import AutoencoderTiny

        model = _from_pretrained(AutoencoderTiny, spec.id, dtype)
        downsample = 2 ** (len(model.config.encoder_block_out_channels) - 1)
    model = model.to(device).eval().requires_grad_(False)
    config = model.config
    scaling = getattr(config, "scaling_factor", None)
    shift = getattr(config, "shift_factor", None)
    return LatentVAE(spec, model, 1.0 if scaling is None else scaling, 0.0 if shift is None else shift,
                     config.latent_channels, downsample, device, dtype)


def spec_from_record(record: Mapping[str, Any]) -> VaeSpec:
    return VaeSpec(type=record["type"], id=record.get("id", "") or "", patch_size=int(record.get("patch_size", 2)))


def load_vae_from_manifest(manifest: Any, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32) -> LatentVAE:
    """Load the VAE a precompute manifest (``Manifest`` or its dict) recorded in ``models.vae``.

    Refuses a model whose scaling/shift factor differs from the recorded one: latents stored
    with one factor and decoded with another would be silently wrong.
    """
    models = manifest["models"] if isinstance(manifest, Mapping) else manifest.models
    record = models["vae"]
    vae = load_vae(spec_from_record(record), device=device, dtype=dtype)
    for key in ("scaling_factor", "shift_factor"):
        if key in record and abs(float(record[key]) - getattr(vae, key)) > 1e-9:
            raise ValueError(f"VAE {record.get('id')!r}: {key} {getattr(vae, key)} differs from the manifest's "
                             f"{record[key]}; the weights changed since the latents were made")
    return vae


def weight_files(model_id: str) -> dict[str, str]:
    """sha256 of the weight/config files of a local model directory (empty for hub ids not cached)."""
    from latentforge import storage

    repo, subfolder = split_hub_id(model_id)
    path = Path(repo) / (subfolder or "")
    if not path.is_dir():
        return _hub_cached_files(repo, subfolder)
    out: dict[str, str] = {}
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in (".json", ".safetensors", ".bin"):
            out[file.name] = storage.sha256_file(str(file))
    return out


def _hub_cached_files(repo: str, subfolder: str | None) -> dict[str, str]:
    try:
        from huggingface_hub import try_to_load_from_cache

        from latentforge import storage
    except ImportError:  # pragma: no cover
        return {}
    out: dict[str, str] = {}
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        filename = f"{subfolder}/{name}" if subfolder else name
        try:
            found = try_to_load_from_cache(repo, filename)
        except Exception:  # noqa: BLE001 - lineage only; a bad cache must not stop a load
            found = None
        if isinstance(found, str):
            out[name] = storage.sha256_file(found)
    return out
