"""Periodic evaluation inside training (rank 0, EMA weights), per the cross-helper interface:

    evaluator = TrainingEvaluator(InTrainingEvalConfig(prompts=[...]), data_dir, data_manifest, device,
                                  scheduler_config=noise_scheduler.config)
    result = evaluator.evaluate(ema_unet, step, out_dir)   # -> EvalResult(metrics, artifacts)

Every call samples the same prompts with the same seeds (so grids of successive steps are
comparable), writes a contact sheet `out_dir/step_XXXXXX_grid.png` (an artifact), and, when
their weights are configured, computes FID on `num_fid_samples` captions of the eval set (default:
the training latents) and the CLIP score of the prompt samples. The text encoder, VAE, metric
models and prompt embeddings are loaded once, in the constructor. The UNet is used as given (its
device/dtype) in eval mode under no_grad, and put back in the mode it was in.

`check_can_start` is what the driver runs before any worker starts: every file and name the
evaluator will load, checked without loading a model, so a misconfigured eval is one clear line
at config time rather than a warning deep in a worker's log.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from latentforge.config import ConfigError
from latentforge.evaluation.fid import INCEPTION_SHA256

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = [
    "a red circle on a white background",
    "a blue square in the top left corner",
    "a green triangle at the bottom",
    "a yellow star in the middle",
]


@dataclass
class InTrainingEvalConfig:
    """What the periodic in-training evaluation samples and measures."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Fixed prompts sampled at every evaluation (one image each, one grid)."""
    seeds: list[int] | None = None
    """One seed per prompt (default 0, 1, 2, ...)."""
    sampler: str = "ddim"
    """ddpm | ddim | dpmsolver++ | euler."""
    steps: int = 20
    """Denoising steps."""
    guidance: float = 4.0
    """Classifier-free guidance scale."""
    fid_weights: str | None = None
    """pt_inception-2015-12-05 weights file (or 'download'); None = no FID."""
    clip_model: str | None = None
    """open_clip model name for the CLIP score; None = no CLIP score."""
    clip_weights: str | None = None
    """The CLIP model's pretrained tag or checkpoint file."""
    eval_set: str | None = None
    """Latent or image shards whose captions/images FID uses (default: the training data dir)."""
    num_fid_samples: int = 256
    """Generated (and reference) images per FID; FID is biased when this is below 2048."""
    fid_weights_sha256: str = INCEPTION_SHA256
    """Expected sha256 of fid_weights (the standard file's by default; other weights are refused)."""
    batch_size: int = 8
    """Images per sampling batch."""
    cache_dir: str | None = None
    """Where FID reference statistics are cached (default ~/.cache/latentforge/fid_reference)."""

    def __post_init__(self) -> None:
        from latentforge.diffusion.schedulers import canonical_sampler

        self.sampler = canonical_sampler(self.sampler)
        if not self.prompts:
            raise ValueError("in-training eval needs at least one prompt")
        if self.seeds is not None and len(self.seeds) != len(self.prompts):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.prompts)} prompts")
        if self.num_fid_samples < 2:
            raise ValueError("num_fid_samples must be >= 2")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    artifacts: list[str]
    info: dict[str, Any] = field(default_factory=dict)


