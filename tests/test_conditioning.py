"""Class and scalar conditioning: precompute's manifest record, refusals, dropout, the UNet wiring, sampling.

Real parts throughout: demo scenes rendered into ingest tars with their metadata columns, the
precompute stage's own reader / encoder (patchify VAE, tiny open_clip) / writer / manifest run
in-process (tests/harness/condition_scenes.py), diffusers' UNet2DConditionModel class embedding.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from latentforge import tar_samples
from latentforge.conditioning.embedding import class_labels, condition_dropout, with_conditions
from latentforge.conditioning.spec import ConditionSet, ConditionSpec
from latentforge.config import ConfigError
from latentforge.diffusion import objective
from latentforge.manifest import read_manifest
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from latentforge.models.unet import UNetConfigError, resolve_unet_config, unet_from_config
from latentforge.precompute.config import PrecomputeConfig
from latentforge.precompute.stage import plan_run
from tests.harness.condition_scenes import precompute_in_process, write_scene_shards

SHAPE = ConditionSpec("shape", "class", labels=["circle", "square", "triangle"])
SCORE = ConditionSpec("score", "scalar", minimum=0.5, maximum=6.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("clip") / "tiny.safetensors")


def precompute_config(ingest: Path, out: Path, clip: str, condition: list[str], **kw) -> PrecomputeConfig:
    return PrecomputeConfig(input=str(ingest), output=str(out), vae_type="patchify", patch_size=2,
                            text_encoder="lf-tiny-clip", text_encoder_weights=clip, text_layer="last", resolution=16,
                            dtype="fp32", batch_size=8, fidelity_samples=0, condition=condition, **kw)


@pytest.fixture(scope="module")
def scene_latents(tmp_path_factory, clip) -> Path:
    """Scenes with shape + score columns; sample 4 has no shape, sample 7 an unusable score."""
    def drop_some(i: int, meta: dict) -> dict:
        return {**meta, **({"shape": None} if i == 4 else {"score": "n/a"} if i == 7 else {})}

    root = tmp_path_factory.mktemp("scenes")
    ingest = write_scene_shards(root / "ingest", [9, 9], meta_edit=drop_some)
    precompute_in_process(precompute_config(ingest, root / "lat", clip, ["shape:class", "score:scalar"]))
    return root / "lat"


def test_manifest_records_vocabulary_range_and_skips_missing_values(scene_latents) -> None:
    manifest = read_manifest(str(scene_latents), stage="precompute")
    assert manifest.extra["conditions"] == [
        {"name": "shape", "kind": "class", "labels": ["circle", "square", "triangle"], "null_id": 3,
         "minimum": None, "maximum": None},
        {"name": "score", "kind": "scalar", "minimum": 0.5, "maximum": 6.5}]
    assert manifest.counts["skipped_missing_condition"] == 2 and manifest.counts["ok"] == 16
    stored = {k: json.loads(m["cond.json"]) for k, m in tar_samples.iter_shard(str(scene_latents / "00000.tar"))}
    assert stored["000000000"] == {"shape": "circle", "score": 0.5}
    assert len(stored) == 7  # samples 4 and 7 are the skipped ones


def test_training_feeds_the_conditions_to_the_class_embedding(scene_latents) -> None:
    """Stored conditions reach the UNet: a class + scalar dataset gets a projection embedding that trains."""
    from accelerate import Accelerator

    from latentforge.training import data as tdata
    from latentforge.training.config import TrainConfig
    from latentforge.training.loop import DiffusionTrainer

    manifest = read_manifest(str(scene_latents), stage="precompute")
    conditions = ConditionSet.from_manifest(manifest)
    unet_config = with_conditions(resolve_unet_config("tiny", 12, 32, 8), conditions)
    empty = tdata.read_empty_caption(str(scene_latents), manifest)
    trainer = DiffusionTrainer(TrainConfig(data=str(scene_latents), steps=2, batch_size=8, ema_decay=0.0,
                                           condition_dropout=0.5), unet_config, Accelerator(cpu=True), empty,
                               conditions=conditions)
    plan = tdata.plan_data(manifest, 1, 8, 100, 0)
    rows = tdata.read_positions(str(scene_latents), plan, range(8))
    batch = tdata.collate([tdata.decode_row(r, "fp32") for r in rows], empty.shape[0])
    assert batch["conditions"][0] == {"shape": "circle", "score": 0.5}
    before = [p.detach().clone() for p in trainer.raw_model.class_embedding.parameters()]
    result = trainer.train_step([batch])
    assert math.isfinite(result.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.raw_model.class_embedding.parameters()))


def test_a_column_an_ingest_file_lacks_is_refused_before_any_worker(tmp_path, clip, capsys) -> None:
    from jobs.precompute_latents import main

    ingest = write_scene_shards(tmp_path / "ingest", [3], file_columns=[["shape", "score"], ["score"]])
    args = ["--input", str(ingest), "--output", str(tmp_path / "lat"), "--vae-type", "patchify",
            "--text-encoder", "lf-tiny-clip", "--text-encoder-weights", clip, "--no-mlflow"]
    assert main([*args, "--condition", "shape:class"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "precompute: condition column 'shape' is missing from 1 of 2 ingest input file(s) (urls1.parquet); "
        "columns ingest kept: ['score', 'shape']"]
    assert not (tmp_path / "lat").exists()  # refused while planning: nothing written, no Ray started
    with pytest.raises(ConfigError, match="'shape' is missing from 1 of 2 ingest input file"):
        plan_run(precompute_config(ingest, tmp_path / "lat", clip, ["shape:class"]))
    plan_run(precompute_config(ingest, tmp_path / "lat", clip, ["score:scalar"]))  # every file has it
    assert main([*args, "--condition", "shape:colour"]) == 2  # not a kind


def test_ingest_records_each_input_files_columns(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from latentforge.ingest.inputs import plan_input

    pq.write_table(pa.table({"url": ["u1"], "caption": ["c"], "shape": ["circle"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"url": ["u2"], "caption": ["c"], "score": [1.0]}), tmp_path / "b.parquet")
    plan = plan_input(str(tmp_path), "url", "caption")
    assert [f.columns for f in plan.files] == [["shape"], ["score"]]


def test_class_labels_one_class_is_an_id_several_are_features() -> None:
    one, both = ConditionSet([SHAPE]), ConditionSet([SHAPE, SCORE])
    rows = one.rows([{"shape": "triangle"}, {}])
    assert class_labels(one, rows).tolist() == [2, 3]  # label id, the null id
    features = class_labels(both, both.rows([{"shape": "square", "score": 6.5}, {}]))
    assert features.shape == (2, 4 + 17)
    assert features[0, :4].tolist() == [0, 1, 0, 0] and features[1, :4].tolist() == [0, 0, 0, 1]
    assert features[0, 4] == 0 and features[1, 4] == 1 and not features[1, 5:].any()  # null flag, no waves
    assert with_conditions({}, one) == {"num_class_embeds": 4}
    assert with_conditions({}, both)["class_embed_type"] == "projection"
    with pytest.raises(UNetConfigError, match="class embedding"):
        with_conditions({"num_class_embeds": 10}, one)


def test_request_checks_vocabulary_and_range() -> None:
    conditions = ConditionSet([SHAPE, SCORE])
    assert conditions.parse_request(["shape=circle", "score=6.5"]) == {"shape": "circle", "score": 6.5}
    with pytest.raises(ConfigError, match="valid labels: circle, square, triangle"):
        conditions.parse_request(["shape=hexagon"])
    with pytest.raises(ConfigError, match=r"outside the recorded range \[0.5, 6.5\]"):
        conditions.parse_request(["score=7"])
    with pytest.raises(ConfigError, match="NAME one of"):
        conditions.parse_request(["colour=red"])


def test_condition_dropout_is_independent_of_caption_dropout() -> None:
    conditions = ConditionSet([SHAPE])
    gen = torch.Generator().manual_seed(0)
    n = 4000
    rows = conditions.rows([{"shape": "circle"}] * n)
    text, mask, empty = torch.ones(n, 3, 2), torch.ones(n, 3, dtype=torch.long), torch.zeros(1, 2)
    _, _, caption_dropped = objective.caption_dropout(text, mask, empty, 0.5, gen)
    new_rows, cond_dropped = condition_dropout(conditions, rows, 0.3, gen)
    assert abs(float(cond_dropped.float().mean()) - 0.3) < 0.03
    assert bool((new_rows[cond_dropped, 0] == 3).all() and (new_rows[~cond_dropped, 0] == 0).all())
    both = float((caption_dropped & cond_dropped).float().mean())
    assert abs(both - 0.5 * 0.3) < 0.025  # joint = product: independent draws
    assert not condition_dropout(conditions, rows, 0.0, gen)[1].any()
    assert condition_dropout(conditions, rows, 1.0, gen)[1].all()


def tiny_class_unet(conditions: ConditionSet):
    torch.manual_seed(0)
    return unet_from_config(with_conditions(resolve_unet_config("tiny", 12, 32, 8), conditions)).eval()


def test_unet_takes_the_labels_and_the_null_id_means_unconditional() -> None:
    """With CFG, guidance on the null condition changes nothing (both halves are the null condition),
    while guidance on a label does: the null id is the unconditional branch."""
    from latentforge.generation.sampler import SampleParams, Sampler
    from latentforge.models.vae import VaeSpec, load_vae

    conditions = ConditionSet([SHAPE, SCORE])
    unet = tiny_class_unet(conditions)
    with torch.no_grad():
        for p in unet.class_embedding.parameters():
            p.add_(0.5 * torch.randn_like(p))  # make the embedding matter before any training
    text = _EmptyText()
    vae = load_vae(VaeSpec(type="patchify", id="", patch_size=2))
    sampler = Sampler(unet, vae, text, {"num_train_timesteps": 1000}, conditions=conditions)

    def sample(guidance: float, values: dict) -> torch.Tensor:
        params = SampleParams(steps=4, guidance=guidance, conditions=values)
        return torch.tensor(sampler.txt2img([""], [3], params)[0].array)

    null_guided, null_plain = sample(5.0, {}), sample(1.0, {})
    assert torch.allclose(null_guided, null_plain, atol=1e-5)
    assert (sample(5.0, {"shape": "circle", "score": 2.0}) - null_plain).abs().max() > 1e-2


class _EmptyText:
    """A text encoder that encodes every prompt as two zero states (the model under test is text-free)."""

    width, context_length = 32, 77

    def encode(self, prompts):
        n = len(prompts)
        return torch.zeros(n, 77, 32), torch.full((n,), 2), torch.zeros(n, 32)


def test_config_validation() -> None:
    from latentforge.training.config import TrainConfig

    with pytest.raises(ConfigError, match="condition_dropout"):
        TrainConfig(condition_dropout=1.5)
    with pytest.raises(ConfigError, match="COLUMN:class or COLUMN:scalar"):
        PrecomputeConfig(condition=["shape"])
    assert math.isnan(SCORE.null_value())


@pytest.fixture(scope="module")
def labelled_export(tmp_path_factory) -> Path:
    """A tiny export whose data records the shape labels and the score range, and whose UNet weights are
    gone: a refusal must come before any model is loaded (a load would fail with exit 1, not 2)."""
    from latentforge import storage
    from tests.harness.tiny_export import build_tiny_export

    export = build_tiny_export(tmp_path_factory.mktemp("model")).dir
    record = json.loads((export / "data_manifest.json").read_text())
    record["extra"]["conditions"] = ConditionSet([SHAPE, SCORE]).records()
    storage.atomic_write_json(str(export / "data_manifest.json"), record)
    for weights in (export / "unet").glob("*.safetensors"):
        weights.unlink()
    return export


def generate_args(export: Path, out: Path, condition: str) -> list[str]:
    return ["--model", str(export), "--prompts", "a shape", "--out", str(out), "--no-mlflow", "--condition", condition]


def test_generate_job_refuses_a_label_outside_the_vocabulary_with_exit_2(labelled_export, tmp_path) -> None:
    import subprocess
    import sys

    job = [sys.executable, str(Path(__file__).resolve().parent.parent / "jobs" / "generate.py")]
    proc = subprocess.run([*job, *generate_args(labelled_export, tmp_path / "out", "shape=hexagon")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "label 'hexagon' is not in the vocabulary; valid labels: circle, square, triangle" in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("condition, message", [
    ("shape=circle,score=7", "condition score: 7 is outside the recorded range [0.5, 6.5]"),
    ("score=0.4", "condition score: 0.4 is outside the recorded range [0.5, 6.5]"),
    ("score=high", "condition score: 'high' is not a number"),
    ("colour=red", "condition 'colour=red': expected NAME=VALUE with NAME one of ['shape', 'score']")])
def test_generate_job_refuses_a_bad_scalar_or_name_in_one_line(labelled_export, tmp_path, capsys, monkeypatch,
                                                               condition, message) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "jobs"))  # as `python jobs/X.py`
    from jobs.generate import main

    assert main(generate_args(labelled_export, tmp_path / "out", condition)) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"generate: {message}"]
    assert not (tmp_path / "out").exists()
