"""Pure functions of the training objective (no Ray, no UNet)."""

import pytest
import torch

from latentforge.diffusion import objective
from latentforge.diffusion.schedulers import BETA_RANGES, PREDICTION_TYPES, make_scheduler


def gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_min_snr_weights_epsilon_and_v() -> None:
    snr = torch.tensor([0.5, 5.0, 20.0])
    eps = objective.min_snr_weights(snr, 5.0, "epsilon")
    assert torch.allclose(eps, torch.tensor([1.0, 1.0, 5.0 / 20.0]))
    v = objective.min_snr_weights(snr, 5.0, "v_prediction")
    assert torch.allclose(v, torch.tensor([0.5 / 1.5, 5.0 / 6.0, 5.0 / 21.0]))
    assert torch.equal(objective.min_snr_weights(snr, 0.0, "epsilon"), torch.ones(3))
    with pytest.raises(ValueError):
        objective.min_snr_weights(snr, 5.0, "sample")


SCHEDULES = sorted(BETA_RANGES)


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_min_snr_weights_equal_diffusers_compute_snr_weights(beta_schedule: str, prediction_type: str) -> None:
    # The weighting of diffusers' train_text_to_image.py (--snr_gamma), at every timestep.
    from diffusers.training_utils import compute_snr

    sched = make_scheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)
    t, gamma = torch.arange(sched.config.num_train_timesteps), 5.0
    reference_snr = compute_snr(sched, t)
    clipped = torch.stack([reference_snr, gamma * torch.ones_like(reference_snr)], dim=1).min(dim=1)[0]
    expected = clipped / reference_snr if prediction_type == "epsilon" else clipped / (reference_snr + 1)
    ours = objective.min_snr_weights(objective.snr(sched, t), gamma, prediction_type)
    torch.testing.assert_close(objective.snr(sched, t), reference_snr, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    assert (ours < 1).any() and (ours > 0).all()  # gamma really clips somewhere, nothing is zeroed


def test_snr_matches_alphas_cumprod_and_falls_with_t() -> None:
    sched = make_scheduler(beta_schedule="scaled_linear")
    t = torch.tensor([0, 500, 999])
    a = sched.alphas_cumprod[t]
    assert torch.allclose(objective.snr(sched, t), a / (1 - a))
    s = objective.snr(sched, t)
    assert s[0] > s[1] > s[2]


def test_offset_noise_adds_a_per_channel_constant() -> None:
    latents = torch.zeros(512, 4, 8, 8)
    plain = objective.sample_noise(latents, gen(1))
    assert torch.equal(plain, objective.sample_noise(latents, gen(1), offset_noise=0.0))
    offset = objective.sample_noise(latents, gen(1), offset_noise=0.5)
    # the i.i.d. part is the same draw; the difference is constant over h, w for each (b, c)
    diff = offset - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-5)
    assert 0.4 < float(diff[:, :, 0, 0].std()) < 0.6
    # per-channel means: std 1/8 without offset, sqrt(0.25 + 1/64) with it
    assert float(plain.mean(dim=(2, 3)).std()) < 0.2
    assert float(offset.mean(dim=(2, 3)).std()) > 0.4


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_targets_epsilon_and_velocity_are_the_closed_forms(beta_schedule: str) -> None:
    # v = alpha_t * eps - sigma_t * x0 with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), in float64
    # from the scheduler's own alphas_cumprod; and x_t = alpha_t * x0 + sigma_t * eps (what the UNet sees).
    latents = torch.randn(4, 4, 8, 8, generator=gen(2))
    noise = torch.randn(4, 4, 8, 8, generator=gen(3))
    t = torch.tensor([0, 10, 400, 999])
    eps_sched = make_scheduler(beta_schedule=beta_schedule, prediction_type="epsilon")
    assert torch.equal(objective.training_target(eps_sched, latents, noise, t), noise)
    v_sched = make_scheduler(beta_schedule=beta_schedule, prediction_type="v_prediction")
    abar = v_sched.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    expected_v = alpha * noise.double() - sigma * latents.double()
    v = objective.training_target(v_sched, latents, noise, t)
    assert v.dtype == latents.dtype
    torch.testing.assert_close(v.double(), expected_v, rtol=0, atol=1e-5)
    noisy = v_sched.add_noise(latents, noise, t)
    torch.testing.assert_close(noisy.double(), alpha * latents.double() + sigma * noise.double(), rtol=0, atol=1e-5)
    # v parametrises both: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v (alpha^2 + sigma^2 = 1).
    torch.testing.assert_close(alpha * noisy.double() - sigma * v.double(), latents.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sigma * noisy.double() + alpha * v.double(), noise.double(), rtol=0, atol=1e-5)


def test_weighted_mse() -> None:
    pred, target = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert float(objective.weighted_mse(pred, target)) == 1.0
    assert float(objective.weighted_mse(pred, target, torch.tensor([1.0, 0.0]))) == 0.5


def test_caption_dropout_swaps_in_the_empty_caption() -> None:
    text, mask = torch.randn(4, 5, 3), torch.tensor([[1, 1, 1, 0, 0]] * 4)
    empty = torch.full((2, 3), 7.0)
    out, out_mask, dropped = objective.caption_dropout(text, mask, empty, 1.0, gen())
    assert dropped.all()
    assert torch.equal(out[:, :2], empty.expand(4, 2, 3)) and torch.equal(out[:, 2:], torch.zeros(4, 3, 3))
    assert torch.equal(out_mask, torch.tensor([[1, 1, 0, 0, 0]] * 4))
    same, same_mask, none = objective.caption_dropout(text, mask, empty, 0.0, gen())
    assert not none.any() and torch.equal(same, text) and torch.equal(same_mask, mask)


def test_posterior_sampling() -> None:
    mean = torch.randn(2, 4, 8, 8, generator=gen(4))
    stacked = torch.stack([mean, torch.zeros_like(mean)], dim=1)
    assert torch.equal(objective.sample_posterior(stacked, gen()), mean)
    stacked[:, 1] = 1.0
    z = objective.sample_posterior(stacked, gen(5))
    assert 0.8 < float((z - mean).std()) < 1.2
