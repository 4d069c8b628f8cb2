"""Class and scalar conditions through the real jobs: jobs/precompute_latents.py `--condition` on the
session's Ray head -> jobs/train.py (Ray Train, tiny preset, a few steps) -> jobs/generate.py `--condition`.

Tiny and short: it checks the wiring between the stages (what each records and passes on), not what
the model learns (tests/test_conditioning_shapes.py measures that).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentforge.manifest import read_manifest
from latentforge.models.text_encoder import save_tiny_clip_checkpoint
from tests.harness.condition_scenes import write_scene_shards

JOBS = Path(__file__).resolve().parent.parent / "jobs"
pytestmark = pytest.mark.slow
SHAPE_RECORD = {"name": "shape", "kind": "class", "labels": ["circle", "square", "triangle"], "null_id": 3,
                "minimum": None, "maximum": None}
SCORE_RECORD = {"name": "score", "kind": "scalar", "minimum": 0.5, "maximum": 6.5}


@pytest.fixture(scope="module")
def trained(ray_session, tmp_path_factory) -> dict[str, Path]:
    from jobs.precompute_latents import main as precompute
    from jobs.train import main as train

    root = tmp_path_factory.mktemp("conditions_e2e")
    ingest = write_scene_shards(root / "ingest", [12, 12])  # scores 0.5 .. 6.5 (scene_meta)
    clip = save_tiny_clip_checkpoint(root / "clip.safetensors")
    assert precompute(["--preset", "tiny", "--input", str(ingest), "--output", str(root / "latents"),
                       "--text-encoder-weights", clip, "--resolution", "16", "--dtype", "fp32",
                       "--fidelity-samples", "0", "--condition", "shape:class,score:scalar", "--no-progress",
                       "--no-mlflow"]) == 0
    assert train(["--preset", "tiny", "--data", str(root / "latents"), "--steps", "4", "--batch-size", "8",
                  "--warmup-steps", "1", "--condition-dropout", "0.25", "--storage-path", str(root / "runs"),
                  "--run-name", "conditions", "--no-mlflow"]) == 0
    return {"latents": root / "latents", "export": root / "runs" / "conditions" / "export"}


def test_the_conditions_travel_from_precompute_to_the_export(trained) -> None:
    latents = read_manifest(str(trained["latents"]), stage="precompute")
    assert latents.extra["conditions"] == [SHAPE_RECORD, SCORE_RECORD]
    export = read_manifest(str(trained["export"]), stage="train")
    assert export.extra["conditions"] == [SHAPE_RECORD, SCORE_RECORD]
    assert export.config["condition_dropout"] == 0.25
    unet = json.loads((trained["export"] / "unet" / "config.json").read_text())
    # class + scalar: the projection embedding over one-hot(3 labels + null) and the scalar's 1 + 16 features
    assert (unet["class_embed_type"], unet["projection_class_embeddings_input_dim"]) == ("projection", 4 + 17)


def _generate(export: Path, out: Path, condition: str) -> tuple[list[dict], np.ndarray]:
    from jobs.generate import main

    assert main(["--model", str(export), "--prompts", "a red shape", "--out", str(out), "--steps", "4",
                 "--guidance", "3", "--seed", "5", "--no-mlflow", "--condition", condition]) == 0
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    return rows, np.asarray(Image.open(out / rows[0]["file"]), dtype=np.int16)


def test_generate_samples_with_the_requested_conditions(trained, tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(JOBS))  # as `python jobs/generate.py` has it
    circle_rows, circle = _generate(trained["export"], tmp_path / "circle", "shape=circle,score=2")
    triangle_rows, triangle = _generate(trained["export"], tmp_path / "triangle", "shape=triangle,score=6.5")
    assert circle_rows[0]["conditions"] == {"shape": "circle", "score": 2.0}
    assert triangle_rows[0]["conditions"] == {"shape": "triangle", "score": 6.5}
    assert circle_rows[0]["seed"] == triangle_rows[0]["seed"]
    assert np.abs(circle - triangle).max() > 3  # same seed and prompt: only the conditions differ
