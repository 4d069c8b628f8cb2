"""The one scheduler factory: diffusers schedulers for training and for sampling.

As in diffusers, the training noise schedule is a scheduler config (betas, prediction type,
number of timesteps) saved with the model (`EXPORT/scheduler/scheduler_config.json`), and a
sampler is `SamplerClass.from_config(that config, **overrides)`:

    make_scheduler("ddpm", beta_schedule="linear", prediction_type="v_prediction")  # training
    make_scheduler("dpmsolver++", export.scheduler_config)                          # sampling
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

BETA_RANGES = {
    # The SD 1.x / 2.x training schedule and the original DDPM one.
    "scaled_linear": (0.00085, 0.012),
    "linear": (0.0001, 0.02),
    "squaredcos_cap_v2": (0.0001, 0.02),  # betas come from the cosine; start/end unused
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# Sampler name -> diffusers class; DPM-Solver++ is the multistep second-order solver.
SCHEDULER_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
                     "euler": "EulerDiscreteScheduler"}
KIND_SETTINGS = {"dpmsolver++": {"algorithm_type": "dpmsolver++", "solver_order": 2}}
SAMPLERS = tuple(SCHEDULER_CLASSES)
SAMPLER_ALIASES = {"dpm": "dpmsolver++", "dpm++": "dpmsolver++", "dpmsolver": "dpmsolver++",
                   "dpm-solver++": "dpmsolver++", "dpm_solver": "dpmsolver++", "euler_discrete": "euler"}
# How StableDiffusionPipeline.__init__ sets up a loaded schedule for sampling: timesteps counted
# from 1, and no clipping of x0 to [-1, 1] (meant for pixels, not latents).
SAMPLING_SETTINGS = {"steps_offset": 1, "clip_sample": False}


def canonical_sampler(name: str) -> str:
    """A sampler name or alias ("dpm-solver++", "euler_discrete", ...) -> one of SAMPLERS."""
    key = name.strip().lower()
    key = SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {list(SAMPLERS)}")
    return key


def _training_schedule(beta_schedule: str = "scaled_linear", prediction_type: str = "epsilon",
                      num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The training noise schedule as a scheduler config; beta_start/end follow from beta_schedule."""
    if beta_schedule not in BETA_RANGES:
        raise ValueError(f"beta_schedule {beta_schedule!r}: expected one of {sorted(BETA_RANGES)}")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r}: expected one of {PREDICTION_TYPES}")
    beta_start, beta_end = BETA_RANGES[beta_schedule]
    return {"num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule,
            "beta_start": beta_start, "beta_end": beta_end, "prediction_type": prediction_type,
            "clip_sample": False}


def make_scheduler(kind: str = "ddpm", config: Mapping[str, Any] | None = None, **overrides: Any) -> SchedulerMixin:
    """A fresh diffusers scheduler of `kind` (a sampler name or alias, see SAMPLERS).

    config None: the training noise schedule, `overrides` being `_training_schedule`'s arguments
    (what training steps with and saves). A config (a saved `scheduler_config.json`; `{}` means
    diffusers' defaults): a sampler for that schedule, set up like StableDiffusionPipeline
    (SAMPLING_SETTINGS), `overrides` on top.
    """
    import diffusers

    kind = canonical_sampler(kind)
    if config is None:
        settings = _training_schedule(**overrides)
    else:
        saved = {k: v for k, v in config.items() if not k.startswith("_")}  # _class_name, _diffusers_version
        settings = {**saved, **SAMPLING_SETTINGS, **KIND_SETTINGS.get(kind, {}), **overrides}
    return getattr(diffusers, SCHEDULER_CLASSES[kind]).from_config(settings)
