"""`PrecomputeConfig`: what `jobs/precompute_latents.py` reads from presets and flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from latentforge import storage
from latentforge.conditioning.spec import ConditionColumn, parse_condition_columns
from latentforge.config import ConfigError
from latentforge.models.vae import VAE_TYPES
from latentforge.tracking import TrackingOptions

def resolution_dir(resolution: int) -> str:
    """Sub-directory of one resolution's dataset in a --resolutions output."""
    return f"{resolution}px"


def column_name(name: str, resolution: int, multi: bool) -> str:
    """A row column of one resolution: `image`, `meta`, `latent` in a single-resolution run (the columns
    other code builds rows with), `image_16`, `meta_16`, `latent_16`, ... with --resolutions."""
    return f"{name}_{resolution}" if multi else name


# Settings that decide the bytes of the output: a rerun into the same output must use the same.
ENCODER_SETTINGS = (
    "input", "vae", "vae_type", "patch_size", "text_encoder", "text_encoder_weights", "text_layer",
    "resolution", "resize_filter", "crop", "latent", "dtype", "compute_dtype", "seed", "keep_empty_captions",
    "text_states",
)


@dataclass
class PrecomputeConfig(TrackingOptions):
    """Encode ingest shards into VAE latents + CLIP text embeddings (one latent shard per input shard)."""

    input: str = ""
    """Ingest output directory (local path or fsspec URI) holding NNNNN.tar shards and manifest.json."""
    output: str = ""
    """Output directory for the latent shards and their manifest.json."""
    vae: str = "stabilityai/stable-diffusion-2-1-base/vae"
    """VAE weights: a local diffusers directory or a hub id (org/repo or org/repo/subfolder); unused for patchify."""
    vae_type: str = "autoencoder_kl"
    """autoencoder_kl | autoencoder_tiny | patchify (weight-free pixel_unshuffle, the demo's VAE)."""
    patch_size: int = 2
    """Patch size of the patchify VAE (latent channels = 3 * patch_size**2)."""
    text_encoder: str = "ViT-H-14"
    """open_clip model name (e.g. ViT-H-14, ViT-L-14, lf-tiny-clip)."""
    text_encoder_weights: str | None = "laion2b_s32b_b79k"
    """open_clip pretrained tag or a local checkpoint file (.safetensors preferred); none = random weights."""
    text_layer: Literal["last", "penultimate"] = "penultimate"
    """Which per-token states to store: last (after ln_final) or penultimate (SD 2.x)."""
    text_states: Literal["real_tokens", "full"] = "real_tokens"
    """Which text states a sample stores, i.e. what the UNet is trained and sampled on: real_tokens (start,
    text, end-of-text; training pads with an attention mask) or full (all context_length states, unmasked:
    what diffusers' StableDiffusionPipeline feeds, so the model exports to it; docs/export.md)."""
    resolution: int = 256
    """Training resolution: images are resized (shorter side) and cropped to resolution x resolution."""
    resolutions: list[int] = field(default_factory=list)
    """Several training resolutions from ONE pass over the input (comma list, e.g. 16,32; replaces --resolution):
    each image is decoded and each caption encoded once, and each resolution gets an ordinary dataset in
    OUTPUT/<R>px/ plus a parent OUTPUT/manifest.json listing them (docs/precompute.md "Several resolutions")."""
    resize_filter: Literal["bicubic", "bilinear", "lanczos"] = "bicubic"
    """PIL resampling filter for the resize."""
    crop: Literal["center", "random"] = "center"
    """Crop after the resize: center, or random (seeded per key, reproducible)."""
    latent: Literal["mean", "sample", "mean_std"] = "mean"
    """Store the posterior mean, one sample (seeded per key), or mean and std (training samples)."""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Storage dtype of latents and text states (bf16 is stored as uint16 bits)."""
    compute_dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    """Encoder compute dtype: auto = dtype on GPU actors, fp32 on CPU actors."""
    seed: int = 0
    """Seed for random crops, posterior samples and the fidelity subset."""
    batch_size: int = 32
    """Images per encoder call."""
    read_batch_size: int = 64
    """Rows per block emitted by the shard readers, rounded down to a multiple of batch_size."""
    concurrency: int = 0
    """Encoder actors; 0 = one per GPU (num_gpus / num_gpus_per_actor), or chosen from the cluster's CPUs when
    no GPU (with num_cpus_per_actor 0 too; docs/precompute.md "CPU-only clusters"), else one CPU actor."""
    num_gpus_per_actor: float = 1.0
    """GPUs per encoder actor when the cluster has GPUs."""
    num_cpus_per_actor: float = 0.0
    """CPU slots per encoder actor; a CPU actor runs max(1, int(this)) torch threads. 0 = auto: 1 on GPU
    clusters; on CPU-only clusters chosen with concurrency (both 0), else 1."""
    keep_empty_captions: bool = False
    """Keep samples whose caption is empty (else they are skipped and counted)."""
    condition: list[str] = field(default_factory=list)
    """Ingest metadata columns kept as conditions, COLUMN:class or COLUMN:scalar (comma list), e.g.
    label:class,score:scalar; the manifest records each one's labels or range (docs/conditioning.md)."""
    store_pixels: bool = False
    """Also store each preprocessed image (uint8 R x R x 3, `{key}.pixels.npy`): the super-resolution stage
    makes its low-res inputs from them (docs/super_resolution.md). With --resolutions: every resolution above the
    lowest (the lowest only feeds the base model)."""
    fidelity_samples: int = 16
    """Items re-encoded in fp32 after the run and compared with the stored arrays (0 = off)."""
    fidelity_tolerance: float = 0.0
    """Largest allowed relative error of the fidelity check; 0 = by dtype (fp32 1e-3, fp16 1e-2, bf16 5e-2)."""
    max_shards: int = 0
    """Encode only the first N input shards (0 = all); handy for a trial run."""
    read_retries: int = 3
    """Extra attempts to read an input tar after a transient storage error (OSError / fsspec), from the start
    of the tar, skipping the samples already read."""
    read_backoff_s: float = 1.0
    """Wait before the first read retry; doubled for each further one."""
    allow_partial_shards: bool = False
    """Publish a shard whose input tar could not be read completely (truncated, wrong sha256, read errors
    after all retries) with what was read, its loss counted in the manifest; default: not published, exit 1."""
    verify_finished: bool = False
    """On resume, re-hash every finished output tar; default: trust a tar whose size matches its manifest
    record (one stat, no bytes read)."""
    run_name: str | None = None
    """MLflow run name (default: precompute-<output dir name>)."""
    progress: bool = True
    """Show a progress bar."""

    def validate(self) -> None:
        super().validate()
        parse_condition_columns(self.condition)  # a malformed --condition is a usage error now
        self._check_vae()
        self.check_at_least(1, "resolution", "batch_size", "read_batch_size", "patch_size")
        self._check_resolutions()
        self.check_at_least(0, "concurrency", "fidelity_samples", "max_shards", "fidelity_tolerance")
        if self.read_retries < 0 or self.read_backoff_s < 0:
            raise ConfigError("read_retries and read_backoff_s must be >= 0")
        if self.num_gpus_per_actor <= 0 or self.num_cpus_per_actor < 0:
            raise ConfigError("num_gpus_per_actor must be > 0 and num_cpus_per_actor >= 0 (0 = auto)")

    def _check_vae(self) -> None:
        if self.vae_type not in VAE_TYPES:
            raise ConfigError(f"vae_type: {self.vae_type!r} is not one of {list(VAE_TYPES)}")
        if self.vae_type != "patchify" and not self.vae:
            raise ConfigError(f"vae: a directory or hub id is required for vae_type {self.vae_type}")
        if self.vae_type == "patchify":
            self.vae = ""

    def _check_resolutions(self) -> None:
        if not self.resolutions:
            return
        if min(self.resolutions) < 1 or len(set(self.resolutions)) < 2:
            raise ConfigError(f"resolutions {self.resolutions}: give two or more distinct sizes >= 1 "
                              "(one resolution: --resolution)")
        self.resolutions = sorted(set(self.resolutions))
        self.resolution = self.resolutions[0]  # the base's size: what a reader sizes its buffers from

    @property
    def sizes(self) -> list[int]:
        """The resolutions this run writes: --resolutions, else the one --resolution."""
        return self.resolutions or [self.resolution]

    def stores_pixels_at(self, resolution: int) -> bool:
        """--store-pixels with --resolutions stores every size above the lowest: the lowest only feeds the base."""
        return self.store_pixels and (not self.resolutions or resolution > self.resolutions[0])

    def column(self, name: str, resolution: int) -> str:
        return column_name(name, resolution, bool(self.resolutions))

    def at_resolution(self, resolution: int) -> "PrecomputeConfig":
        """The single-resolution config of one --resolutions dataset: its size, sub-dir and pixels."""
        return replace(self, resolution=resolution, resolutions=[], store_pixels=self.stores_pixels_at(resolution),
                       output=storage.join(self.output, resolution_dir(resolution)))

    def missing_options(self) -> list[str]:
        given = {"--input (ingest output dir)": self.input, "--output (latent dir)": self.output}
        return [flag for flag, value in given.items() if not value]

    @property
    def condition_columns(self) -> list[ConditionColumn]:
        return parse_condition_columns(self.condition)

    @property
    def tolerance(self) -> float:
        return self.fidelity_tolerance or {"fp32": 1e-3, "fp16": 1e-2, "bf16": 5e-2}[self.dtype]

    def encoder_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ENCODER_SETTINGS}

    def encoder_actors(self, cluster_cpus: float, cluster_gpus: float) -> "EncoderActors":
        """The encoder actor pool for a cluster with these resources; explicit flags win over the policy."""
        slot = self.num_cpus_per_actor or 1.0
        if cluster_gpus > 0:
            count = self.concurrency or max(1, int(cluster_gpus // self.num_gpus_per_actor))
            return EncoderActors(count, slot, self.num_gpus_per_actor, max(1, int(slot)), "flags")
        if self.concurrency or self.num_cpus_per_actor:
            return EncoderActors(self.concurrency or 1, slot, 0.0, max(1, int(slot)), "flags")
        return auto_cpu_actors(cluster_cpus)


@dataclass(frozen=True)
class EncoderActors:
    """How many encoder actors run, the Ray slots each holds and its torch threads (CPU actors)."""

    count: int
    num_cpus: float
    num_gpus: float
    threads: int
    chosen: Literal["auto", "flags"]

    def describe(self) -> str:
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else f", {self.threads} torch thread(s)"
        return f"{self.count} x ({self.num_cpus:g} CPU slot{gpus}), {self.chosen}"


def auto_cpu_actors(cluster_cpus: float) -> EncoderActors:
    """The CPU-only policy: one 1-thread actor per CPU, each on half a CPU slot (at most), readers keep the rest.

    Why (docs/benchmarks.md "Precompute", 2 cores): a shard reader uses only part of its slot
    (JPEG decode ~1,400 img/s per core) while a 1-thread encoder (~430 rows/s) is the bottleneck.
    One 1-CPU actor reached 0.87x the plain loop, one actor with 2 threads was slower still (its
    OpenMP threads contend with the reader), and 2 one-thread actors on 0.5 slots reached
    1.21x / 1.34x (16k / 64k samples): as many encoder threads as cores, the readers' idle share
    used. The slot is capped so the actors leave at least one whole CPU for a reader task
    (num_cpus=1), else nothing would read; below 2 CPUs the actor holds no slot at all.
    """
    count = max(1, int(cluster_cpus))
    slot = math.floor(100 * min(0.5, max(0.0, cluster_cpus - 1) / count)) / 100
    return EncoderActors(count, slot, 0.0, 1, "auto")
