"""The one scheduler factory: the training noise schedule, and samplers built from its saved config."""

from __future__ import annotations

import json
import math

import pytest
import torch

from latentforge.diffusion.schedulers import BETA_RANGES, PREDICTION_TYPES, SAMPLERS, make_scheduler


def saved_config(scheduler, tmp_path) -> dict:
    """What an export holds: `save_pretrained`'s scheduler_config.json, read back as JSON."""
    scheduler.save_pretrained(tmp_path / "scheduler")
    return json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())


@pytest.mark.parametrize("beta_schedule", sorted(BETA_RANGES))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_every_sampler_from_the_saved_config_has_the_training_schedule(beta_schedule, prediction_type,
                                                                        tmp_path) -> None:
    training = make_scheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    config = saved_config(training, tmp_path)
    assert config["_class_name"] == "DDPMScheduler" and config["clip_sample"] is False
    for kind in SAMPLERS:
        sampler = make_scheduler(kind, config)
        assert sampler.config.prediction_type == prediction_type, kind
        assert sampler.config.num_train_timesteps == training.config.num_train_timesteps, kind
        torch.testing.assert_close(sampler.betas, training.betas, rtol=1e-6, atol=0, msg=kind)
        torch.testing.assert_close(sampler.alphas_cumprod, training.alphas_cumprod, rtol=1e-6, atol=0, msg=kind)


def test_samplers_are_set_up_like_stable_diffusion_pipeline(tmp_path) -> None:
    # Training keeps diffusers' steps_offset 0 (the export's scheduler_config.json); sampling counts
    # timesteps from 1 as StableDiffusionPipeline does: 4 DDIM steps of 1000 are 751, 501, 251, 1.
    training = make_scheduler(prediction_type="v_prediction")
    assert training.config.steps_offset == 0
    ddim = make_scheduler("ddim", saved_config(training, tmp_path))
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [751, 501, 251, 1]
    assert ddim.config.clip_sample is False
    dpm = make_scheduler("dpm-solver++", {})  # an alias; {} is diffusers' default schedule
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler"
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 2)
    assert type(make_scheduler("euler_discrete", {})).__name__ == "EulerDiscreteScheduler"


def test_overrides_win_over_the_saved_config(tmp_path) -> None:
    config = saved_config(make_scheduler(prediction_type="v_prediction"), tmp_path)
    assert make_scheduler("ddim", config, prediction_type="epsilon").config.prediction_type == "epsilon"
    assert make_scheduler("ddim", config, steps_offset=0).config.steps_offset == 0


def test_beta_schedule_is_configurable_and_checked() -> None:
    assert math.isclose(float(make_scheduler(beta_schedule="scaled_linear").betas[0]), 0.00085, rel_tol=1e-4)
    assert math.isclose(float(make_scheduler(beta_schedule="linear").betas[0]), 0.0001, rel_tol=1e-4)
    assert make_scheduler(beta_schedule="squaredcos_cap_v2").config.beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(ValueError, match="beta_schedule 'quadratic'"):
        make_scheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        make_scheduler(prediction_type="sample")
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        make_scheduler("heun", {})
