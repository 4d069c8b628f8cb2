"""txt2img / img2img sampling with diffusers schedulers, the export's UNet and the manifest's encoders.

The denoising loop is the one `StableDiffusionPipeline` runs (same noise draw, same order of
classifier-free-guidance halves, same scheduler calls), so with full-length text states a DDIM
sample equals the pipeline's for the same seed (tests/test_generation_pipeline_parity.py).

Text conditioning: by default the UNet sees what training saw — the real tokens only (start,
text, end-of-text; `lengths` from the text encoder) padded to the batch's longest with an
`encoder_attention_mask` (`text_states="real_tokens"`). `text_states="full"` feeds all
`context_length` states like Stable Diffusion does. Prompts longer than the context are
truncated by the tokenizer; this is reported per image (`truncated`, `text_tokens`).

Latents are the scaled latents the VAE wrapper (`latentforge.models.vae.LatentVAE`) works with:
`decode` takes them as they are, `encode` returns them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from latentforge.conditioning.embedding import class_labels
from latentforge.conditioning.spec import ConditionSet
from latentforge.diffusion.schedulers import canonical_sampler, make_scheduler
from latentforge.pixels import to_pixels

TEXT_STATE_MODES = ("real_tokens", "full")


@dataclass
class TextCondition:
    """Encoded prompts as the UNet takes them."""

    states: torch.Tensor
    """(B, L, width) text states; L = context_length ("full") or the batch's longest prompt."""
    mask: torch.Tensor | None
    """(B, L) 1 = real token, 0 = padding; None when every row uses all L positions."""
    pooled: torch.Tensor
    lengths: list[int]
    truncated: list[bool]


@dataclass
class SampleParams:
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 4.0
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    conditions: dict[str, Any] = field(default_factory=dict)
    """Class / scalar condition values {name: value} (docs/conditioning.md); absent ones are null."""

    def __post_init__(self) -> None:
        self.sampler = canonical_sampler(self.sampler)
        if self.steps < 1:
            raise ValueError("steps must be >= 1")

    @classmethod
    def from_options(cls, options: Any, height: int | None = None, width: int | None = None,
                     conditions: dict[str, Any] | None = None) -> SampleParams:
        """The params a stage's options ask for (`sampler`, `steps`, `guidance`, `negative_prompt`: the fields
        GenerateConfig and EvaluateConfig share), at `height` x `width` with `conditions`."""
        return cls(sampler=options.sampler, steps=options.steps, guidance=options.guidance,
                   negative_prompt=options.negative_prompt, height=height, width=width, conditions=conditions or {})


@dataclass
class GeneratedImage:
    """One sample: pixels as the pipeline's `output_type="np"` would give them, plus provenance."""

    prompt: str
    seed: int
    array: np.ndarray
    """(H, W, 3) float32 in [0, 1]."""
    meta: dict[str, Any] = field(default_factory=dict)

    def to_uint8(self) -> np.ndarray:
        return (self.array * 255).round().astype("uint8")


