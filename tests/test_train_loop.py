"""The Accelerate training step, checkpoints and data order, in-process (no Ray).

Ray-level behaviour (DDP over two nodes, worker kill + restart, resume through Ray Train) is in
tests/test_train_ray.py; everything that does not need Ray is tested here, fast.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from latentforge.config import ConfigError
from latentforge.training import checkpoint as ckpt
from latentforge.training import data as tdata
from latentforge.training.config import TrainConfig
from latentforge.training.loop import CheckpointPolicy, DiffusionTrainer, warmup_cosine
from latentforge.models.unet import resolve_unet_config
from tests.harness.latent_shards import write_latent_dataset
from tests.harness.two_rank_train import PerSampleNoise, slice_batch, train_on_two_ranks

WIDTH = 32


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return write_latent_dataset(tmp_path_factory.mktemp("lat") / "latents", shard_sizes=[40, 24], width=WIDTH)


@pytest.fixture(scope="module")
def mean_std_latents(tmp_path_factory):
    return write_latent_dataset(tmp_path_factory.mktemp("latms") / "latents", shard_sizes=[16], width=WIDTH,
                                latent="mean_std", dtype="bf16")


def make_trainer(info, **overrides) -> DiffusionTrainer:
    from accelerate import Accelerator

    config = TrainConfig(data=str(info.dir), **{"steps": 30, "batch_size": 8, "lr": 2e-3, "ema_decay": 0.99,
                                                "warmup_steps": 2, **overrides})
    empty = tdata.read_empty_caption(str(info.dir), info.manifest)
    shape = info.manifest.extra["latent_shape"]
    unet_config = resolve_unet_config("tiny", shape[0], WIDTH, shape[1])
    return DiffusionTrainer(config, unet_config, Accelerator(cpu=True), empty, info.manifest.extra["latent"])


def batches(info, trainer: DiffusionTrainer, epoch: int = 0):
    """This (single) rank's deterministic epoch order, collated."""
    cfg = trainer.config
    plan = tdata.plan_data(info.manifest, 1, cfg.samples_per_step, cfg.shuffle_buffer, cfg.seed, cfg.val_samples)
    rows = tdata.read_positions(str(info.dir), plan, range(plan.train_total))
    order = list(tdata.shuffled_epoch(iter(rows), plan, 0, epoch))
    dtype = info.manifest.extra["dtype"]
    return [tdata.collate([tdata.decode_row(r, dtype) for r in order[i:i + cfg.batch_size]], 1)
            for i in range(0, len(order), cfg.batch_size)]


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_loss_decreases_and_ema_tracks_but_differs(latents) -> None:
    trainer = make_trainer(latents, val_samples=0, cfg_dropout=0.1, snr_gamma=5.0)
    data = batches(latents, trainer)
    held_out = data[:2]  # fixed noise/timesteps: comparable before/after
    before = trainer.validation_loss(held_out)
    initial = params(trainer.raw_model)
    losses = []
    epoch = 0
    while trainer.step < 30:
        for batch in data:
            losses.append(trainer.train_step([batch]).loss)
            if trainer.step >= 30:
                break
        epoch += 1
        data = batches(latents, trainer, epoch)
    after = trainer.validation_loss(held_out)
    assert after < 0.75 * before, (before, after)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    raw = params(trainer.raw_model)
    ema = [s.detach().clone() for s in trainer.ema.shadow_params]
    assert any(not torch.equal(e, i) for e, i in zip(ema, initial)), "EMA weights never moved"
    assert any(not torch.equal(e, r) for e, r in zip(ema, raw)), "EMA weights equal the raw weights"
    with trainer.ema_weights() as model:  # the swap is temporary
        assert all(torch.equal(p, e) for p, e in zip(model.parameters(), ema))
    assert all(torch.equal(p, r) for p, r in zip(trainer.raw_model.parameters(), raw))
    exported = trainer.export_model()
    assert all(torch.equal(p, e) for p, e in zip(exported.parameters(), ema))


def test_v_prediction_with_offset_noise_and_posterior_sampling(mean_std_latents) -> None:
    trainer = make_trainer(mean_std_latents, prediction_type="v_prediction", snr_gamma=5.0, offset_noise=0.1,
                           batch_size=4, grad_accum=2)
    data = batches(mean_std_latents, trainer)
    assert data[0]["latents"].shape[1:] == (2, 4, 8, 8)  # [mean, std]
    initial = params(trainer.raw_model)
    result = trainer.train_step(data[:2])
    assert not result.skipped and torch.isfinite(torch.tensor(result.loss))
    assert any(not torch.equal(a, b) for a, b in zip(initial, params(trainer.raw_model)))