class TrainingEvaluator:
    """Samples fixed prompts (and FID captions) from the weights it is given at each call."""

    def __init__(self, config: InTrainingEvalConfig, data_dir: str | None, data_manifest: Any,
                 device: str | torch.device = "cpu", scheduler_config: Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from latentforge.manifest import Manifest
        from latentforge.models.text_encoder import load_text_encoder_from_manifest
        from latentforge.models.vae import load_vae_from_manifest

        self.config = config
        self.data_dir = data_dir
        self.data_manifest = data_manifest if isinstance(data_manifest, Manifest) else Manifest(**dict(data_manifest))
        self.device = torch.device(device)
        self.dtype = dtype
        if scheduler_config is None:
            log.warning("in-training eval: no scheduler_config given; sampling assumes diffusers' DDPMScheduler "
                        "defaults (epsilon prediction, linear betas)")
        self.scheduler_config = dict(scheduler_config or {})
        self.vae = load_vae_from_manifest(self.data_manifest, device=self.device, dtype=dtype)
        self.text_encoder = load_text_encoder_from_manifest(self.data_manifest, device=self.device, dtype=dtype)
        self.seeds = list(config.seeds) if config.seeds is not None else list(range(len(config.prompts)))
        self.inception = None
        if config.fid_weights:
            from latentforge.evaluation.fid import InceptionFeatures

            self.inception = InceptionFeatures(config.fid_weights, config.fid_weights_sha256, device=self.device)
        self.clip = None
        if config.clip_model:
            from latentforge.evaluation.clip_score import ClipScorer

            self.clip = ClipScorer(config.clip_model, config.clip_weights, device=self.device)
        self.eval_set = None
        source = config.eval_set or data_dir
        if self.inception is not None:
            if not source:
                raise ValueError("FID in training needs eval_set or a data_dir")
            from latentforge.evaluation.eval_set import open_eval_set

            self.eval_set = open_eval_set(source)

    def _sampler(self, unet: Any) -> Any:
        from latentforge.conditioning.spec import ConditionSet
        from latentforge.generation.sampler import Sampler

        # Latents and text states follow the UNet's dtype (a bf16 EMA copy samples in bf16).
        return Sampler(unet, self.vae, self.text_encoder, self.scheduler_config, device=self.device,
                       dtype=getattr(unet, "dtype", self.dtype),
                       text_states=self.data_manifest.extra.get("text_states", "real_tokens"),
                       default_resolution=self.data_manifest.extra.get("resolution"),
                       conditions=ConditionSet.from_manifest(self.data_manifest))

    @torch.no_grad()
    def evaluate(self, unet: Any, step: int, out_dir: str) -> EvalResult:
        from latentforge.generation.outputs import save_grid
        from latentforge.generation.sampler import SampleParams

        was_training = bool(getattr(unet, "training", False))
        unet.eval()
        try:
            sampler = self._sampler(unet)
            params = SampleParams(sampler=self.config.sampler, steps=self.config.steps, guidance=self.config.guidance)
            images = sampler.txt2img(self.config.prompts, self.seeds, params, batch_size=self.config.batch_size)
            os.makedirs(out_dir, exist_ok=True)
            grid = os.path.join(out_dir, f"step_{int(step):06d}_grid.png")
            save_grid(grid, [im.to_uint8() for im in images],
                      {"step": int(step), "prompts": " | ".join(self.config.prompts),
                       "seeds": ",".join(map(str, self.seeds)), "sampler": params.sampler, "steps": params.steps,
                       "guidance": params.guidance})
            metrics: dict[str, float] = {}
            info: dict[str, Any] = {}
            if self.clip is not None:
                from latentforge.evaluation.clip_score import clip_score_from_embeddings

                pixels = torch.stack([torch.from_numpy(im.array).permute(2, 0, 1) * 2 - 1 for im in images])
                metrics["eval/clip_score"] = clip_score_from_embeddings(self.clip.embed_images(pixels),
                                                                        self.clip.embed_texts(self.config.prompts))
                info.update(self.clip.describe())
            if self.inception is not None and self.eval_set is not None:
                from latentforge.evaluation.scoring import score_sampler

                scored = score_sampler(sampler, self.eval_set, self.config.num_fid_samples, params, seed=0,
                                       batch_size=self.config.batch_size, inception=self.inception,
                                       cache_dir=self.config.cache_dir, preview=0)
                metrics["eval/fid"] = scored.metrics["fid"]
                metrics["eval/fid_num_samples"] = scored.metrics["fid_num_samples"]
                info.update(scored.info)
            return EvalResult(metrics=metrics, artifacts=[grid], info=info)
        finally:
            if was_training:
                unet.train()


@dataclass
class EvalFailures:
    """In-training evals that raised: counted (the `eval/failures` metric) with the last reason, for the summary."""

    count: int = 0
    last: str = ""

    def record(self, step: int, exc: BaseException) -> None:
        self.count += 1
        self.last = f"step {step}: {type(exc).__name__}: {exc}"
        log.warning("in-training eval failed at %s (%d failure(s) so far)", self.last, self.count)


class UnavailableEvaluator:
    """Stands in for an evaluator that could not start on the worker: every eval fails, and is counted, with why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def evaluate(self, unet: Any, step: int, out_dir: str) -> EvalResult:
        raise RuntimeError(f"the evaluator could not start: {self.reason}")


def check_can_start(config: InTrainingEvalConfig, data_dir: str | None, data_manifest: Any) -> None:
    """Raise ConfigError naming what `TrainingEvaluator` could not load; loads no model."""
    from latentforge.manifest import Manifest

    manifest = data_manifest if isinstance(data_manifest, Manifest) else Manifest(**dict(data_manifest))
    try:
        _check_text_encoder(manifest.models.get("text_encoder") or {})
        _check_vae(manifest.models.get("vae") or {})
        if config.clip_model:
            _check_open_clip(config.clip_model, config.clip_weights, "the CLIP score model")
        if config.fid_weights:
            _check_fid(config, data_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:  # FidWeightsError, ManifestError: Runtime
        raise ConfigError(f"in-training eval cannot start: {exc}") from exc


def _check_text_encoder(record: Mapping[str, Any]) -> None:
    if not record.get("name"):
        raise ValueError("the data manifest records no text encoder (models.text_encoder.name)")
    _check_open_clip(record["name"], record.get("weights"), "the data's text encoder")


def _check_open_clip(name: str, weights: str | None, what: str) -> None:
    from latentforge.models.text_encoder import open_clip_module, register_package_configs

    open_clip = open_clip_module()
    register_package_configs()
    if name not in open_clip.list_models():
        raise ValueError(f"{what}: open_clip knows no model {name!r}")
    if not weights or weights in open_clip.list_pretrained_tags_by_model(name):
        return
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{what}: weights {weights!r} are neither a file here nor a pretrained tag of {name}")


def _check_vae(record: Mapping[str, Any]) -> None:
    if record.get("type") == "patchify":
        return
    model_id = record.get("id") or ""
    # A hub id (org/repo[/subfolder]) is fetched or found in the cache by diffusers; a path must exist.
    if not model_id or (model_id.startswith(("/", ".")) and not os.path.isdir(model_id)):
        raise FileNotFoundError(f"the data's VAE {model_id!r} is not a directory here")


def _check_fid(config: InTrainingEvalConfig, data_dir: str | None) -> None:
    from latentforge.evaluation.eval_set import open_eval_set
    from latentforge.evaluation.fid import DOWNLOAD, verify_inception_weights

    if config.fid_weights != DOWNLOAD:
        verify_inception_weights(config.fid_weights, config.fid_weights_sha256)
    source = config.eval_set or data_dir
    if not source:
        raise ValueError("FID needs eval_set or the training data dir")
    open_eval_set(source)