def pixels_to_arrays(pixels: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> [0, 1] (B, H, W, 3) float32, as diffusers' VaeImageProcessor does."""
    return (pixels / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()


def image_to_pixels(image: Any, height: int, width: int) -> torch.Tensor:
    """A PIL image or path -> (1, 3, H, W) in [-1, 1]; resized (bicubic) when its size differs."""
    from PIL import Image

    img = Image.open(image) if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") else image
    img = img.convert("RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.BICUBIC)
    return to_pixels(np.asarray(img)[None])


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image: an image depends on its own seed only, on any device."""
    return [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]


class Sampler:
    """UNet + VAE + text encoder + a training noise schedule -> images."""

    def __init__(self, unet: Any, vae: Any, text_encoder: Any, scheduler_config: dict[str, Any] | None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 text_states: str = "real_tokens", default_resolution: int | None = None,
                 conditions: ConditionSet | None = None) -> None:
        if text_states not in TEXT_STATE_MODES:
            raise ValueError(f"text_states must be one of {TEXT_STATE_MODES}, got {text_states!r}")
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = dict(scheduler_config or {})
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_states = text_states
        self.conditions = conditions or ConditionSet()
        addition = getattr(unet.config, "addition_embed_type", None)
        if addition not in (None, "text"):
            raise ValueError(f"UNet addition_embed_type {addition!r} is not supported by this sampler")
        self.addition_embed_type = addition
        width = getattr(text_encoder, "width", None)
        if width is not None and unet.config.cross_attention_dim != width:
            raise ValueError(f"UNet cross_attention_dim {unet.config.cross_attention_dim} != text width {width}")
        if unet.config.in_channels != vae.latent_channels:
            raise ValueError(f"UNet in_channels {unet.config.in_channels} != VAE latent channels {vae.latent_channels}")
        sample = unet.config.sample_size
        sample = sample if isinstance(sample, int) else sample[0]
        self.default_resolution = int(default_resolution or sample * vae.downsample)

    # -- text -----------------------------------------------------------------------------
    def _truncated(self, prompts: Sequence[str], lengths: list[int]) -> list[bool]:
        ctx = int(self.text_encoder.context_length)
        tok = getattr(self.text_encoder, "tokenizer", None)
        encode = getattr(tok, "encode", None)
        out = []
        for prompt, length in zip(prompts, lengths):
            try:
                out.append(len(encode(prompt)) + 2 > ctx)  # + start/end-of-text
            except Exception:  # noqa: BLE001 - tokenizers without .encode: a full row means "maybe truncated"
                out.append(length >= ctx)
        return out

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> TextCondition:
        states, lengths, pooled = self.text_encoder.encode(list(prompts))
        states = states.to(self.device, self.dtype)
        pooled = pooled.to(self.device, self.dtype)
        lens = [int(x) for x in lengths.tolist()]
        mask = None
        if self.text_states == "real_tokens":
            width = max(lens)
            states = states[:, :width].clone()
            keep = torch.arange(width, device=self.device)[None, :] < torch.tensor(lens, device=self.device)[:, None]
            states = states * keep[..., None].to(states.dtype)
            if not bool(keep.all()):
                mask = keep.to(self.dtype)
        return TextCondition(states, mask, pooled, lens, self._truncated(prompts, lens))

    @staticmethod
    def _pair(uncond: TextCondition, cond: TextCondition) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """[uncond; cond] stacked for one CFG forward, padded to a common length."""
        length = max(uncond.states.shape[1], cond.states.shape[1])
        states, masks = [], []
        for c in (uncond, cond):
            pad = length - c.states.shape[1]
            s = torch.nn.functional.pad(c.states, (0, 0, 0, pad))
            m = c.mask if c.mask is not None else torch.ones(s.shape[:2], device=s.device, dtype=s.dtype)[:, :c.states.shape[1]]
            m = torch.nn.functional.pad(m, (0, pad))
            states.append(s)
            masks.append(m)
        mask = torch.cat(masks)
        return torch.cat(states), (None if bool((mask > 0).all()) else mask), torch.cat([uncond.pooled, cond.pooled])

    # -- core loop -------------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, cond: TextCondition, uncond: TextCondition | None, seeds: Sequence[int], params: SampleParams,
                init_latents: torch.Tensor | None = None, strength: float = 1.0,
                gens: list[torch.Generator] | None = None) -> torch.Tensor:
        """Run the scheduler loop; returns final scaled latents (B, C, h, w). `gens`: the seeds' generators
        when the caller has drawn from them already (img2img's posterior sample)."""
        batch = cond.states.shape[0]
        height = params.height or self.default_resolution
        width = params.width or self.default_resolution
        down = self.vae.downsample
        if height % down or width % down:
            raise ValueError(f"image size {height}x{width} is not a multiple of the VAE downsample {down}")
        shape = (batch, self.unet.config.in_channels, height // down, width // down)
        scheduler = make_scheduler(params.sampler, self.scheduler_config)
        scheduler.set_timesteps(params.steps, device=self.device)
        timesteps = scheduler.timesteps
        gens = gens or generators(seeds)
        from diffusers.utils.torch_utils import randn_tensor

        if init_latents is None:
            latents = randn_tensor(shape, generator=gens, device=self.device, dtype=self.dtype)
            latents = latents * scheduler.init_noise_sigma
        else:
            init_steps = min(int(params.steps * strength), params.steps)
            t_start = max(params.steps - init_steps, 0)
            timesteps = scheduler.timesteps[t_start * scheduler.order:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(t_start * scheduler.order)
            init_latents = init_latents.to(self.device, self.dtype)
            if len(timesteps) == 0:
                return init_latents
            noise = randn_tensor(init_latents.shape, generator=gens, device=self.device, dtype=self.dtype)
            latents = scheduler.add_noise(init_latents, noise, timesteps[:1].repeat(batch))

        do_cfg = uncond is not None and params.guidance > 1.0
        labels = self.class_labels(params.conditions, batch, do_cfg)
        if do_cfg:
            states, mask, pooled = self._pair(uncond, cond)
        else:
            states, mask, pooled = cond.states, cond.mask, cond.pooled
        added = {"text_embeds": pooled} if self.addition_embed_type == "text" else None
        step_params = set(inspect.signature(scheduler.step).parameters)
        extra: dict[str, Any] = {}
        if "eta" in step_params:
            extra["eta"] = 0.0
        if "generator" in step_params:
            extra["generator"] = gens
        for t in timesteps:
            model_in = torch.cat([latents] * 2) if do_cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            pred = self.unet(model_in, t, encoder_hidden_states=states, encoder_attention_mask=mask,
                             class_labels=labels, added_cond_kwargs=added, return_dict=False)[0]
            if do_cfg:
                pred_uncond, pred_text = pred.chunk(2)
                pred = pred_uncond + params.guidance * (pred_text - pred_uncond)
            latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        return latents

    def class_labels(self, values: dict[str, Any], batch: int, do_cfg: bool) -> torch.Tensor | None:
        """The UNet's class_labels for `batch` images of these condition values; with CFG the
        unconditional half gets the null condition (guidance on the conditions as on the text)."""
        if not self.conditions:
            return None
        rows = self.conditions.rows([values] * batch)  # (B, N)
        if do_cfg:
            rows = torch.cat([self.conditions.rows([{}] * batch), rows])
        labels = class_labels(self.conditions, rows).to(self.device)
        return labels if labels.dtype == torch.long else labels.to(self.dtype)

    # -- public entry points --------------------------------------------------------------
    def _meta(self, params: SampleParams, cond: TextCondition, i: int, **more: Any) -> dict[str, Any]:
        return {"sampler": params.sampler, "steps": params.steps, "guidance": params.guidance,
                "negative_prompt": params.negative_prompt, "text_tokens": cond.lengths[i],
                "truncated": cond.truncated[i], "text_states": self.text_states,
                **({"conditions": params.conditions} if params.conditions else {}), **more}

    @torch.no_grad()
    def txt2img(self, prompts: Sequence[str], seeds: Sequence[int], params: SampleParams | None = None,
                batch_size: int = 4) -> list[GeneratedImage]:
        """One image per prompt, `seeds[i]` for prompt i; batched `batch_size` prompts at a time."""
        params = params or SampleParams()
        if len(prompts) != len(seeds):
            raise ValueError("one seed per prompt")
        out: list[GeneratedImage] = []
        for start in range(0, len(prompts), max(1, batch_size)):
            chunk, chunk_seeds = list(prompts[start:start + batch_size]), list(seeds[start:start + batch_size])
            cond = self.encode_text(chunk)
            uncond = self.encode_text([params.negative_prompt] * len(chunk)) if params.guidance > 1.0 else None
            latents = self.denoise(cond, uncond, chunk_seeds, params)
            arrays = pixels_to_arrays(self.vae.decode(latents).float())
            out.extend(GeneratedImage(p, int(s), a, self._meta(params, cond, i, strength=1.0))
                       for i, (p, s, a) in enumerate(zip(chunk, chunk_seeds, arrays)))
        return out

    def start_latents(self, pixels: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """img2img's start latents (B, C, h, w), one per generator, as StableDiffusionImg2ImgPipeline makes
        them: an AutoencoderKL's posterior is sampled with the image's own generator, which then draws
        the noise (the same draws give the same images); deterministic encoders draw nothing."""
        pixels = pixels.to(self.device, self.dtype)
        if self.vae.spec.type != "autoencoder_kl":
            return self.vae.encode(pixels, mode="mean").repeat(len(gens), 1, 1, 1)
        return torch.cat([self.vae.encode(pixels, mode="sample", generator=g) for g in gens])

    @torch.no_grad()
    def img2img(self, image: Any, prompts: Sequence[str], seeds: Sequence[int], strength: float,
                params: SampleParams | None = None, batch_size: int = 4) -> list[GeneratedImage]:
        """Encode `image`, noise it to the strength's timestep, denoise the remaining steps.

        strength 0 returns the input image (resized to the output size) untouched; strength 1
        ignores it and is exactly txt2img for the same seed.
        """
        params = params or SampleParams()
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if strength >= 1.0:
            return self.txt2img(prompts, seeds, params, batch_size)
        height = params.height or self.default_resolution
        width = params.width or self.default_resolution
        pixels = image_to_pixels(image, height, width)
        out: list[GeneratedImage] = []
        for start in range(0, len(prompts), max(1, batch_size)):
            chunk, chunk_seeds = list(prompts[start:start + batch_size]), list(seeds[start:start + batch_size])
            cond = self.encode_text(chunk)
            if strength <= 0.0:
                arrays = pixels_to_arrays(pixels.repeat(len(chunk), 1, 1, 1))
            else:
                gens = generators(chunk_seeds)
                init = self.start_latents(pixels, gens)
                uncond = self.encode_text([params.negative_prompt] * len(chunk)) if params.guidance > 1.0 else None
                latents = self.denoise(cond, uncond, chunk_seeds, params, init_latents=init, strength=strength,
                                       gens=gens)
                arrays = pixels_to_arrays(self.vae.decode(latents).float())
            out.extend(GeneratedImage(p, int(s), a, self._meta(params, cond, i, strength=strength))
                       for i, (p, s, a) in enumerate(zip(chunk, chunk_seeds, arrays)))
        return out