def test_non_finite_loss_skips_the_step_and_is_never_checkpointed(latents) -> None:
    trainer = make_trainer(latents)
    data = batches(latents, trainer)
    trainer.train_step([data[0]])
    weights, ema = params(trainer.raw_model), [s.clone() for s in trainer.ema.shadow_params]
    opt_step = trainer.optimizer.state_dict()["state"][0]["step"].clone()
    lr_before = trainer.lr_scheduler.get_last_lr()[0]
    poisoned = dict(data[1], latents=data[1]["latents"].clone())
    poisoned["latents"][0, 0, 0, 0] = float("nan")
    result = trainer.train_step([poisoned])
    assert result.skipped and trainer.skipped_steps == 1 and trainer.step == 2
    assert all(torch.equal(a, b) for a, b in zip(weights, params(trainer.raw_model)))
    assert all(torch.equal(a, b) for a, b in zip(ema, trainer.ema.shadow_params))
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["step"], opt_step)
    assert trainer.lr_scheduler.get_last_lr()[0] == lr_before
    assert all(p.grad is None for p in trainer.raw_model.parameters())
    inf_batch = dict(data[1], text=data[1]["text"] * float("inf"))
    assert trainer.train_step([inf_batch]).skipped and trainer.skipped_steps == 2
    assert not trainer.train_step([data[2]]).skipped
    # the policy: a due checkpoint on a skipped step waits for the next good step
    policy = CheckpointPolicy(every=2, total_steps=10)
    decisions = [policy.should_save(step, skipped) for step, skipped in
                 [(1, False), (2, True), (3, True), (4, False), (5, False), (6, False), (10, True)]]
    assert decisions == [False, False, False, True, False, True, False]


def test_checkpoint_round_trip_is_bitwise(latents, tmp_path) -> None:
    # Same machine, same path: a resume continues bit for bit, the EMA weights included.
    a = make_trainer(latents, cfg_dropout=0.5, offset_noise=0.1, snr_gamma=5.0)
    data = batches(latents, a)
    for batch in data[:3]:
        a.train_step([batch])
    a.save(str(tmp_path / "ck"), {"position": 24})
    saved_ema = [s.clone() for s in a.ema.shadow_params]
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert all(n.endswith((".json", ".safetensors")) for n in names) and "optimizer.safetensors" in names
    expected = [a.train_step([batch]).loss for batch in data[3:5]]
    b = make_trainer(latents, cfg_dropout=0.5, offset_noise=0.1, snr_gamma=5.0)
    assert not all(torch.equal(x, y) for x, y in zip(saved_ema, b.ema.shadow_params))
    state = b.load(str(tmp_path / "ck"))
    assert state["step"] == 3 and state["position"] == 24
    assert b.ema.optimization_step == 3 and all(torch.equal(x, y) for x, y in zip(saved_ema, b.ema.shadow_params))
    resumed = [b.train_step([batch]).loss for batch in data[3:5]]
    assert resumed == expected  # bitwise on CPU
    assert all(torch.equal(x, y) for x, y in zip(params(a.raw_model), params(b.raw_model)))
    assert all(torch.equal(x, y) for x, y in zip(a.ema.shadow_params, b.ema.shadow_params))


def test_one_ema_update_is_the_decay_formula(latents) -> None:
    # diffusers EMAModel's schedule: with n updates before this one, decay = 0 for the first (it copies
    # the weights), then min(ema_decay, (1 + n) / (10 + n)); ema <- decay * ema + (1 - decay) * weights.
    trainer = make_trainer(latents, ema_decay=0.2)
    data = batches(latents, trainer)
    ema = params(trainer.raw_model)
    assert all(torch.equal(e, s) for e, s in zip(ema, trainer.ema.shadow_params))
    for n, batch in enumerate(data[:3]):
        assert not trainer.train_step([batch]).skipped
        decay = min(0.2, (1 + n) / (10 + n)) if n else 0.0  # 0, 2/11 (warm-up), then capped at 0.2
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, params(trainer.raw_model))]
        for expected, shadow in zip(ema, trainer.ema.shadow_params):
            torch.testing.assert_close(shadow, expected, rtol=1e-6, atol=1e-6)
    assert trainer.ema.cur_decay_value == pytest.approx(0.2)
    assert any(not torch.equal(e, w) for e, w in zip(trainer.ema.shadow_params, params(trainer.raw_model)))


def test_loss_is_the_closed_form_objective(latents) -> None:
    # v-prediction with min-SNR-gamma: the UNet sees x_t = alpha x0 + sigma eps, is scored against
    # v = alpha eps - sigma x0, weighted min(snr, gamma) / (snr + 1) per sample (diffusers' compute_snr).
    from diffusers.training_utils import compute_snr

    trainer = make_trainer(latents, prediction_type="v_prediction", snr_gamma=2.0, cfg_dropout=0.0)
    batch = batches(latents, trainer)[0]
    loss = trainer.compute_loss(batch, generator=torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)  # the same draws, in compute_loss's order: noise, then timesteps
    x0 = batch["latents"]
    eps = torch.randn(x0.shape, generator=draws)
    t = torch.randint(0, 1000, (x0.shape[0],), generator=draws)
    abar = trainer.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    with torch.no_grad():
        pred = trainer.raw_model(alpha * x0 + sigma * eps, t, encoder_hidden_states=batch["text"],
                                 encoder_attention_mask=batch["mask"]).sample
    snr = compute_snr(trainer.noise_scheduler, t)
    weights = torch.clamp(snr, max=2.0) / (snr + 1)
    expected = (weights * (pred - (alpha * eps - sigma * x0)).pow(2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    assert (weights < snr / (snr + 1) - 1e-3).any()  # gamma clips at least one sample of this batch


@pytest.mark.slow  # two spawned processes import torch, diffusers and accelerate
def test_grad_accumulation_on_two_ranks_equals_one_rank_with_the_whole_batch(latents, tmp_path,
                                                                             monkeypatch) -> None:
    # 2 ranks x 2 micro-batches x 2 samples per optimizer step vs 1 rank x 1 batch of 8: DDP averages
    # over ranks, accumulation over micro-batches, so the gradient, its clipped norm and the weights
    # must agree. adam_eps 1 keeps the AdamW update smooth in the gradient (with 1e-8 the first step
    # is ~lr * sign(g), blind to a gradient off by a factor and touchy for gradients near 0).
    PerSampleNoise().install(monkeypatch.setattr)
    settings = dict(ema_decay=0.0, cfg_dropout=0.0, adam_eps=1.0, lr=5e-2, warmup_steps=0, grad_clip=1.0)
    whole = make_trainer(latents, batch_size=8, **settings)
    big_batches = batches(latents, whole)[:2]
    single = [vars(whole.train_step([b])) for b in big_batches]
    split = make_trainer(latents, batch_size=2, grad_accum=2, num_workers=2, **settings)
    per_rank = [[[slice_batch(b, 4 * rank, 4 * rank + 2), slice_batch(b, 4 * rank + 2, 4 * rank + 4)]
                 for b in big_batches] for rank in range(2)]
    weights, results = train_on_two_ranks(per_rank, split.config, split.unet_config, split.empty_text,
                                          tmp_path / "ranks")
    for one, two in zip(single, results):
        assert not one["skipped"] and not two["skipped"]
        assert two["global_loss"] == pytest.approx(one["global_loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert single[0]["grad_norm"] > 1.0  # the clip is active: it must see the synced, accumulated gradient
    moved = 0.0
    for name, value in whole.raw_model.state_dict().items():
        torch.testing.assert_close(weights[name], value, rtol=1e-5, atol=1e-6)
        moved = max(moved, float((value - split.raw_model.state_dict()[name]).abs().max()))
    assert moved > 1e-3  # the two steps really changed the weights (1000x the tolerance)


class _Payload:
    """Unpickling this creates a file: proof of code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_payload_is_refused_without_executing_it(latents, tmp_path) -> None:
    trainer = make_trainer(latents)
    good = tmp_path / "good"
    trainer.save(str(good), {})
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))

    extra = tmp_path / "extra"
    extra.mkdir()
    for f in good.iterdir():
        (extra / f.name).write_bytes(f.read_bytes())
    (extra / "optimizer.pt").write_bytes(payload)
    with pytest.raises(ckpt.CheckpointError, match="optimizer.pt"):
        trainer.load(str(extra))

    disguised = tmp_path / "disguised"
    disguised.mkdir()
    for f in good.iterdir():
        (disguised / f.name).write_bytes(f.read_bytes())
    (disguised / "model.safetensors").write_bytes(payload)
    with pytest.raises(ckpt.CheckpointError, match="pickle"):
        trainer.load(str(disguised))
    torch.save({"x": _Payload(str(marker))}, disguised / "model.safetensors")  # torch.save zip container
    with pytest.raises(ckpt.CheckpointError):
        trainer.load(str(disguised))

    assert not marker.exists(), "the pickle payload was executed"
    pickle.loads(payload)  # the payload is live: unpickling it does create the file
    assert marker.exists()


def test_flatten_round_trip_keeps_types() -> None:
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
             "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-4, "params": [0], "foreach": None}],
             "list": [torch.zeros(1), 2, "x"]}
    structure, tensors = ckpt.flatten_state(state)
    back = ckpt.unflatten_state(structure, tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999)
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], torch.ones(2))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.flatten_state({"bad": object()})


def test_warmup_cosine() -> None:
    values = [warmup_cosine(s, 4, 20, 0.1) for s in range(21)]
    assert values[0] < values[1] < values[3] < values[4] == 1.0
    assert values[12] == pytest.approx(0.1 + 0.9 * 0.5)
    assert values[20] == pytest.approx(0.1)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="fp16"):
        TrainConfig(mixed_precision="fp16", use_gpu=False)
    with pytest.raises(ConfigError):
        TrainConfig(steps=0)
    assert TrainConfig(batch_size=4, grad_accum=2, num_workers=3).global_batch == 24


class _FakeRun:
    def __init__(self) -> None:
        self.artifacts: list[tuple[str, str]] = []

    def log_artifact(self, path: str, artifact_path: str) -> None:
        self.artifacts.append((path, artifact_path))


def test_eval_hook_with_the_real_evaluator_on_ema_weights(tmp_path) -> None:
    from latentforge.evaluation.in_training import EvalFailures
    from latentforge.models.text_encoder import save_tiny_clip_checkpoint
    from pipelines.train_worker import _eval_hook, evaluate_step

    clip = save_tiny_clip_checkpoint(str(tmp_path / "clip.safetensors"))
    models = {"vae": {"type": "patchify", "id": "", "patch_size": 2, "scaling_factor": 1.0, "shift_factor": 0.0,
                      "latent_channels": 12, "downsample": 2},
              "text_encoder": {"name": "lf-tiny-clip", "weights": clip, "layer": "last", "context_length": 77,
                               "width": WIDTH, "pooled_dim": WIDTH}}
    info = write_latent_dataset(tmp_path / "latents", shard_sizes=[12], latent_channels=12, width=WIDTH,
                                context_length=77, vae_type="patchify", models=models)
    from accelerate import Accelerator

    config = TrainConfig(data=str(info.dir), batch_size=4, ema_decay=0.9, eval_every=1, eval_prompts=["a red circle"],
                         eval_steps=2, eval_guidance=2.0)
    empty = tdata.read_empty_caption(str(info.dir), info.manifest)
    trainer = DiffusionTrainer(config, resolve_unet_config("tiny", 12, WIDTH, 8), Accelerator(cpu=True), empty)
    data = batches(info, trainer)
    for batch in data[:2]:
        trainer.train_step([batch])
    raw = params(trainer.raw_model)
    evaluator = _eval_hook(config, info.manifest, "cpu", trainer.noise_scheduler.config)
    assert evaluator is not None
    seen = {}
    real_evaluate = evaluator.evaluate

    def spy(unet, step, out_dir):
        seen["ema"] = all(torch.equal(p, e) for p, e in zip(unet.parameters(), trainer.ema.shadow_params))
        return real_evaluate(unet, step, out_dir)

    evaluator.evaluate = spy
    run = _FakeRun()
    metrics, pool = evaluate_step(trainer, 2, data[:1], evaluator, run, None, EvalFailures())
    pool.shutdown(wait=True)
    assert seen["ema"]  # the evaluator sampled with the EMA weights
    assert set(metrics) == {"val/loss", "val/loss_ema", "eval/failures"} and metrics["eval/failures"] == 0
    assert metrics["val/loss"] != metrics["val/loss_ema"]
    assert [a for _, a in run.artifacts] == ["eval/step_000002"] and run.artifacts[0][0].endswith(".png")
    assert all(torch.equal(a, b) for a, b in zip(raw, params(trainer.raw_model)))  # raw weights restored


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a process-wide singleton
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_and_gradient_checkpointing_run_on_cpu(latents, fresh_accelerate_state) -> None:
    from accelerate import Accelerator

    config = TrainConfig(data=str(latents.dir), batch_size=4, grad_accum=2, mixed_precision="bf16",
                         gradient_checkpointing=True, ema_decay=0.0)
    empty = tdata.read_empty_caption(str(latents.dir), latents.manifest)
    trainer = DiffusionTrainer(config, resolve_unet_config("tiny", 4, WIDTH, 8),
                               Accelerator(cpu=True, mixed_precision="bf16"), empty)
    assert trainer.raw_model.is_gradient_checkpointing and trainer.ema is None
    data = batches(latents, trainer)
    result = trainer.train_step(data[:2])
    assert not result.skipped and result.grad_norm > 0
    assert trainer.export_model().dtype == torch.float32  # no EMA: the raw weights are exported
